"""WebDataset tar shards as :mod:`bssl.data.ingest` input: what img2dataset, LAION,
DataComp, COYO and the YFCC-derived sets ship.

A shard ``00000.tar`` holds, per sample, members that share a *key*: ``<key>.jpg`` (or
``.png``, ``.webp``, ...), ``<key>.json`` (url, caption, key, status, width, height,
sha256, ...) and ``<key>.txt`` (the caption). The key of a member is its name up to the
first dot of its last path component (``part/000123.jpg`` -> ``part/000123``, as the
``webdataset`` library splits names); consecutive members with one key are one sample.

Read with Python's :mod:`tarfile` in stream mode (``r|*``): members in stream order, one
pass, nothing unpacked to disk, from a local file or a ``gs://`` object alike (no seeks,
so a remote shard is read as one stream). The ``webdataset`` package does the same and
more (its own pipelines, decoders, shuffling), none of which the ingest needs, so it is
not a dependency.

Given as ``--input=``:

- a ``.tar`` file;
- a folder holding ``.tar`` files (searched recursively; no image files beside them);
- a brace pattern, ``shards/{00000..00127}.tar`` (numeric ranges keep their zero
  padding; ``{a,b}`` lists too), local or ``gs://``;
- a text file listing one shard per line (relative to the list's folder).

Shards are taken sorted as whole paths (a brace pattern's expansion is sorted too). Ids:
the samples of shard 0 in stream order, then those of shard 1, ...; a sample whose json
``status`` is not ``success`` (img2dataset's failed downloads) gets no id and is counted
(``num_skipped``); a sample with no image member, or whose image does not decode, gets an
id and is listed as bad with its reason.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import tarfile
import zlib
from collections.abc import Iterator

from bssl import storage
from bssl.data import listing

# a sample's image member: the image files bssl reads, by extension (without the dot)
IMAGE_MEMBERS = frozenset(e[1:] for e in listing.IMAGE_EXTENSIONS)
_BRACE = re.compile(r"\{([^{}]*)\}")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class TarInputError(ValueError):
  """A tar-shard input that cannot be used (exit 2)."""


@dataclasses.dataclass
class Sample:
  key: str
  image: bytes | None = None
  meta: dict | None = None  # the json member, parsed (None: none, or not an object)
  caption: str | None = None  # the txt member, else json["caption"]
  members: tuple = ()

  @property
  def status(self) -> str | None:
    return None if self.meta is None else self.meta.get("status")

  @property
  def url(self) -> str:
    return "" if self.meta is None else str(self.meta.get("url") or "")


def expand_braces(pattern: str) -> list[str]:
  """``a/{000..002}.tar`` -> a/000.tar, a/001.tar, a/002.tar; ``{x,y}`` -> x, y; several
  groups multiply (left to right)."""
  m = _BRACE.search(pattern)
  if m is None:
    return [pattern]
  body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
  r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if r:
    a, b = r.group(1), r.group(2)
    if int(b) < int(a):
      raise TarInputError(f"--input: brace range {{{body}}} in {pattern!r} runs backwards")
    width = len(a) if a.startswith("0") or len(a) == len(b) else 0
    parts = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
  else:
    parts = body.split(",")
  return [x for p in parts for x in expand_braces(head + p + tail)]


def _is_tar(name: str) -> bool:
  return name.lower().endswith(".tar")


def tar_inputs(input_path: str, listed: dict | None = None) -> list[str] | None:
  """The tar shards ``--input`` names (a pattern, a .tar, a folder of them, a list of
  them), sorted as whole paths, every one existing; None when it names image files. A
  folder is listed once, with the listing of image inputs (:func:`bssl.data.listing.
  list_inputs`: symlinked folders once, gs:// in one paginated listing), and one holding
  both shards and images is refused. ``listed``, when given, gets ``{"images": [...]}``:
  a folder's image files (:data:`bssl.data.listing.IMAGE_EXTENSIONS`) when it holds no
  tar shard, as :func:`bssl.data.listing.list_inputs` lists them (not listed again)."""
  if _BRACE.search(input_path):
    tars = expand_braces(input_path)
  elif _is_tar(input_path) and not storage.path(input_path).is_dir():
    tars = [input_path]
  else:
    p = storage.path(input_path)
    if not p.exists():
      return None  # (list_inputs says it does not exist)
    try:
      if p.is_dir():
        found = listing.list_inputs(input_path, listing.IMAGE_EXTENSIONS + (".tar",))
      else:
        found = listing.list_inputs(input_path)  # a list's lines, resolved as for images
    except (listing.ListingError, UnicodeDecodeError):
      return None
    tars = [f for f in found if _is_tar(f)]
    if not tars or (not p.is_dir() and len(tars) < len(found)):
      if listed is not None and p.is_dir() and not tars:
        listed["images"] = found
      return None  # image files (a list of other files than tars: taken as images)
    if len(tars) < len(found):
      images = [f for f in found if not _is_tar(f)]
      raise TarInputError(
          f"--input: {input_path!r} holds both .tar shards ({len(tars)}) "
          f"and image files ({len(images)}, e.g. {images[0]!r}); give the "
          f"shards as a pattern or a list, or the images in a folder of "
          f"their own"
      )
  tars = sorted(set(tars))
  missing = [t for t in tars if not storage.path(t).exists()]
  if missing:
    raise TarInputError(
        f"--input: {len(missing)} of {len(tars)} tar shard(s) do not exist: "
        f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
    )
  return tars


def tar_stat(path: str) -> tuple[int, int]:
  """(size, mtime or generation) of a shard (the ingest's progress counts sizes; a shard is
  identified by its content, :mod:`bssl.data.ingest`)."""
  return storage.stat(path)


def split_key(name: str) -> tuple[str, str]:
  """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``); a name without a dot is its own key
  with no extension."""
  m = _KEY.match(name)
  return (m.group(1), m.group(2).lower()) if m else (name, "")


def read_samples(tar_path: str, errors: list) -> Iterator[Sample]:
  """The samples of one shard in stream order. A shard that ends early or is damaged
  stops the stream: the reason is appended to ``errors`` (the samples before it stand)."""
  cur: Sample | None = None
  try:
    with (
        storage.path(tar_path).open("rb") as raw,
        tarfile.open(fileobj=(fh := _Counting(raw)), mode="r|*") as tf,
    ):
      for m in tf:
        if not m.isfile():
          continue
        key, ext = split_key(m.name)
        data = tf.extractfile(m).read()
        if len(data) != m.size:
          raise tarfile.ReadError(f"member {m.name!r} holds {len(data)} of its {m.size} " f"bytes")
        if cur is None or key != cur.key:
          if cur is not None:
            yield _finish(cur)
          cur = Sample(key)
        cur.members += (ext,)
        base = ext.rsplit(".", 1)[-1]
        if base in IMAGE_MEMBERS and cur.image is None:
          cur.image = data
        elif ext == "json":
          try:
            meta = json.loads(data.decode("utf-8"))
          except (UnicodeDecodeError, ValueError):
            meta = None
          cur.meta = meta if isinstance(meta, dict) else None
        elif ext == "txt":
          cur.caption = data.decode("utf-8", "replace")
      # tarfile ends a stream quietly where the file ends; a whole archive ends with a
      # block of zeros (an uncompressed one can be checked)
      if getattr(tf.fileobj, "comptype", "tar") == "tar" and not fh.zeros_at(tf.offset):
        raise tarfile.ReadError("no end-of-archive block")
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    errors.append(
        f"{tar_path}: the tar stream is damaged or cut short after "
        f"{'key ' + repr(cur.key) if cur else 'its start'} "
        f"({type(e).__name__}: {e}); the samples before it were ingested"
    )
  if cur is not None:
    yield _finish(cur)


class _Counting:
  """A read-only stream that remembers how far it was read and its last bytes (the last
  chunks read, at least ``keep`` bytes of them: no copying per read)."""

  def __init__(self, fh, keep: int = 1 << 16):
    self.fh, self.n, self.keep = fh, 0, keep
    self.chunks: collections.deque = collections.deque()
    self.held = 0

  def read(self, size=-1):
    b = self.fh.read(size)
    self.n += len(b)
    self.chunks.append(b)
    self.held += len(b)
    while self.held - len(self.chunks[0]) >= self.keep:
      self.held -= len(self.chunks.popleft())
    return b

  def zeros_at(self, offset: int) -> bool:
    """Whether the 512 bytes at ``offset`` were read and are all zero."""
    tail = b"".join(self.chunks)
    start = self.n - len(tail)
    if offset < start or offset + 512 > self.n:
      return False
    return not any(tail[offset - start : offset - start + 512])


def _finish(s: Sample) -> Sample:
  if s.caption is None and s.meta is not None and isinstance(s.meta.get("caption"), str):
    s.caption = s.meta["caption"]
  return s
