"""The one way bssl reads and writes files: ``etils.epath`` (and fsspec where epath cannot
list or stat), so a work directory, an ingest or an image folder can be a local folder or
``gs://bucket/prefix`` alike.

Writes are atomic where the store allows it: on a local disk a temporary file is renamed
over the target (readers see the old or the new file, never half of one); on object
storage a single-object upload is atomic by itself. Nothing here assumes that processes
share a local disk. What lives where in a work directory is :mod:`bssl.workdir`'s.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

PathLike = str | os.PathLike | epath.Path


def _no_listing_cache() -> None:
  """Object stores have no directories, and gcsfs caches listings: a process would not
  see a file (or a "folder", which exists once an object is under it) that another host
  wrote after it first looked. Every host must see the others' writes, so no cache."""
  try:
    import fsspec

    for proto in ("gcs", "gs"):
      fsspec.config.conf.setdefault(proto, {})["use_listings_cache"] = False
  except ImportError:
    pass


_no_listing_cache()


class CorruptArtifactError(ValueError):
  """A file written by bssl cannot be read back."""


def path(p: PathLike) -> epath.Path:
  """An epath for ``p``; local paths are made absolute, URLs (``gs://``) kept as they are."""
  s = os.fspath(p)
  return epath.Path(s if is_remote(s) else os.path.abspath(s))


def is_remote(p: PathLike) -> bool:
  return "://" in os.fspath(p)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def listdir(p: PathLike) -> list[str]:
  """The sorted names in folder ``p`` (none when it does not exist)."""
  p = path(p)
  return sorted(c.name for c in p.iterdir()) if p.exists() else []


def find(root: PathLike) -> list[str]:
  """Every file under folder ``root`` (recursive, symlinked folders followed), as sorted
  paths relative to it; local or gs:// (one paginated listing of the prefix)."""
  root = str(path(root)).rstrip("/")
  if is_remote(root):
    import fsspec

    fs, rel = fsspec.core.url_to_fs(root)
    return sorted(f[len(rel.rstrip("/")) + 1 :] for f in fs.find(rel))
  out = []
  for d, dirs, files in os.walk(root, followlinks=True):
    dirs.sort()
    for f in files:
      out.append(os.path.relpath(os.path.join(d, f), root))
  return sorted(out)


def stat(p: PathLike) -> tuple[int, int]:
  """(size, mtime in ns) of a local or remote file; on object storage the "mtime" is a
  stable digest of the store's timestamp or generation."""
  s = str(p)
  if not is_remote(s):
    st = os.stat(s)
    return st.st_size, st.st_mtime_ns
  import fsspec

  fs, rel = fsspec.core.url_to_fs(s)
  info = fs.info(rel)
  m = info.get("mtime") or info.get("updated") or info.get("generation") or 0
  # a stable digest of the store's timestamp or generation (Python's hash() of a string is
  # salted per process: another process, or a rerun, would see another "mtime")
  return int(info.get("size") or 0), int.from_bytes(
      hashlib.blake2b(str(m).encode(), digest_size=7).digest(), "big"
  )


def read_chunks(p: PathLike, size: int = 1 << 22) -> Iterator[bytes]:
  """The bytes of file ``p`` in chunks of ``size`` (to hash a big file in bounded memory)."""
  with path(p).open("rb") as fh:
    while chunk := fh.read(size):
      yield chunk


def rmtree(p: PathLike) -> None:
  p = path(p)
  if p.exists():
    p.rmtree()


# --------------------------------------------------------------------------- writing


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes ``data`` to ``p`` atomically (parents created)."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    p.write_bytes(data)  # one object upload: atomic on GCS/S3
    return
  tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS and not e.filename:
      # a write() that failed names no file: say which (disk_full reads it)
      raise OSError(e.errno, e.strerror or os.strerror(e.errno), os.fspath(p)) from e
    raise


def write_text(p: PathLike, text: str) -> None:
  """Writes ``text`` as UTF-8; a file name that is not UTF-8 (held, as Python holds it, as
  a surrogate-escaped str) is written as its own bytes, so it reads back the same."""
  write_bytes(p, text.encode("utf-8", "surrogateescape"))


# --------------------------------------------------------------------------- JSON


def json_default(o):
  """JSON for what ``json`` cannot write: numpy scalars and arrays as numbers and lists,
  sets as lists, anything else as its ``str``."""
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (set, tuple)):
    return list(o)
  return str(o)


def to_json(obj: Any) -> str:
  return json.dumps(obj, indent=2, sort_keys=True, default=json_default)


def write_json(p: PathLike, obj: Any) -> None:
  write_text(p, to_json(obj))


def read_json(p: PathLike) -> Any:
  p = path(p)
  try:
    return json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise CorruptArtifactError(
        f"{p} is not valid JSON ({e}); it was not written by bssl "
        f"or was damaged: delete it to recompute"
    ) from None


# --------------------------------------------------------------------------- numpy


def write_npz(p: PathLike, **arrays) -> None:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  write_bytes(p, buf.getvalue())


def read_npz(p: PathLike, keys=None) -> dict[str, np.ndarray]:
  """The arrays of an .npz, or only ``keys`` of them: then only those members are read
  (the zip is opened in place and read by seeks, ranged reads on gs://)."""
  p = path(p)
  try:
    if keys is not None:
      with p.open("rb") as fh, np.load(fh, allow_pickle=False) as z:
        return {k: z[k] for k in keys if k in z.files}
    with np.load(io.BytesIO(p.read_bytes()), allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise CorruptArtifactError(
        f"{p} cannot be read ({type(e).__name__}: {e}); delete it " f"to recompute what it held"
    ) from None


def write_npy(p: PathLike, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
  write_bytes(p, buf.getvalue())


def read_npy(p: PathLike, mmap: bool = False) -> np.ndarray:
  p = path(p)
  if mmap and not is_remote(p):
    return np.load(os.fspath(p), mmap_mode="r", allow_pickle=False)
  return np.load(io.BytesIO(p.read_bytes()), allow_pickle=False)


# --------------------------------------------------------------------------- a full disk

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how libraries that do not raise OSError (tensorstore under orbax, pyarrow, grain) say it
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")
_QUOTED_PATH = re.compile(r"""["'](/[^"']+)["']""")


def disk_full(exc: BaseException | None) -> str | None:
  """When ``exc``, or an exception it wraps (``__cause__``, ``__context__``, an exception
  group's members), says that a disk is full (ENOSPC, EDQUOT, or a library's message that
  says so): the path it was writing ("" when none is named); otherwise None."""
  todo, seen, found = [exc], set(), None
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
      if e.filename:
        return os.fsdecode(e.filename)
      found = found or _path_in_traceback(e)
    text = str(e)
    if any(t in text for t in DISK_FULL_TEXTS):
      m = _QUOTED_PATH.search(text)
      if m:
        return m.group(1)
      found = found or ""
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return found


_PATH_LOCALS = ("path", "p", "filename", "fname", "file", "directory", "tmp")


def _path_in_traceback(e: BaseException) -> str:
  """The file an OSError that names none was writing: a path-like local variable of the
  innermost frames (``f.write`` knows no name; its caller does), or ""."""
  frames, tb = [], e.__traceback__
  while tb is not None:
    frames.append(tb.tb_frame)
    tb = tb.tb_next
  for frame in reversed(frames[-4:]):
    for name in _PATH_LOCALS:
      v = frame.f_locals.get(name)
      if isinstance(v, (str, os.PathLike)) and not isinstance(v, bytes):
        s = os.fspath(v)
        if isinstance(s, str) and (s.startswith("/") or is_remote(s)):
          return s
  return ""


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def free_space(p: PathLike) -> str | None:
  """ "<free> free of <total>" on the disk that holds ``p`` (its nearest existing folder),
  or None (object storage, or nothing of ``p`` exists)."""
  s = os.fspath(p)
  if is_remote(s):
    return None
  s = os.path.abspath(s)
  while s and not os.path.exists(s):
    parent = os.path.dirname(s)
    if parent == s:
      return None
    s = parent
  try:
    u = shutil.disk_usage(s)
  except OSError:
    return None
  return f"{_human(u.free)} free of {_human(u.total)}"
