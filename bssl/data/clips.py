"""Clip sampling for video (the paper's video recipe): training clips at random times,
evaluation and scoring with N uniformly spaced clips per video whose softmax predictions
are averaged into the video-level prediction (on the device: :mod:`bssl.ranking`).

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
