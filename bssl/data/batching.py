"""What the image and video pipelines share (:mod:`bssl.data.pipelines`,
:mod:`bssl.data.video`): channel conversion, Pillow round trips, the counter-based hash of
random draws, grain read options, and the two batchers both build on — the training
stream (:class:`StreamBatch`) and the evaluation / scoring batch of records
(:class:`RecordsBatch`)."""

from __future__ import annotations

import threading

import grain
import numpy as np
from PIL import Image


def fix_channels(img: np.ndarray, channels: int) -> np.ndarray:
  if img.ndim == 2:
    img = img[..., None]
  if img.shape[-1] == channels:
    return img
  if img.shape[-1] == 1 and channels == 3:
    return np.repeat(img, 3, axis=-1)
  if img.shape[-1] == 3 and channels == 1:
    return np.round(img.astype(np.float32) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[
        ..., None
    ]
  raise ValueError(f"cannot convert an image with {img.shape[-1]} channels to {channels}")


def to_pil(img: np.ndarray) -> Image.Image:
  return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def from_pil(im: Image.Image, channels: int) -> np.ndarray:
  a = np.asarray(im, np.uint8)
  return a[..., None] if a.ndim == 2 else a


def mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser on uint64 arrays: a counter-based hash for random draws."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


class StreamBatch(grain.transforms.Map):
  """Global batch number -> this process's share of it, for a subclass's ``map``.

  The training stream is the concatenation of per-epoch permutations of the source
  (epoch ``e``'s permutation seeded by ``(seed, e)``); global batch ``k`` is stream
  positions ``[k*G, (k+1)*G)`` and process ``i`` of ``n`` takes positions ``i, i+n, ...``
  of it (:meth:`positions`). Random draws keyed by ``(seed, position)`` then make the
  union of the processes' batches the single-process global batch, and a resumed run at
  step ``s`` see the batches an uninterrupted one would."""

  def __init__(
      self,
      source,
      spec,
      *,
      local_batch_size: int,
      seed: int,
      process_index: int,
      process_count: int,
  ):
    self.source, self.spec, self.seed = source, spec, seed
    self.lbs, self.pi, self.pc = local_batch_size, process_index, process_count
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # grain may call map from several threads

  def __getstate__(self):  # to worker processes (num_workers): no lock, no cache
    return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_perms")}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock(), _perms={})

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        while len(self._perms) >= 4:
          self._perms.pop(min(self._perms))
        rng = np.random.default_rng([self.seed, epoch])
        self._perms[epoch] = rng.permutation(len(self.source))
      return self._perms[epoch]

  def positions(self, k) -> tuple[np.ndarray, np.ndarray]:
    """(stream positions, source indices) of this process's share of global batch ``k``."""
    g = self.lbs * self.pc
    pos = int(k) * g + np.arange(self.pi, g, self.pc, dtype=np.int64)
    n = len(self.source)
    idx = np.concatenate([self._perm(int(e))[pos[pos // n == e] % n] for e in np.unique(pos // n)])
    return pos, idx

  def map(self, k):
    raise NotImplementedError


class RecordsBatch(grain.transforms.Map):
  """Element ``j`` -> records ``[first_j, stop_j)`` of the source, written straight into
  one batch array of ``batch_size`` rows (one grain element and no second copy per
  batch). Rows past ``stop_j`` and undecodable images are blanks with ``mask == False``
  (and ``valid == False``)."""

  def __init__(self, source, spec, *, batch_size: int, bounds: np.ndarray):
    self.source, self.spec, self.lbs = source, spec, batch_size
    self.bounds = np.asarray(bounds, np.int64).reshape(-1, 2)

  def view_shape(self) -> tuple:
    """The shape of one record's view (a subclass's)."""
    raise NotImplementedError

  def view(self, record_image):
    """One record's view, or None if it cannot be made one (a subclass's)."""
    raise NotImplementedError

  def fast_rows(self, first: int, stop: int):
    """Rows ``[first, stop)`` as arrays in one gather, when the source can give them
    (``take``: in-memory sources) already in the view's shape; else None (per record)."""
    return None

  def map(self, j):
    lbs = self.lbs
    first, stop = (int(x) for x in self.bounds[int(j)])
    out = {
        "image": np.zeros((lbs,) + tuple(self.view_shape()), np.uint8),
        "label": np.full(lbs, -1, np.int32),
        "id": np.full(lbs, -1, np.int64),
        "mask": np.zeros(lbs, bool),
        "valid": np.zeros(lbs, bool),
    }
    rows = self.fast_rows(first, stop)
    if rows is not None:  # one copy of the whole batch, no per-record Python
      n = stop - first
      out["image"][:n] = rows["image"]
      out["label"][:n], out["id"][:n] = rows["label"], rows["id"]
      out["mask"][:n] = out["valid"][:n] = rows["valid"]
      return out
    for r, i in enumerate(range(first, stop)):
      rec = self.source[i]
      out["label"][r], out["id"][r] = rec["label"], rec["id"]
      img = self.view(rec["image"]) if rec.get("valid", True) else None
      if img is not None:
        out["image"][r] = img
        out["mask"][r] = out["valid"][r] = True
    return out
