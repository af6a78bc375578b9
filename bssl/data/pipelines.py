"""grain pipelines: training (shuffle, augment, batch, one shard per process),
evaluation (every example exactly once: the last batch is padded and masked) and
scoring (every image of U once, carrying its id; resumable from a batch offset).

Records leave the pipelines as numpy batches ``{'image': uint8 [b,H,W,C],
'label': int32 [b], 'id': int64 [b], 'mask': bool [b]}`` where ``b`` is this
process's share of the global batch; normalisation happens on the device.
"""

from __future__ import annotations

import dataclasses
import signal

import grain
import numpy as np
from absl import flags
from PIL import Image

from bssl import procs
from bssl.data import batching
from bssl.data import video as video_lib
from bssl.data.sources import BadImageError


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """What the model eats: ``size`` x ``size`` x ``channels`` uint8 images."""

  size: int
  channels: int
  augment: str = "pad_crop_flip"
  eval_transform: str = "none"
  pad: int = 2  # for pad_crop_flip
  crop_fraction: float = 0.875  # for resize_center_crop


def resize_center_crop(img: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
  h, w = img.shape[:2]
  if (h, w) == (size, size):
    return img
  short = int(round(size / crop_fraction))
  scale = short / min(h, w)
  nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
  top, left = (nh - size) // 2, (nw - size) // 2
  if (nh, nw) == (h, w):  # already at the working size (ingested shards): crop only
    return np.ascontiguousarray(img[top : top + size, left : left + size])
  im = batching.to_pil(img).resize((nw, nh), Image.BILINEAR)
  return batching.from_pil(im.crop((left, top, left + size, top + size)), img.shape[-1])


def _crop_box(
    h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
  """Inception-style crop (top, left, height, width): random area fraction and aspect
  ratio, ten tries, then a central square."""
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  ch = cw = min(h, w)
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(
    img: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    flip: bool = False,
) -> np.ndarray:
  """Inception-style crop: random area fraction and aspect ratio, resized to ``size``;
  with ``flip``, mirrored with probability 1/2 (one more draw after the crop's). The
  mirror is Pillow's (62 us at 224 px against 500 us for numpy's reversed-stride copy)."""
  top, left, ch, cw = _crop_box(*img.shape[:2], rng, scale, ratio)
  # the crop taken in numpy (a view): Pillow then copies only the crop, not the image
  im = batching.to_pil(img[top : top + ch, left : left + cw]).resize((size, size), Image.BILINEAR)
  if flip and rng.random() < 0.5:
    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return batching.from_pil(im, img.shape[-1])


def eval_image(img: np.ndarray, spec: ImageSpec) -> np.ndarray | None:
  """The evaluation/scoring view of an image, or None if it cannot be made one."""
  try:
    img = batching.fix_channels(np.asarray(img, np.uint8), spec.channels)
  except ValueError:
    return None
  if spec.eval_transform == "resize_center_crop":
    img = resize_center_crop(img, spec.size, spec.crop_fraction)
  elif img.shape[:2] != (spec.size, spec.size):
    # 'none' is for sources already at the model's size; an image of another size is
    # still an image: short side to the model's size, centre crop (not a "bad image")
    img = resize_center_crop(img, spec.size, 1.0)
  if img.shape != (spec.size, spec.size, spec.channels):
    return None
  return img


def random_resized_crop_flip(
    img: np.ndarray, spec: ImageSpec, rng: np.random.Generator
) -> np.ndarray:
  """The ImageNet-scale training view of one image of any size (fixed-size images take
  the batched pad-crop-flip of :class:`ImageTrainBatch` instead)."""
  img = random_resized_crop(
      batching.fix_channels(np.asarray(img, np.uint8), spec.channels), spec.size, rng, flip=True
  )
  if img.shape != (spec.size, spec.size, spec.channels):
    raise BadImageError(
        f"training image has shape {img.shape}, expected "
        f"{(spec.size, spec.size, spec.channels)}"
    )
  return img


class _TrainTransform(grain.transforms.RandomMap):
  """Per-record augmentation (random-resized crop: images of any size, PIL per image)."""

  def __init__(self, spec: ImageSpec):
    self.spec = spec

  def random_map(self, rec, rng: np.random.Generator):
    if not rec.get("valid", True):
      raise BadImageError(f"training image id {int(rec['id'])} cannot be decoded")
    return {
        "image": random_resized_crop_flip(rec["image"], self.spec, rng),
        "label": np.asarray(rec["label"], np.int32),
        "id": np.int64(rec["id"]),
    }


def pad_crop_flip_draws(positions: np.ndarray, seed: int, pad: int):
  """The (dy, dx, flip) of each stream position: a pure function of (seed, position),
  so any process computes the same draws for the same element."""
  with np.errstate(over="ignore"):
    key = batching.mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x9E3779B97F4A7C15))
    h = batching.mix64(np.asarray(positions, np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ key)
  n = np.uint64(2 * pad + 1)
  dy = (h % n).astype(np.int64)
  dx = ((h >> np.uint64(20)) % n).astype(np.int64)
  flip = ((h >> np.uint64(40)) & np.uint64(1)).astype(bool)
  return dy, dx, flip


def pad_crop_flip_batch(images: np.ndarray, dy, dx, flip, pad: int) -> np.ndarray:
  """[B,S,S,C] uint8 -> each image zero-padded by ``pad``, cropped at (dy, dx) and
  mirrored where ``flip``: one gather for the whole batch."""
  b, s = images.shape[0], images.shape[1]
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ar = np.arange(s)
  rows = dy[:, None] + ar  # [B,S]
  cols = np.where(flip[:, None], s - 1 - ar, ar) + dx[:, None]  # [B,S]
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


class ImageTrainBatch(batching.StreamBatch):
  """Global batch number -> this process's share of it, augmented (fixed-size images):
  the stream of :class:`bssl.data.batching.StreamBatch`; pad-crop-flip draws are a
  function of ``(seed, position)``, so the union of the processes' batches is the
  single-process global batch, pixel for pixel. One grain element per batch and one numpy
  gather for its augmentation: the per-record path costs ~250 us of Python per image, as
  much CPU as a demo train step leaves free."""

  def _image(self, rec) -> np.ndarray:
    if not rec.get("valid", True):
      raise BadImageError(f"training image id {int(rec['id'])} cannot be decoded")
    spec = self.spec
    img = batching.fix_channels(np.asarray(rec["image"], np.uint8), spec.channels)
    # both sides: an image as tall as the model's input but wider (or narrower) is still
    # to be made square
    if spec.eval_transform == "resize_center_crop" or img.shape[:2] != (spec.size, spec.size):
      img = resize_center_crop(img, spec.size, spec.crop_fraction)
    if img.shape != (spec.size, spec.size, spec.channels):
      raise BadImageError(
          f"training image id {int(rec['id'])} has shape {img.shape}, "
          f"expected {(spec.size, spec.size, spec.channels)}"
      )
    return img

  def map(self, k):
    pos, idx = self.positions(k)
    recs = [self.source[int(i)] for i in idx]
    images = np.stack([self._image(r) for r in recs])
    if self.spec.augment != "none":
      pad = self.spec.pad
      dy, dx, flip = pad_crop_flip_draws(pos, self.seed + 1, pad)
      if self.spec.augment == "pad_crop":
        flip = np.zeros_like(flip)
      images = pad_crop_flip_batch(images, dy, dx, flip, pad)
    return {
        "image": images,
        "label": np.array([r["label"] for r in recs], np.int32),
        "id": np.array([r["id"] for r in recs], np.int64),
    }


def train_dataset(
    source,
    spec: ImageSpec,
    *,
    local_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 1,
    prefetch: int = 4,
    start_batch: int = 0,
    num_workers: int = 0,
) -> grain.IterDataset:
  """Infinite shuffled, augmented batches of this process's shard.

  The permutation is global (same seed on every process) and process ``i`` takes
  positions ``i, i+n, ...``, so the union of the processes' local batches is exactly
  the global batch of a single-process run (same images, same augmentation). Fixed-size
  images (pad-crop-flip, none) go through :class:`ImageTrainBatch`, one grain element per
  batch; random-resized crops (images of any size) through a per-record map. The
  stream starts at global batch ``start_batch`` (a resumed run at step ``start_batch``
  sees exactly the batches an uninterrupted one would, whatever the process count); the
  iterators also support ``get_state``/``set_state``. ``num_workers`` > 0 makes the
  batches in that many worker processes (grain ``mp_prefetch``; the same batches in the
  same order: :func:`worker_processes`).
  """
  if len(source) == 0:
    raise ValueError("cannot train on an empty data set")
  if video_lib.is_video(spec):  # one clip per video at a random time (bssl/data/video.py)
    return worker_processes(
        video_lib.train_dataset(
            source,
            spec,
            local_batch_size=local_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            start_batch=start_batch,
            read_options=batching.read_options(read_threads(num_threads, num_workers), prefetch),
        ),
        num_workers,
    )
  if spec.augment == "random_resized_crop_flip":
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    # Augment before sharding: each element's random stream is keyed by its position in
    # the global stream, so the global batch is the same whatever the number of hosts.
    ds = ds.random_map(_TrainTransform(spec), seed=seed + 1)
    if process_count > 1:
      ds = ds[process_index::process_count]
    ds = ds.batch(local_batch_size, drop_remainder=True)[start_batch:]
  else:
    ds = grain.MapDataset.range(start_batch, 2**62).map(
        ImageTrainBatch(
            source,
            spec,
            local_batch_size=local_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )
    )
  return worker_processes(
      ds.to_iter_dataset(batching.read_options(read_threads(num_threads, num_workers), prefetch)),
      num_workers,
  )


def resolve_workers(num_workers: int) -> int:
  """``num_workers`` (config ``num_workers``, ``score.num_workers``), with -1 = the cores
  this process may use, minus one (its own): 11 in a Slurm task of 12 CPUs."""
  if num_workers >= 0:
    return num_workers
  return procs.num_cores() - 1


def read_threads(num_threads: int, num_workers: int) -> int:
  """Read threads per process, or per worker process when there are workers (then one:
  the workers are the parallelism)."""
  return 1 if resolve_workers(num_workers) > 0 else num_threads


def _ignore_sigterm(worker_index: int, worker_count: int) -> None:
  """In each worker process: a SIGTERM sent to the whole process group (Slurm's
  ``--signal``, a VM's shutdown) leaves the workers running, so the main process can
  finish its step and save its checkpoint; they end with it (daemons)."""
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_processes(it: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  """``it`` made in ``num_workers`` worker processes (no GIL between them; grain
  ``mp_prefetch``: worker ``w`` makes elements ``w, w + n, ...`` and they come back in
  order, so the stream is the one of ``num_workers`` = 0); ``it`` itself for 0; -1: see
  :func:`resolve_workers`. Workers ignore SIGTERM (:func:`_ignore_sigterm`)."""
  num_workers = resolve_workers(num_workers)
  if num_workers <= 0:
    return it
  if not flags.FLAGS.is_parsed():  # grain reads its absl flags (library use, tests)
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
      worker_init_fn=_ignore_sigterm,
  )


class ImageRecordsBatch(batching.RecordsBatch):
  """:class:`bssl.data.batching.RecordsBatch` of images: each record's evaluation view."""

  def view_shape(self) -> tuple:
    """The shape of one record's evaluation view."""
    return (self.spec.size, self.spec.size, self.spec.channels)

  def view(self, image):
    """One record's evaluation view, or None if it cannot be made one."""
    return eval_image(image, self.spec)

  def fast_rows(self, first: int, stop: int):
    take = getattr(self.source, "take", None)
    if take is None or self.spec.eval_transform != "none":
      return None
    rows = take(np.arange(first, stop))
    if rows is None or rows["image"].shape[1:] != self.view_shape():
      return None  # another size or channel count: each record's own view
    return rows


def _records_dataset(source, spec, batch_size, bounds, num_threads, prefetch, num_workers=0):
  bounds = np.asarray(bounds, np.int64).reshape(-1, 2)
  batcher = video_lib.VideoRecordsBatch if video_lib.is_video(spec) else ImageRecordsBatch
  ds = grain.MapDataset.range(len(bounds)).map(
      batcher(source, spec, batch_size=batch_size, bounds=bounds)
  )
  return worker_processes(
      ds.to_iter_dataset(batching.read_options(read_threads(num_threads, num_workers), prefetch)),
      num_workers,
  )


def range_batches(start: int, stop: int, batch_size: int) -> np.ndarray:
  """``[first, stop)`` bounds [n, 2] of the batches that cover records ``[start, stop)``."""
  firsts = np.arange(start, stop, batch_size, dtype=np.int64)
  return np.stack([firsts, np.minimum(firsts + batch_size, stop)], axis=1).reshape(-1, 2)


def ranges_dataset(
    source,
    spec: ImageSpec,
    *,
    batch_size: int,
    bounds,
    num_threads: int = 1,
    prefetch: int = 4,
    num_workers: int = 0,
) -> grain.IterDataset:
  """Batches of explicit record ranges (``bounds`` [n, 2], each at most ``batch_size``
  long), in order: the scoring input, where each process reads its own chunks of U.
  ``num_workers`` > 0 decodes in that many worker processes (grain ``mp_prefetch``; -1:
  :func:`resolve_workers`), each with one read thread."""
  return _records_dataset(source, spec, batch_size, bounds, num_threads, prefetch, num_workers)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  return max(1, -(-num_examples // global_batch_size))


def eval_dataset(
    source,
    spec: ImageSpec,
    *,
    local_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    start_batch: int = 0,
    num_threads: int = 1,
    prefetch: int = 4,
) -> grain.IterDataset:
  """Every record exactly once, in order, padded to whole global batches.

  Global batch ``b`` holds records ``[b*G, (b+1)*G)`` with ``G = local_batch_size *
  process_count``; process ``i`` holds the ``i``-th contiguous slice of it. Padding and
  undecodable images have ``mask == False`` (and ``valid == False``). ``start_batch``
  skips batches already consumed.
  """
  n = len(source)
  nb = num_eval_batches(n, local_batch_size * process_count)
  firsts = (
      np.arange(min(start_batch, nb), nb, dtype=np.int64) * local_batch_size * process_count
      + process_index * local_batch_size
  )
  bounds = np.stack([np.minimum(firsts, n), np.minimum(firsts + local_batch_size, n)], axis=1)
  return _records_dataset(source, spec, local_batch_size, bounds, num_threads, prefetch)
