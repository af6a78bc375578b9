"""Videos as data: what the video models eat (:class:`VideoSpec`), where videos come from
(a folder of files with a CSV of labels, a file list, the synthetic moving Fashion-MNIST
of the offline demo, fake clips for tests) and the grain pipelines that cut them into
clips (training: one clip at a random time, random crop and flip; evaluation and
scoring: ``num_clips`` uniformly spaced clips per video, see :mod:`bssl.data.clips`).

Records are ``{'image': uint8 [T, H, W, C], 'label', 'id'}`` (the key is the image
sources' so every view of a source - subsets, U with hidden labels, D̂ - works
unchanged); a video that cannot be decoded has ``valid == False``. Batches leave the
pipelines as ``image`` uint8 ``[b, clip_len, S, S, C]`` (training) or
``[b, num_clips, clip_len, S, S, C]`` (evaluation and scoring: the device averages the
clips' softmax into the video-level prediction, :func:`bssl.evaluation.video_probs`).

Training batches follow the image pipeline's contract (:class:`bssl.data.batching.
StreamBatch`): global batch ``k`` is positions ``[kG, (k+1)G)`` of a stream of per-epoch
permutations, process ``i`` of ``n`` takes positions ``i, i+n, ...``, and every random
draw (clip start, crop, flip) is a function of ``(seed, position)``: the union of the
processes' batches is the single-process batch, frame for frame, and a resumed run at
step ``s`` sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import os
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

from bssl import deps, storage
from bssl.data import batching, sources
from bssl.data import clips as clips_lib
from bssl.data.listing import ListingError, list_inputs
from bssl.data.sources import ArraySource, BadImageError, DataError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  """Clips of ``clip_len`` frames every ``frame_stride`` frames, ``size`` x ``size`` x
  ``channels`` uint8; ``num_clips`` uniformly spaced clips per video for evaluation and
  scoring. Training crops ``size`` x ``size`` at random from frames padded by ``pad``
  (``pad_crop*``) and mirrors half of them (``*_flip``); evaluation takes the centre crop.
  Decoded files are resized to a short side of ``round(size / crop_fraction)``."""

  size: int
  channels: int
  clip_len: int = 8
  frame_stride: int = 1
  num_clips: int = 10
  augment: str = "pad_crop_flip"
  pad: int = 0
  crop_fraction: float = 0.875

  @property
  def clip_shape(self) -> tuple[int, int, int, int]:
    return (self.clip_len, self.size, self.size, self.channels)

  @property
  def decode_short_side(self) -> int:
    return int(round(self.size / self.crop_fraction))


def is_video(spec) -> bool:
  return isinstance(spec, VideoSpec)


# ----------------------------------------------------------------------------- frames


def _frames(video: np.ndarray, spec: VideoSpec) -> np.ndarray:
  """``[T, H, W, C]`` uint8 with the spec's channels and both sides >= ``size``."""
  v = np.asarray(video, np.uint8)
  if v.ndim == 3:
    v = v[..., None]
  if v.ndim != 4 or v.shape[0] == 0:
    raise ValueError(f"a video must be [frames, height, width, channels], got {v.shape}")
  v = (
      np.stack([batching.fix_channels(f, spec.channels) for f in v])
      if v.shape[-1] != spec.channels
      else v
  )
  h, w = v.shape[1:3]
  if min(h, w) < spec.size:
    v = _resize_frames(v, spec.size)
  return v


def _resize_frames(v: np.ndarray, short_side: int) -> np.ndarray:
  h, w = v.shape[1:3]
  scale = short_side / min(h, w)
  nh, nw = max(short_side, int(round(h * scale))), max(short_side, int(round(w * scale)))
  return np.stack(
      [
          batching.from_pil(batching.to_pil(f).resize((nw, nh), Image.BILINEAR), f.shape[-1])
          for f in v
      ]
  )


def eval_clips(video: np.ndarray, spec: VideoSpec) -> np.ndarray | None:
  """The ``[num_clips, clip_len, S, S, C]`` evaluation view of one video (centre crop of
  every frame, uniformly spaced clips), or None if it cannot be made one."""
  try:
    v = _frames(video, spec)
  except ValueError:
    return None
  h, w = v.shape[1:3]
  top, left = (h - spec.size) // 2, (w - spec.size) // 2
  v = v[:, top : top + spec.size, left : left + spec.size]
  return clips_lib.clips_of(v, spec.clip_len, spec.frame_stride, spec.num_clips)


def _uniforms(positions: np.ndarray, seed: int, count: int) -> np.ndarray:
  """``[len(positions), count]`` floats in [0, 1): counter-based draws of (seed, position)."""
  with np.errstate(over="ignore"):
    key = batching.mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x632BE59BD9B4E019))
    base = np.asarray(positions, np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
    h = batching.mix64(
        (base + np.arange(count, dtype=np.uint64)[None] * np.uint64(0xD1B54A32D192ED03)) ^ key
    )
  return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def train_clip(video: np.ndarray, spec: VideoSpec, u: np.ndarray) -> np.ndarray:
  """One training clip of ``video`` from four uniforms ``u`` (start, top, left, flip)."""
  v = _frames(video, spec)
  if spec.augment != "none" and spec.pad:
    v = np.pad(v, ((0, 0), (spec.pad, spec.pad), (spec.pad, spec.pad), (0, 0)))
  t, h, w = v.shape[:3]
  last = max(t - clips_lib.span(spec.clip_len, spec.frame_stride), 0)
  start = min(int(u[0] * (last + 1)), last)
  idx = clips_lib.clip_indices(start, t, spec.clip_len, spec.frame_stride)
  if spec.augment == "none":
    top, left = (h - spec.size) // 2, (w - spec.size) // 2
  else:
    top = min(int(u[1] * (h - spec.size + 1)), h - spec.size)
    left = min(int(u[2] * (w - spec.size + 1)), w - spec.size)
  clip = v[idx, top : top + spec.size, left : left + spec.size]
  if spec.augment == "pad_crop_flip" and u[3] < 0.5:
    clip = clip[:, :, ::-1]
  return np.ascontiguousarray(clip)


def _name(source, i: int) -> str:
  name_of = getattr(source, "name_of", None)
  return name_of(i) if name_of else f"video id {i}"


class _VideoTrainBatch(batching.StreamBatch):
  """Global batch number -> this process's share of it: one random clip per video (the
  stream and its split over processes are the image pipeline's)."""

  def map(self, k):
    pos, idx = self.positions(k)
    u = _uniforms(pos, self.seed + 1, 4)
    images, labels, ids = [], [], []
    for j, i in enumerate(idx):
      rec = self.source[int(i)]
      if not rec.get("valid", True):
        reason = getattr(self.source, "reason_of", lambda i: "cannot be decoded")(int(i))
        raise BadImageError(
            f"training video {_name(self.source, int(i))} cannot be decoded "
            f"({reason}); fix or remove it from the training list"
        )
      try:
        images.append(train_clip(rec["image"], self.spec, u[j]))
      except ValueError as e:
        raise BadImageError(f"training video {_name(self.source, int(i))}: {e}") from None
      labels.append(rec["label"])
      ids.append(rec["id"])
    return {
        "image": np.stack(images),
        "label": np.asarray(labels, np.int32),
        "id": np.asarray(ids, np.int64),
    }


def train_dataset(
    source,
    spec: VideoSpec,
    *,
    local_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    start_batch: int,
    read_options,
) -> grain.IterDataset:
  return (
      grain.MapDataset.range(start_batch, 2**62)
      .map(
          _VideoTrainBatch(
              source,
              spec,
              local_batch_size=local_batch_size,
              seed=seed,
              process_index=process_index,
              process_count=process_count,
          )
      )
      .to_iter_dataset(read_options)
  )


class VideoRecordsBatch(batching.RecordsBatch):
  """Element ``j`` -> videos ``[first_j, stop_j)`` as ``[batch, num_clips, clip_len, S, S,
  C]``; rows past ``stop_j`` and undecodable videos are blanks with ``mask == False``."""

  def view_shape(self) -> tuple:
    return (self.spec.num_clips,) + self.spec.clip_shape

  def view(self, video):
    return eval_clips(video, self.spec)


# ----------------------------------------------------------------------------- decoding


def decode_video(
    path: str, short_side: int | None, channels: int = 3, max_frames: int | None = None
) -> np.ndarray:
  """Frames ``[T, H, W, C]`` uint8 of a video file (local or ``gs://``) decoded with
  PyAV, each resized to a short side of ``short_side`` (None: as stored). Raises
  ValueError (with the decoder's reason) when the file is not a decodable video."""
  import av

  fmt = "gray" if channels == 1 else "rgb24"
  frames = []
  try:
    p = storage.path(path)
    fh = p.open("rb") if storage.is_remote(p) else os.fspath(p)
    with av.open(fh) as container:
      if not container.streams.video:
        raise ValueError("no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      for frame in container.decode(stream):
        w, h = frame.width, frame.height
        if short_side:
          s = short_side / min(w, h)
          w, h = max(short_side, int(round(w * s))), max(short_side, int(round(h * s)))
        a = frame.to_ndarray(format=fmt, width=w, height=h)
        frames.append(a[..., None] if a.ndim == 2 else a)
        if max_frames and len(frames) >= max_frames:
          break
  except ValueError:
    raise
  except Exception as e:
    raise ValueError(f"{type(e).__name__}: {e}") from None
  if not frames:
    raise ValueError("no frames decoded")
  return np.stack(frames)


class _DecodingSource:
  """Shared by the file-backed sources: decode on access, remember why a file failed."""

  files: list
  labels: np.ndarray
  short_side: int | None
  channels: int
  max_frames: int | None

  def _init_decoding(self, short_side, channels, max_frames):
    self.short_side, self.channels, self.max_frames = short_side, channels, max_frames
    self._reasons: dict[int, str] = {}

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    rec = {"label": np.int32(self.labels[i]), "id": np.int64(i)}
    try:
      rec["image"] = decode_video(self.files[i], self.short_side, self.channels, self.max_frames)
    except (ValueError, OSError) as e:
      self._reasons[i] = str(e)[:300]
      rec["image"] = np.zeros((1, 1, 1, self.channels), np.uint8)
      rec["valid"] = False
    return rec

  def name_of(self, i: int) -> str:
    return self.files[int(i)]

  def reason_of(self, i: int) -> str:
    i = int(i)
    if i not in self._reasons:  # failed in another process (a decode worker): decode again
      self[i]
    return self._reasons.get(i, "cannot be made the model's input")

  # the folder a video's name in the record is taken relative to (None: the files' common
  # folder, see bssl.deps.relative_names)
  _identity_root: str | None = None

  def identity(self, content: bool = False) -> str:
    """What these videos are, as a stage's record stores it: every file by (path relative
    to the source's folder, label, content: :func:`bssl.deps.files_identity`), in id
    order; ``videos-v3``: by content (before: absolute paths, size and mtime). ``content``
    is ignored (always by content)."""
    del content
    return "videos-v3:" + deps.files_identity(self.files, self._identity_root, labels=self.labels)


def _list_videos(path: str) -> list[str]:
  """A folder's videos (recursive; local or gs://) or a file list's lines, in
  :func:`bssl.data.listing.list_inputs`' order (paths sorted as whole strings)."""
  accepted = (
      f"Accepted: a folder of video files ({', '.join(VIDEO_EXTENSIONS)}), searched "
      f"recursively, or a text file listing one video path per line."
  )
  if not path or not storage.path(path).exists():
    raise DataError(f"unlabelled.path: {path!r} does not exist. {accepted}")
  try:
    files = list_inputs(path, VIDEO_EXTENSIONS)
  except ListingError as e:
    raise DataError("unlabelled.path: " + str(e).replace("--input: ", "")) from None
  if not files:
    raise DataError(
        f"unlabelled.path: {path!r} lists no videos. Accepted: a folder of video "
        f"files ({', '.join(VIDEO_EXTENSIONS)}), searched recursively, or a text "
        f"file listing one video path per line."
    )
  return files


class VideoListSource(_DecodingSource):
  """Unlabelled videos: a folder (recursive) or a file list (one path per line, relative to
  the list's folder); ids are positions in the list of paths sorted as whole strings
  (:func:`bssl.data.listing.list_inputs`: a folder and a list of its files agree)."""

  def __init__(self, path: str, spec: VideoSpec, max_frames: int | None = None):
    self.root = path
    self.files = _list_videos(path)
    self.labels = np.full(len(self.files), -1, np.int32)
    self.class_names = None
    self._init_decoding(spec.decode_short_side, spec.channels, max_frames)


def _kinetics_name(row: dict) -> str:
  return (
      f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
  )


class VideoFolderSource(_DecodingSource):
  """Labelled videos: a CSV with a header naming either ``path`` and ``label`` columns
  (path relative to ``video_dir``, default the CSV's folder) or Kinetics' own columns
  (``label, youtube_id, time_start, time_end``: the file is ``<label>/<youtube_id>_
  <start:06d>_<end:06d>.<ext>`` or the same name without the label folder, any of the
  video extensions). Labels are class names (classes = the sorted names of the training
  CSV) or integer ids."""

  def __init__(
      self,
      csv_path: str,
      spec: VideoSpec,
      *,
      video_dir: str | None = None,
      class_names: Sequence[str] | None = None,
      field: str = "data.train_csv",
      max_frames: int | None = None,
  ):
    p = storage.path(csv_path)
    if not p.exists():
      raise DataError(
          f"{field}: no such CSV file {csv_path!r} (a header row naming 'path' "
          f"and 'label', or Kinetics' 'label,youtube_id,time_start,time_end')"
      )
    reader = csv.DictReader(p.read_text().splitlines())
    rows = list(reader)
    cols = set(reader.fieldnames or ())
    if not ({"path", "label"} <= cols or {"label", "youtube_id", "time_start", "time_end"} <= cols):
      raise DataError(
          f"{field}: {csv_path!r} lacks the columns 'path,label' (or Kinetics' "
          f"'label,youtube_id,time_start,time_end'); got columns {sorted(cols)}"
      )
    if not rows:
      raise DataError(f"{field}: {csv_path!r} has a header but no rows")
    root = storage.path(video_dir) if video_dir else p.parent
    names = [(r.get("label") or "").strip() for r in rows]
    blank = [k + 2 for k, n in enumerate(names) if not n]
    if blank:
      raise DataError(
          f"{field}: {len(blank)} row(s) of {csv_path!r} have an empty label "
          f"(line(s) {blank[:10]}); every row needs its class"
      )
    if class_names is None:
      class_names = (
          tuple(str(c) for c in range(max(int(n) for n in names) + 1))
          if all(n.isdigit() for n in names)
          else tuple(sorted(set(names)))
      )
    self.class_names = tuple(class_names)
    index = {c: k for k, c in enumerate(self.class_names)}
    labels, files, missing = [], [], []
    for r, n in zip(rows, names):
      c = index.get(n, int(n) if n.isdigit() and int(n) < len(self.class_names) else None)
      if c is None:
        raise DataError(
            f"{field}: label {n!r} of {csv_path!r} is not a class of the training "
            f"CSV ({len(self.class_names)} classes, e.g. "
            f"{list(self.class_names)[:5]})"
        )
      if "path" in r and r["path"]:
        f = root / r["path"].strip()
        candidates = [f]
      else:
        stem = _kinetics_name(r)
        candidates = [
            folder / (stem + ext) for folder in (root / n, root) for ext in VIDEO_EXTENSIONS
        ]
      found = next((str(c_) for c_ in candidates if c_.exists()), None)
      if found is None:
        missing.append(str(candidates[0]))
        continue
      labels.append(c)
      files.append(found)
    if not files:
      raise DataError(
          f"{field}: none of the {len(rows)} videos listed in {csv_path!r} exists "
          f"(e.g. {missing[:3]}); check data.video_dir (default: the CSV's folder)"
      )
    # Downloaded Kinetics sets always have gaps: listed files that do not exist are left
    # out, counted and named (Data.notes, printed at start-up); a file that exists but does
    # not decode stops training (named) and is counted in scoring.
    self.missing = missing
    self.notes = (
        [
            f"{field}: {len(missing)} of {len(rows)} listed videos do not exist and are "
            f"left out (e.g. {', '.join(missing[:3])})"
        ]
        if missing
        else []
    )
    self.files, self.labels = files, np.asarray(labels, np.int32)
    self._identity_root = str(root)  # (video_dir, else the CSV's folder)
    self._init_decoding(spec.decode_short_side, spec.channels, max_frames)

  def subset(self, indices, hide_labels: bool = False) -> VideoFolderSource:
    """Rows ``indices`` (ids become positions in the subset)."""
    idx = np.asarray(indices, np.int64)
    out = copy.copy(self)
    out.files = [self.files[int(i)] for i in idx]
    out.labels = np.full(len(idx), -1, np.int32) if hide_labels else self.labels[idx]
    out._reasons = {}
    return out


# ----------------------------------------------------------------------------- synthetic


FASHION_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIRECTIONS = ("right", "left")


class MovingFashionSource:
  """The offline video demo's clips: a Fashion-MNIST garment (resized to ``garment`` px)
  moving horizontally over a ``size`` x ``size`` black canvas for ``frames`` frames, at 1
  or 2 pixels per frame, wrapping around the canvas edges (a torus: every position is as
  likely for either direction, so no single frame tells the direction). The class is the
  garment *and* its direction: ``2 * garment + (0 right, 1 left)``, 20 classes. Start
  position, row, speed and direction are functions of ``(seed, index)``; frames are
  drawn on access. Flipping a clip horizontally would turn one class into another: the
  demo trains with ``augment='pad_crop'`` (no flip)."""

  def __init__(
      self,
      images: np.ndarray,
      garments: np.ndarray,
      *,
      frames: int,
      size: int,
      garment: int,
      seed: int,
      ids: np.ndarray | None = None,
      _resized: np.ndarray | None = None,
      _draws: np.ndarray | None = None,
  ):
    self.frames, self.size, self.garment, self.seed = int(frames), int(size), int(garment), seed
    if garment > size:
      raise DataError(f"the garment ({garment} px) must fit the canvas ({size} px)")
    if _resized is None:
      imgs = np.asarray(images, np.uint8)
      imgs = imgs[..., 0] if imgs.ndim == 4 else imgs
      _resized = (
          imgs
          if imgs.shape[1] == garment
          else np.stack(
              [
                  np.asarray(Image.fromarray(a).resize((garment, garment), Image.BILINEAR))
                  for a in imgs
              ]
          )
      )
    self._img = _resized
    n = len(self._img)
    self.ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    if _draws is None:
      u = _uniforms(np.arange(n), seed, 4)
      _draws = np.stack(
          [
              (u[:, 0] < 0.5).astype(np.int64),  # direction
              1 + (u[:, 1] < 0.5).astype(np.int64),  # speed
              (u[:, 2] * size).astype(np.int64),  # start column
              (u[:, 3] * (size - garment + 1)).astype(np.int64),
          ],
          1,
      )  # row
    self._draws = _draws
    self.garments = np.asarray(garments, np.int64)
    self.labels = (2 * self.garments + self._draws[:, 0]).astype(np.int32)
    self.class_names = tuple(f"{g} {d}" for g in FASHION_NAMES for d in DIRECTIONS)

  def __len__(self) -> int:
    return len(self._img)

  def video(self, i: int) -> np.ndarray:
    d, speed, x0, y0 = (int(v) for v in self._draws[i])
    g, s = self.garment, self.size
    canvas = np.zeros((s, s), np.uint8)
    canvas[y0 : y0 + g, :g] = self._img[i]
    step = speed if d == 0 else -speed
    out = np.stack([np.roll(canvas, x0 + step * t, axis=1) for t in range(self.frames)])
    return out[..., None]

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    return {"image": self.video(i), "label": self.labels[i], "id": self.ids[i]}

  def subset(self, indices, hide_labels: bool = False) -> MovingFashionSource:
    idx = np.asarray(indices, np.int64)
    out = MovingFashionSource(
        None,
        self.garments[idx],
        frames=self.frames,
        size=self.size,
        garment=self.garment,
        seed=self.seed,
        ids=self.ids[idx],
        _resized=self._img[idx],
        _draws=self._draws[idx],
    )
    if hide_labels:
      out.labels = np.full(len(idx), -1, np.int32)
    return out


def moving_fashion_mnist(folder: str | None, *, frames: int, size: int, garment: int):
  """(train, test) of the synthetic video demo, from Fashion-MNIST's idx files."""
  p = sources.find_fashion_mnist(folder)
  kw = dict(frames=frames, size=size, garment=garment)
  return moving_fashion_split(p, "train", **kw), moving_fashion_split(p, "test", **kw)


def moving_fashion_split(
    paths: dict[str, str], split: str, *, frames: int, size: int, garment: int
) -> MovingFashionSource:
  """Split ``train`` or ``test`` of the synthetic video demo, from the idx files ``paths``
  (:func:`bssl.data.sources.find_fashion_mnist`'s)."""
  src = sources.fashion_mnist_split(paths, split)
  seed = {"train": 11, "test": 12}[split]
  return MovingFashionSource(
      src.images, src.labels, frames=frames, size=size, garment=garment, seed=seed
  )


def fake_videos(num: int, spec: VideoSpec, frames: int, num_classes: int, seed: int) -> ArraySource:
  """Deterministic fake videos ``[frames, S, S, C]`` (tests): each class its own pattern."""
  return sources.fake_source(num, (frames, spec.size, spec.size, spec.channels), num_classes, seed)
