"""An ingest's output, read: :class:`ShardSource` (U for scoring, the weak set) and the
facts of the format that the writer (:mod:`bssl.data.ingest`) and the reader share.

Layout of an ingest's output folder (local or ``gs://``)::

  ingest.json                 parameters, the input's fingerprint, N, shard size
  shards/u-00000.array_record record j = JPEG bytes of image id s*S + j ("" = bad file)
  shards/u-00000.npz          the shard's manifest: original path, original size, stored
                              size, content hash (blake2b-128 of the file), bad reason
  bad.json                    [{"id", "path", "reason"}] for files that cannot be decoded
  duplicates.npz              ids whose content equals an earlier id's: (ids, first)
  placeholders.npz            ids of one content shared by many images (dead links)
  manifest.json               counts, the content digest, the digest of the input files'
                              contents and of each metadata column group; written when
                              every shard is complete

Ids are positions in the input list sorted as whole path strings
(:func:`bssl.data.listing.list_inputs`); for tar shards, the samples of shard 0 in stream
order, then shard 1's, ... (:mod:`bssl.data.webdataset`).

What an ingest is, for a stage that reads it, is three identities (each recorded only when
a stage reads that part): its pixels (:func:`identity_of`: the images' content hashes in id
order and the encoding parameters), its captions and its keys (:func:`metadata_identity_of`:
digests of the metadata columns, :data:`METADATA`, written at ingest time). So an ingest
re-made with other captions, keys or urls but the same images changes what a stage that
read captions (weak labels) or keys (D-hat's table) recorded, and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading

import numpy as np
from array_record.python import array_record_module as ar

from bssl import deps, storage
from bssl.data import decode, listing

# 2: ids are positions in the whole-path-sorted list (1: a local folder's ids followed its
# per-folder walk, so ``a/b.jpg`` came before ``a.jpg``; file lists and gs:// did not).
FORMAT_VERSION = 2
FORMAT_CHANGE = (
    "the id rule changed in format 2: ids are now positions in the input "
    "list sorted as whole paths, so an input folder's ids may differ"
)


class IngestError(ValueError):
  """A user error of the ingest command or of reading its output (exit 2)."""


def shard_name(s: int) -> str:
  return f"u-{s:05d}"


def content_digest_of(header: dict, shard_hashes) -> str:
  """blake2b-128 (hex) of what the shards' pixels are a function of: the ingest parameters
  (format, short side, quality) and every id's content hash [n, 16], in id order (a file
  that could not be read: zeros)."""
  h = hashlib.blake2b(digest_size=16)
  h.update(
      f"format={header['format_version']}:short={header['short_side']}:"
      f"q={header['quality']}:n={header['num_images']}:"
      f"placeholders={header.get('placeholder_min')}\n".encode()
  )
  for a in shard_hashes:
    h.update(np.ascontiguousarray(a, np.uint8).tobytes())
  return h.hexdigest()


def content_digest(out, num_shards: int) -> str:
  """The complete ingest's ``content_digest`` (``manifest.json`` holds it), recomputed from
  its shards' manifests: the same images (by content, in the same id order) ingested with
  the same parameters have the same digest, wherever they are and whatever their names."""
  out = storage.path(out)
  header = storage.read_json(out / "manifest.json")
  return content_digest_of(
      header,
      (
          storage.read_npz(out / "shards" / f"{shard_name(s)}.npz", keys=("hash",))["hash"]
          for s in range(int(num_shards))
      ),
  )


def shard_offsets(out, header: dict) -> np.ndarray:
  """[num_shards + 1] first id of each shard (and N): ``s * shard_size`` for an ingest of
  files; from each shard's length for tar shards (one output shard per input tar)."""
  ns = int(header["num_shards"])
  if header.get("shard_size"):
    n = int(header["num_images"])
    return np.minimum(np.arange(ns + 1, dtype=np.int64) * int(header["shard_size"]), n)
  out = storage.path(out)
  sizes = [
      len(storage.read_npz(out / "shards" / f"{shard_name(s)}.npz", keys=("hash",))["hash"])
      for s in range(ns)
  ]
  return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


# The metadata a stage may read from an ingest, in groups recorded apart
# (``<field>:captions``, ``<field>:keys``): each group by the digest of its columns.
# ``keys``: the sample keys and urls of tar shards and every image's input path (an ingest
# of files has its path as its key): what D-hat's table and the bad-image lists name.
METADATA = {"captions": ("caption",), "keys": ("path", "key", "url")}


class MetadataDigest:
  """The digest of one :data:`METADATA` group over the shards' manifests, fed shard by
  shard in shard order (:meth:`update`): blake2b-128 of each column's values in id order
  (a column the ingest does not have adds nothing)."""

  def __init__(self, group: str):
    self.cols = METADATA[group]
    self.h = hashlib.blake2b(digest_size=16)
    self.h.update(f"{group}\n".encode())

  def update(self, shard_manifest: dict) -> None:
    for col in self.cols:
      if col in shard_manifest:
        a = np.asarray(shard_manifest[col]).reshape(-1).tolist()
        self.h.update(f"{col}:{len(a)}\n".encode())
        self.h.update("\0".join(str(x) for x in a).encode("utf-8", "surrogateescape") + b"\n")

  def hexdigest(self) -> str:
    return self.h.hexdigest()


def metadata_digests(out, num_shards: int) -> dict[str, str]:
  """{group: digest} of every :data:`METADATA` group, from the shards' manifests (what
  ``manifest.json`` holds as ``metadata_digests``; computed here for an ingest made before
  it did)."""
  out = storage.path(out)
  ds = {g: MetadataDigest(g) for g in METADATA}
  cols = sorted({c for cs in METADATA.values() for c in cs})
  for s in range(int(num_shards)):
    m = storage.read_npz(out / "shards" / f"{shard_name(s)}.npz", keys=cols)
    for d in ds.values():
      d.update(m)
  return {g: d.hexdigest() for g, d in ds.items()}


def _metadata_identity(root, manifest: dict, group: str) -> str:
  if group not in METADATA:
    raise ValueError(f"metadata groups are {sorted(METADATA)}, got {group!r}")
  d = (manifest.get("metadata_digests") or {}).get(group)
  if d is None:
    d = metadata_digests(root, int(manifest["num_shards"]))[group]
  return f"ingest-{group}:{d}"


def metadata_identity_of(path: str, group: str) -> str:
  """One metadata group of the ingest at ``path`` (``captions`` or ``keys``), as the record
  stores it (inputs ``<field>:captions`` and ``<field>:keys`` of kinds ``shards_captions``
  and ``shards_keys``): the digest written in ``manifest.json`` at ingest time. Raises
  FileNotFoundError when there is no manifest."""
  root = storage.path(path)
  return _metadata_identity(root, storage.read_json(root / "manifest.json"), group)


def _identity(root, manifest: dict) -> str:
  if manifest.get("content_digest"):
    return f"ingest:{manifest['content_digest']}"
  return f"ingest:{content_digest(root, int(manifest['num_shards']))}"


def identity_of(path: str) -> str:
  """An ingest by its images' content, as the record stores it (the input ``unlabelled.path``
  or ``weak.path`` of kind ``shards``): the digest of the per-image content hashes, written
  by the ingest in ``manifest.json`` (computed from the shards' manifests for an ingest that
  does not have it). Raises FileNotFoundError when there is no manifest."""
  root = storage.path(path)
  return _identity(root, storage.read_json(root / "manifest.json"))


def _find(sorted_ids: np.ndarray, i: int) -> int:
  """Position of ``i`` in ``sorted_ids``, or -1."""
  k = int(np.searchsorted(sorted_ids, i))
  return k if k < len(sorted_ids) and sorted_ids[k] == i else -1


class ShardSource:
  """U from an ingest's output: record ``i`` = image id ``i`` decoded (``valid`` False for
  bad files and, with ``drop_duplicates``, for exact duplicates of an earlier id). Id ``i``
  is the ``i``-th path of the ingest's input in :func:`bssl.data.listing.list_inputs`'
  order (sorted as whole paths), the same id an :class:`bssl.data.sources.ImageFileSource`
  of that input gives it. Ingests of format 1 (another order) are refused: ingest again.
  Remote shards are copied once into ``cache_dir`` (default: a folder under TMPDIR) on
  this host's disk; each process only fetches the shards it reads."""

  def __init__(
      self, path: str, channels: int = 3, drop_duplicates: bool = True, cache_dir: str | None = None
  ):
    root = storage.path(path)
    mf = root / "manifest.json"
    if not mf.exists():
      what = (
          "holds an ingest that is not complete (no manifest.json): rerun "
          "`python -m bssl.ingest` with the same --input/--out to finish it"
          if (root / "ingest.json").exists()
          else "is not the output of `python -m bssl.ingest` (no manifest.json)"
      )
      raise IngestError(f"unlabelled.path: {path!r} {what}")
    self.manifest = storage.read_json(mf)
    if self.manifest.get("format_version") != FORMAT_VERSION:
      raise IngestError(
          f"unlabelled.path: {path!r} was written by ingest format "
          f"{self.manifest.get('format_version')}, this bssl reads "
          f"{FORMAT_VERSION} ({FORMAT_CHANGE}): ingest again into a new "
          f"--out (`python -m bssl.ingest --input=<the same input> "
          f"--out=<new folder>`); a tags file written for the old ids must "
          f"follow the new order"
      )
    self.root, self.channels, self.class_names = root, channels, None
    self.n = int(self.manifest["num_images"])
    self.offsets = np.asarray(
        self.manifest.get("shard_offsets") or shard_offsets(root, self.manifest), np.int64
    )
    self.remote = storage.is_remote(path)
    # the host cache is keyed by what the shards hold (their content digest), never by
    # their path: an ingest redone behind the same path gets a cache of its own
    digest = self.manifest.get("content_digest") or listing.fingerprint(
        [str(root), str(self.manifest.get("input_fingerprint"))]
    )
    self.cache_dir = os.path.join(
        cache_dir or os.path.join(tempfile.gettempdir(), "bssl_shards"), digest[:32]
    )
    # sorted id arrays, not dicts: 16-24 bytes per duplicate or placeholder (at 10^9
    # images with 10% duplicates, 1.6 GB per process rather than ~10 GB of Python dict)
    empty = np.zeros(0, np.int64)
    self._dup_ids, self._dup_first = empty, empty
    if drop_duplicates:
      d = storage.read_npz(root / "duplicates.npz")
      self._dup_ids, self._dup_first = d["ids"].astype(np.int64), d["first"].astype(np.int64)
    # placeholders (one content shared by many images: dead links) are never valid
    ph = root / "placeholders.npz"
    self._ph_ids, self._ph_count, self._ph_first = empty, empty, empty
    if ph.exists():
      p = storage.read_npz(ph)
      self._ph_ids, self._ph_count, self._ph_first = p["ids"], p["count"], p["first"]
    self._local = threading.local()
    self._lock = threading.Lock()
    self._manifests: dict[int, dict] = {}
    self._meta_ids: dict[str, str] = {}
    # (record key, path) the running stage noted these images under
    # (:func:`bssl.data.images.note_images`): reading metadata notes it too (:meth:`_note`)
    self.noted_as: tuple[str, str] | None = None

  def __len__(self) -> int:
    return self.n

  def identity(self) -> str:
    """What these shards hold, as the record stores it (:func:`identity_of`)."""
    return _identity(self.root, self.manifest)

  def metadata_identity(self, group: str) -> str:
    """One metadata group of these shards (:func:`metadata_identity_of`)."""
    if group not in self._meta_ids:
      self._meta_ids[group] = _metadata_identity(self.root, self.manifest, group)
    return self._meta_ids[group]

  def _note(self, group: str) -> None:
    """Notes metadata ``group`` as an input of the running stage (``<key>:<group>``, kind
    ``shards_<group>``), when these images were noted (:attr:`noted_as`): a stage that
    reads captions or keys depends on them; one that reads only pixels does not."""
    if self.noted_as is None or not deps.active():
      return
    key, path = self.noted_as
    deps.note_input(f"{key}:{group}", f"shards_{group}", path, self.metadata_identity(group))

  def __getstate__(self):  # to decode worker processes: no open readers, no lock
    state = dict(self.__dict__)
    del state["_local"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local, self._lock = threading.local(), threading.Lock()

  def _shard_path(self, s: int) -> str:
    name = f"{shard_name(s)}.array_record"
    if not self.remote:
      return str(self.root / "shards" / name)
    local = os.path.join(self.cache_dir, name)
    if not os.path.exists(local):
      with self._lock:
        if not os.path.exists(local):
          data = (self.root / "shards" / name).read_bytes()
          storage.write_bytes(local, data)
    return local

  def _reader(self, s: int):
    readers = getattr(self._local, "readers", None)
    if readers is None:
      readers = self._local.readers = {}
    r = readers.get(s)
    if r is None:
      if len(readers) >= 4:  # a few open shards per thread; reads go in id order
        old = readers.pop(next(iter(readers)))
        old.close()
      r = readers[s] = ar.ArrayRecordReader(self._shard_path(s), "readahead_buffer_size:0")
    return r

  def locate(self, i: int) -> tuple[int, int]:
    """(shard, position in it) of id ``i``."""
    i = int(i)
    if not 0 <= i < self.n:
      raise IndexError(f"id {i} is not in [0, {self.n})")
    s = int(np.searchsorted(self.offsets, i, side="right")) - 1
    return s, i - int(self.offsets[s])

  def record_bytes(self, i: int) -> bytes:
    s, j = self.locate(i)
    return self._reader(s).read([j])[0]

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    rec = {"label": np.int32(-1), "id": np.int64(i)}
    data = (
        b""
        if _find(self._dup_ids, i) >= 0 or _find(self._ph_ids, i) >= 0
        else (self.record_bytes(i))
    )
    if data:
      try:
        return dict(rec, image=decode.decode(data, self.channels), valid=True)
      except decode.DecodeError:
        pass
    return dict(rec, image=np.zeros((1, 1, self.channels), np.uint8), valid=False)

  def _shard_manifest(self, s: int) -> dict:
    if s not in self._manifests:
      self._manifests[s] = storage.read_npz(self.root / "shards" / f"{shard_name(s)}.npz")
    return self._manifests[s]

  def name_of(self, i: int) -> str:
    s, j = self.locate(i)
    self._note("keys")
    return str(self._shard_manifest(s)["path"][j])

  def field_of(self, i: int, field: str) -> str:
    """A manifest field of id ``i``: see :meth:`fields`."""
    self.locate(i)  # (an id out of range is an IndexError)
    return str(self.fields([i], field)[0])

  def fields(self, ids, field: str) -> np.ndarray:
    """A manifest field of many ids (read shard by shard): ``key``, ``url``, ``caption`` of
    tar shards; an ingest of files has its path as ``key`` and "" for the others. Reading
    one notes its :data:`METADATA` group as an input of the running stage (:meth:`_note`)."""
    for group, cols in METADATA.items():
      if field in cols:
        self._note(group)
    ids = np.asarray(ids, np.int64)
    out = np.empty(len(ids), object)
    shard = np.searchsorted(self.offsets, ids, side="right") - 1
    for s in np.unique(shard):
      sel = shard == s
      m = self._shard_manifest(int(s))
      col = m[field] if field in m else (m["path"] if field == "key" else None)
      out[sel] = "" if col is None else col[ids[sel] - self.offsets[s]].astype(object)
    return out

  def invalid_ids(self) -> np.ndarray:
    """Sorted ids that are never valid: bad files, placeholders and (when dropped)
    duplicates."""
    bad = [
        self.offsets[s] + np.flatnonzero(self._shard_manifest(s)["reason"] != "")
        for s in range(len(self.offsets) - 1)
    ]
    return np.unique(np.concatenate(bad + [self._dup_ids, self._ph_ids]).astype(np.int64))

  def reason_of(self, i: int) -> str:
    i = int(i)
    if (k := _find(self._dup_ids, i)) >= 0:
      return f"exact duplicate of id {self._dup_first[k]} (same content hash)"
    if (k := _find(self._ph_ids, i)) >= 0:
      c, f = self._ph_count[k], self._ph_first[k]
      return (
          f"placeholder: the same content as {c - 1} other images (first id {f}), as a "
          f"dead link's placeholder is"
      )
    s, j = self.locate(i)
    return str(self._shard_manifest(s)["reason"][j]) or "cannot be decoded"
