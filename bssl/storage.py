"""The one way bssl reads and writes files: ``etils.epath`` (and fsspec where epath cannot
list or stat), so a work directory, an ingest or an image folder can be a local folder or
``gs://bucket/prefix`` alike.

Writes are atomic where the store allows it: on a local disk a temporary file is renamed
over the target (readers see the old or the new file, never half of one); on object
storage a single-object upload is atomic by itself. Nothing here assumes that processes
share a local disk. What lives where in a work directory is :mod:`bssl.workdir`'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode())


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
