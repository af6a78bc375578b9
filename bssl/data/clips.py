"""Clip sampling for video (the paper's video recipe): training clips at random times,
evaluation and scoring with N uniformly spaced clips per video whose softmax predictions
are averaged into the video-level prediction.

A clip is ``clip_len`` frames taken every ``frame_stride`` frames, so it spans
``span = (clip_len - 1) * frame_stride + 1`` frames. A video shorter than the span is
looped (frame indices modulo its length), as is common for short Kinetics videos.
"""

from __future__ import annotations

import numpy as np


def span(clip_len: int, frame_stride: int) -> int:
  return (int(clip_len) - 1) * int(frame_stride) + 1


def uniform_starts(num_frames: int, clip_len: int, frame_stride: int, num_clips: int) -> np.ndarray:
  """Start frames of ``num_clips`` clips spaced uniformly over the video: the first at 0,
  the last ending on the last frame (when the video is longer than one clip), equal gaps
  (rounded down) between them."""
  if num_frames <= 0 or clip_len <= 0 or frame_stride <= 0 or num_clips <= 0:
    raise ValueError(
        f"num_frames, clip_len, frame_stride and num_clips must be positive, "
        f"got {num_frames}, {clip_len}, {frame_stride}, {num_clips}"
    )
  last = max(int(num_frames) - span(clip_len, frame_stride), 0)
  if num_clips == 1:
    return np.asarray([last // 2], np.int64)
  return np.floor(np.linspace(0, last, int(num_clips))).astype(np.int64)


def random_start(
    num_frames: int, clip_len: int, frame_stride: int, rng: np.random.Generator
) -> int:
  """A training clip's start frame, uniform over the starts that fit in the video."""
  last = max(int(num_frames) - span(clip_len, frame_stride), 0)
  return int(rng.integers(0, last + 1))


def clip_indices(start: int, num_frames: int, clip_len: int, frame_stride: int) -> np.ndarray:
  """Frame indices of the clip starting at ``start`` (looped when the video is short)."""
  return (int(start) + np.arange(int(clip_len)) * int(frame_stride)) % int(num_frames)


def clips_of(video: np.ndarray, clip_len: int, frame_stride: int, num_clips: int) -> np.ndarray:
  """``[num_clips, clip_len, H, W, C]``: the uniformly spaced clips of one video
  ``[T, H, W, C]``."""
  t = video.shape[0]
  idx = np.stack(
      [
          clip_indices(s, t, clip_len, frame_stride)
          for s in uniform_starts(t, clip_len, frame_stride, num_clips)
      ]
  )
  return video[idx]


def clip_logits(apply_fn, clips):
  """The logits ``[B, N, num_classes]`` (float32) of a batch of videos' clips ``[B, N, T, H,
  W, C]``, for scoring: the video-level ranking score is computed from them in log space
  (:func:`bssl.scoring.video_top_log_odds`), since the averaged float32 softmax of
  :func:`video_level_probs` saturates at 1.0 for confident videos. Like it, the clips go
  through ``apply_fn`` one clip index at a time (a scan over N): device memory holds one
  clip of every video at once, plus the logits."""
  import jax
  import jax.numpy as jnp

  def logits(x):
    return apply_fn(x).astype(jnp.float32)

  first = logits(clips[:, 0])
  if clips.shape[1] == 1:
    return first[:, None]
  rest = jnp.moveaxis(clips[:, 1:], 1, 0)
  _, more = jax.lax.scan(lambda carry, x: (carry, logits(x)), None, rest)
  return jnp.concatenate([first[:, None], jnp.moveaxis(more, 0, 1)], axis=1)


def video_level_probs(apply_fn, clips):
  """Video-level prediction of a batch of videos' clips ``[B, N, T, H, W, C]``: the mean
  over the N clips of each clip's softmax, computed on the device (jit-able). The clips
  go through ``apply_fn`` (clips ``[B, T, H, W, C]`` -> logits) one clip index at a time
  (a scan over N), so device memory holds one clip of every video at once, not N."""
  import jax
  import jax.numpy as jnp

  def probs(x):
    return jax.nn.softmax(apply_fn(x).astype(jnp.float32), axis=-1)

  n = clips.shape[1]
  first = probs(clips[:, 0])
  if n == 1:
    return first
  rest = jnp.moveaxis(clips[:, 1:], 1, 0)
  total, _ = jax.lax.scan(lambda acc, x: (acc + probs(x), None), first, rest)
  return total / n
