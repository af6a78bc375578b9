"""Transformed copies of evaluation images, and photo-like synthetic scenes with
look-alikes: the measurement of :mod:`bssl.data.neardup` (tests, benchmarks/neardup.py)
and the demo's planted U."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance


def transform(
    img: np.ndarray,
    rng: np.random.Generator,
    out_size: int | None = None,
    min_area: float = 0.8,
    min_quality: int = 30,
) -> np.ndarray:
  """A near-duplicate of ``img`` (uint8 HxW[xC]): a random crop of ``min_area``..100% of
  the area (aspect 0.9..1.1), resized to ``out_size`` (default: the original size),
  mirrored with probability 1/2, brightness, contrast and (colour images) saturation
  x0.85..1.15, JPEG-encoded at quality ``min_quality``..``min_quality + 20``."""
  a = np.asarray(img)
  grey = a.ndim == 2 or a.shape[2] == 1
  im = Image.fromarray(a[..., 0] if a.ndim == 3 and grey else a)
  w, h = im.size
  area = rng.uniform(min_area, 1.0)
  ar = rng.uniform(0.9, 1.1)
  ch = min(h, np.sqrt(area * h * w / ar))
  cw = min(w, area * h * w / ch)
  y0, x0 = rng.uniform(0, h - ch), rng.uniform(0, w - cw)
  size = (out_size, out_size) if out_size else (w, h)
  im = im.resize(size, Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
  if rng.random() < 0.5:
    im = im.transpose(Image.FLIP_LEFT_RIGHT)
  im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.85, 1.15))
  im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.85, 1.15))
  if not grey:
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.85, 1.15))
  buf = io.BytesIO()
  im.save(buf, "JPEG", quality=int(rng.integers(min_quality, min_quality + 21)))
  out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L" if grey else "RGB"))
  return out[..., None] if grey and a.ndim == 3 else out


def scene(seed: int, size: int = 96, family: int | None = None) -> np.ndarray:
  """A photo-like synthetic image (RGB uint8): a colour gradient, 4-7 shaded shapes, fine
  texture. Scenes of one ``family`` share the background and two of the shapes (look-alikes,
  as two photos of one place are)."""
  fam = np.random.default_rng([family if family is not None else seed, 1])
  own = np.random.default_rng([seed, 2])
  c0, c1 = fam.integers(0, 256, 3), fam.integers(0, 256, 3)
  t = np.linspace(0, 1, size)[None, :, None]
  ang = fam.uniform(0, 1)
  g = (1 - ang) * t + ang * np.linspace(0, 1, size)[:, None, None]
  img = Image.fromarray(((1 - g) * c0 + g * c1).astype(np.uint8))
  d = ImageDraw.Draw(img)

  def shape(r):
    x0, y0 = r.uniform(-0.1, 0.8, 2) * size
    w, h = r.uniform(0.15, 0.5, 2) * size
    col = tuple(int(v) for v in r.integers(0, 256, 3))
    (d.ellipse if r.random() < 0.5 else d.rectangle)((x0, y0, x0 + w, y0 + h), fill=col)

  for _ in range(2):
    shape(fam)
  for _ in range(int(own.integers(2, 6))):
    shape(own)
  a = np.asarray(img, np.int16) + own.integers(-12, 13, (size, size, 3))
  return np.clip(a, 0, 255).astype(np.uint8)
