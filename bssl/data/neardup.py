"""Near-duplicates of evaluation images in U: transformed copies (resized, cropped by up to
about 20% of the area, JPEG re-encoded down to quality ~30, flipped, colour-shifted) of
test / validation images, which a teacher labels right and a student then memorises, so
that the test accuracy is inflated.

Method: pixel correlation after alignment, in two steps.

1. **Candidates.** Every evaluation image is described by a few views (the whole image,
   the centre 90% and the four corner 90% crops), each a 16x16 grey thumbnail (box
   filter) with its mean removed and unit norm; a U image (and its mirror image) by its
   own thumbnail. The ``candidates`` evaluation images of highest cosine similarity (exact
   search: blocked matrix products) go on to step 2.
2. **Verification.** A candidate is rendered at 32x32 over a grid of crops (side 100% to
   88% of the image in 3% steps, 5x5 positions each) and compared with the U image and its
   mirror image at 32x32, both with the mean removed and unit norm; the best correlation
   over views is the pair's *similarity*. A U image whose best similarity reaches
   ``threshold`` is a near-duplicate of that evaluation image.

Why this and not a perceptual hash: a 64-bit hash of the whole image changes under a 20%
crop (its DCT coefficients move), and a learned feature (the teacher's pooled features)
is trained to map *different* images of one class together, which is the opposite of
telling a copy from a look-alike; aligning the crop explicitly makes crops, resizing and
flips exact up to interpolation, mean/norm removal makes brightness and contrast changes
exact, and JPEG at quality 30 moves a 32x32 thumbnail little. No model weights are
needed. Grey level correlation ignores hue shifts by design (a mild colour change).

Cost (|E| evaluation images, N images of U on a host, c candidates): index memory
``|E| x 6 x 256 x 4`` bytes (ImageNet val, 50k: 300 MB) plus the evaluation images as
64x64 grey thumbnails (``|E| x 4 kB``: 200 MB), plus a cache of rendered views (at most
4,096 evaluation images x 266 kB: 1.1 GB); time per U image ``2 x 6|E| x 256``
multiply-adds for step 1 (ImageNet val: 1.5e8, ~3 ms on one core) plus ``c x 2 x 65`` 32x32
correlations and ``c x 65`` renderings for step 2 (~0.4 ms per candidate). At 10^9 images
over H hosts: ``10^9 / H x (3 ms + c x 0.4 ms)`` of one core; step 1 is the part to move
to an IVF index (faiss) or the accelerator at that scale. Measured figures: docs/webdataset.md.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
from PIL import Image

COARSE = 16
FINE = 32
KEEP = 64  # side of the grey thumbnail kept per evaluation image
SIDES = (1.0, 0.97, 0.94, 0.91, 0.88)
STEPS = 5
DEFAULT_THRESHOLD = 0.95  # = score.copy_threshold's default; measured: docs/webdataset.md


def grey(img: np.ndarray) -> Image.Image:
  """A uint8 HxW, HxWx1 or HxWx3 image as a Pillow grey image."""
  a = np.asarray(img)
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[..., 0]
  im = Image.fromarray(a.astype(np.uint8))
  return im.convert("L") if im.mode != "L" else im


def _unit(a: np.ndarray) -> np.ndarray:
  a = a.reshape(len(a), -1).astype(np.float32)
  a -= a.mean(1, keepdims=True)
  return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-6)


def _coarse_views(im: Image.Image) -> np.ndarray:
  w, h = im.size
  boxes = [
      (0, 0, w, h),
      (0.05 * w, 0.05 * h, 0.95 * w, 0.95 * h),
      (0, 0, 0.9 * w, 0.9 * h),
      (0.1 * w, 0, w, 0.9 * h),
      (0, 0.1 * h, 0.9 * w, h),
      (0.1 * w, 0.1 * h, w, h),
  ]
  return _unit(
      np.stack(
          [np.asarray(im.resize((COARSE, COARSE), Image.BOX, box=b), np.float32) for b in boxes]
      )
  )


def _fine_views(im: Image.Image) -> np.ndarray:
  w, h = im.size
  out = []
  for s in SIDES:
    cw, ch = s * w, s * h
    offs = [0.0] if s == 1.0 else np.linspace(0.0, 1.0, STEPS)
    for oy in offs:
      for ox in offs:
        x0, y0 = ox * (w - cw), oy * (h - ch)
        out.append(
            np.asarray(
                im.resize((FINE, FINE), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)), np.float32
            )
        )
  return _unit(np.stack(out))


def _query(im: Image.Image):
  """(coarse [2, 256], fine [2, 1024]) of an image and its mirror image."""
  flip = im.transpose(Image.FLIP_LEFT_RIGHT)
  c = _unit(
      np.stack([np.asarray(x.resize((COARSE, COARSE), Image.BOX), np.float32) for x in (im, flip)])
  )
  f = _unit(
      np.stack([np.asarray(x.resize((FINE, FINE), Image.BILINEAR), np.float32) for x in (im, flip)])
  )
  return c, f


@dataclasses.dataclass
class Match:
  similarity: np.ndarray  # [n] float32: best similarity to any evaluation image
  index: np.ndarray  # [n] int64: position of that image in the index (-1: none)


class ThumbIndex:
  """The previous method (bssl <= 0.4: the stage of the candidates below): the evaluation images, ready to be matched against U (see the module doc). ``match``
  may be called from several threads at once (Pillow's resize and numpy's products
  release the GIL)."""

  def __init__(self, images, candidates: int = 8):
    self.candidates = int(candidates)
    thumbs, coarse = [], []
    for img in images:
      im = grey(img)
      im = im.resize((KEEP, KEEP), Image.BOX) if max(im.size) > KEEP else im
      thumbs.append(im)
      coarse.append(_coarse_views(im))
    self.thumbs = thumbs
    self.n = len(thumbs)
    self.coarse = np.concatenate(coarse) if coarse else np.zeros((0, COARSE * COARSE), np.float32)
    self._fine: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def _fine_of(self, e: int) -> np.ndarray:
    with self._lock:
      f = self._fine.get(e)
    if f is None:
      f = _fine_views(self.thumbs[e])
      with self._lock:  # a bounded cache of rendered views, shared by threads
        if len(self._fine) > 4096:
          self._fine.pop(next(iter(self._fine)))
        self._fine[e] = f
    return f

  def match(self, images, block: int = 256) -> Match:
    """The best similarity of each of ``images`` to the evaluation images."""
    images = list(images)
    sim = np.full(len(images), -1.0, np.float32)
    idx = np.full(len(images), -1, np.int64)
    if self.n == 0:
      return Match(sim, idx)
    nv = len(self.coarse) // self.n
    k = min(self.candidates, self.n)
    for a in range(0, len(images), block):
      qs = [_query(grey(x)) for x in images[a : a + block]]
      c = np.stack([q[0] for q in qs])  # [b, 2, 256]
      s = (c.reshape(-1, c.shape[-1]) @ self.coarse.T).reshape(len(qs), 2, self.n, nv)
      s = s.max(axis=(1, 3))  # [b, n]
      cand = np.argpartition(-s, k - 1, axis=1)[:, :k]
      for r, (q, cs) in enumerate(zip(qs, cand)):
        best, arg = -1.0, -1
        for e in cs:
          v = float((q[1] @ self._fine_of(int(e)).T).max())
          if v > best:
            best, arg = v, int(e)
        sim[a + r], idx[a + r] = best, arg
    return Match(sim, idx)


Index = ThumbIndex  # (being replaced by the web-copy matcher: issue 30)


def near_duplicate_pairs(images, block: int = 4096) -> np.ndarray:
  """The pairs ``(i, j)``, ``i < j``, of ``images`` that are near-duplicates of one another
  (int64 [m, 2], sorted): each image matched against the index of all of them, itself left
  out. (First version: the correlation method; the web-copy matcher replaces it.)"""
  images = list(images)
  if len(images) < 2:
    return np.zeros((0, 2), np.int64)
  index = Index(images, candidates=9)
  out = []
  for i, x in enumerate(images):
    m = _match_excluding(index, x, i)
    if m is not None:
      out.append((min(i, m), max(i, m)))
  return np.unique(np.asarray(out, np.int64).reshape(-1, 2), axis=0)


def _match_excluding(index, x, self_pos):
  q = _query(grey(x))
  nv = len(index.coarse) // index.n
  s = (q[0] @ index.coarse.T).reshape(2, index.n, nv).max(axis=(0, 2))
  s[self_pos] = -2.0
  k = min(index.candidates, index.n - 1)
  best, arg = -1.0, None
  for e in np.argpartition(-s, k - 1)[:k]:
    v = float((q[1] @ index._fine_of(int(e)).T).max())
    if v > best:
      best, arg = v, int(e)
  return arg if best >= DEFAULT_THRESHOLD else None
