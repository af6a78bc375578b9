"""Every artifact path, and the one way bssl reads and writes files: ``etils.epath``, so a
work directory can be a local folder or ``gs://bucket/prefix`` alike.

Writes are atomic where the store allows it: on a local disk a temporary file is renamed
over the target (readers see the old or the new file, never half of one); on object
storage a single-object upload is atomic by itself. Nothing here assumes that processes
share a local disk: only the work directory is shared.

Layout (``<stage>`` is any stage of the engine's table)::

  config.json                 the resolved config of the last accepted run
  splits.json                 which training images are D, validation and U
  <stage>/started.json        the input stages and backend the partial state belongs to
  <stage>/reads/p<i>.json     what process i of a started stage has read so far (bssl.deps)
  <stage>/done.json           written last: the stage is complete (info + the record of
                              every config field and input it read, bssl.deps)
  <stage>/...                 the stage's own artifact (final/, checkpoints/, parts/, dhat/)
"""

from __future__ import annotations

import io
import json
import os
import uuid
import zipfile
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


def path(p: PathLike) -> epath.Path:
  """An epath for ``p``; local paths are made absolute, URLs (``gs://``) kept as they are."""
  s = os.fspath(p)
  return epath.Path(s if is_remote(s) else os.path.abspath(s))


def is_remote(p: PathLike) -> bool:
  return "://" in os.fspath(p)


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (set, tuple)):
    return list(o)
  return str(o)


def to_json(obj: Any) -> str:
  return json.dumps(obj, indent=2, sort_keys=True, default=_json_default)


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


def exists(p: PathLike) -> bool:
  return path(p).exists()


class CorruptArtifactError(ValueError):
  """A file in the work directory cannot be read back."""


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


def rmtree(p: PathLike) -> None:
  p = path(p)
  if p.exists():
    p.rmtree()


def listdir(p: PathLike) -> list[str]:
  p = path(p)
  return sorted(c.name for c in p.iterdir()) if p.exists() else []


class Workdir:
  """The work directory of one run: where each stage's artifacts live."""

  def __init__(self, root: PathLike):
    self.root = path(root)

  def __str__(self) -> str:
    return os.fspath(self.root)

  def stage(self, name: str) -> epath.Path:
    return self.root / name

  def done_path(self, name: str) -> epath.Path:
    return self.stage(name) / "done.json"

  def started_path(self, name: str) -> epath.Path:
    return self.stage(name) / "started.json"

  def done(self, name: str) -> dict | None:
    """The stage's done.json, or None when the stage is not complete."""
    p = self.done_path(name)
    return read_json(p) if p.exists() else None

  def started(self, name: str) -> dict | None:
    p = self.started_path(name)
    return read_json(p) if p.exists() else None

  @property
  def config_path(self) -> epath.Path:
    return self.root / "config.json"

  @property
  def splits_path(self) -> epath.Path:
    return self.root / "splits.json"

  def check_usable(self) -> None:
    """Raises NotADirectoryError when the work directory names an existing file."""
    if self.root.exists() and not self.root.is_dir():
      raise NotADirectoryError(
          f"--workdir={self.root} is an existing file, not a directory; "
          f"accepted: a new or existing folder, local or gs://"
      )
