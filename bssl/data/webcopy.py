"""Copies of an image as people re-posting it on the web make them: a meme caption band,
text or a sticker laid over it, letterboxing, padding to a square, a strong crop, a
stretch, a small rotation or a perspective change, heavy JPEG, down-scaling, strong colour
changes, grey and mirrored, blurred or sharpened. The families follow those of AugLy, the
library that made the Image Similarity Challenge 2021's copies (DISC21), written here with
Pillow and OpenCV; each is drawn at the hard end of its range. The measurement of
:mod:`bssl.data.neardup` on them: benchmarks/webcopies.py; the demo's plain copies:
:mod:`bssl.data.planted`.

``web_copy(img, family, rng)`` makes one copy of a uint8 HxWx3 (or HxW) image and returns a
uint8 HxWx3 image; ``combo(img, rng)`` applies two different families, one after the other.
Parameters of each family (h, w: the image's height and width):

- ``caption``: a white or black band of 15-25% of h added on top (the image kept whole
  below it, so h grows by the band) with one or two lines of words in it.
- ``text``: 1-3 lines of random words in a random colour, size and place (some with an
  outline), their box covering 10-30% of the image.
- ``sticker``: a drawn emoji face, star, heart or label (with a white outline) over 10-25%
  of the area, anywhere inside the image.
- ``letterbox``: bars (black, else a random colour) that bring the image to 16:9, 1.85:1,
  2.35:1, 4:3 or 9:16, whichever is at least 1.3x away from its own aspect.
- ``pad_square``: padded to a square in a random colour, after a stretch of 1.2-1.5x (always
  when the image is already near square, else with probability 1/2).
- ``crop``: a crop of 60-62% of the area, aspect within 0.8-1.25x of the image's, anywhere.
- ``aspect``: stretched in width or in height by 1.3-1.5x.
- ``rotate``: 5-10 degrees either way, the corners filled (black, white or a random colour)
  or the image cropped to the largest upright rectangle inside the rotated one.
- ``perspective``: each corner moved by 8-15% of the side in a random direction, the result
  on the bounding box of the new corners, the outside black or white.
- ``jpeg``: JPEG at quality 10-20.
- ``downscale``: resized to 0.28-0.32x of its side (kept that small).
- ``color``: brightness, contrast and saturation each x0.5-0.75 or x1.25-1.5, hue turned by
  18-72 degrees either way.
- ``grey_mirror``: grey levels, mirrored left-right.
- ``blur``: Gaussian, sigma 1.5-3 per 256 pixels of the longer side (at least 1).
- ``sharpen``: unsharp mask of radius 2-4, 150-300%.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

FAMILIES = (
    "caption",
    "text",
    "sticker",
    "letterbox",
    "pad_square",
    "crop",
    "aspect",
    "rotate",
    "perspective",
    "jpeg",
    "downscale",
    "color",
    "grey_mirror",
    "blur",
    "sharpen",
)

_WORDS = (
    "when your code finally works me trying to explain this to my mom nobody absolutely no "
    "one literally every single time that moment monday again weekend vibes best day ever "
    "look at this unbelievable wait for it you had one job mood same energy true story "
    "plot twist cannot even so proud of this new record big news breaking sale today only "
    "follow for more link in bio summer winter throwback repost credit original"
).split()


def _rgb(img: np.ndarray) -> np.ndarray:
  a = np.asarray(img)
  if a.ndim == 2:
    a = a[..., None]
  if a.shape[2] == 1:
    a = np.repeat(a, 3, axis=2)
  return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
  return tuple(int(v) for v in rng.integers(0, 256, 3))


def _font(size: float) -> ImageFont.FreeTypeFont:
  return ImageFont.load_default(size=max(6, int(size)))


def _words(rng: np.random.Generator, n: int) -> str:
  return " ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), n))


def _fit(draw: ImageDraw.ImageDraw, text: str, size: float, width: float) -> ImageFont.FreeTypeFont:
  """The font of ``size`` pixels, smaller if ``text`` would be wider than ``width``."""
  font = _font(size)
  tw = draw.textlength(text, font=font)
  return _font(size * width / tw) if tw > width else font


def caption(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  a = _rgb(img)
  h, w = a.shape[:2]
  band = max(4, int(round(rng.uniform(0.15, 0.25) * h)))
  white = rng.random() < 0.5
  bg, fg = ((255, 255, 255), (0, 0, 0)) if white else ((0, 0, 0), (255, 255, 255))
  top = Image.new("RGB", (w, band), bg)  # drawn apart: no letter reaches the image
  d = ImageDraw.Draw(top)
  lines = [_words(rng, int(rng.integers(2, 6))) for _ in range(int(rng.integers(1, 3)))]
  size = 0.8 * band / len(lines)
  y = 0.1 * band
  for line in lines:
    font = _fit(d, line, size, 0.95 * w)
    tw = d.textlength(line, font=font)
    d.text(((w - tw) / 2, y), line, fill=fg, font=font)
    y += size
  return np.concatenate([np.asarray(top), a], axis=0)


def text(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  a = _rgb(img)
  h, w = a.shape[:2]
  im = Image.fromarray(a)
  d = ImageDraw.Draw(im)
  lines = [_words(rng, int(rng.integers(2, 5))) for _ in range(int(rng.integers(1, 4)))]
  target = rng.uniform(0.1, 0.3) * h * w  # the area of the text's box
  stroke = rng.random() < 0.5

  def box(size):  # the text's box (width, height) at font ``size``
    font = _font(size)
    bw = max(d.textlength(x, font=font) for x in lines)
    return font, bw, len(lines) * size * 1.1

  s = 0.1 * h
  for _ in range(3):  # the box scales as size^2: solve, bounded by the image
    _, bw, bh = box(s)
    s = min(s * np.sqrt(target / (bw * bh)), s * 0.98 * w / bw, s * 0.98 * h / bh)
  font, bw, bh = box(s)
  x0 = rng.uniform(0, max(1.0, w - bw))
  y0 = rng.uniform(0, max(1.0, h - bh))
  fill = _colour(rng)
  for i, line in enumerate(lines):
    d.text(
        (x0, y0 + i * s * 1.1),
        line,
        fill=fill,
        font=font,
        stroke_width=max(1, int(s / 12)) if stroke else 0,
        stroke_fill=(0, 0, 0) if sum(fill) > 384 else (255, 255, 255),
    )
  return np.asarray(im)


def _star(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
  t = np.arange(2 * points) * np.pi / points - np.pi / 2
  rad = np.where(np.arange(2 * points) % 2 == 0, r, 0.45 * r)
  return list(zip(cx + rad * np.cos(t), cy + rad * np.sin(t)))


def sticker(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  a = _rgb(img)
  h, w = a.shape[:2]
  frac = rng.uniform(0.1, 0.25)
  side = min(np.sqrt(frac * h * w), 0.98 * min(h, w))  # the sticker's square
  x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
  layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
  d = ImageDraw.Draw(layer)
  cx, cy, r = x0 + side / 2, y0 + side / 2, side / 2
  kind = int(rng.integers(0, 4))
  line = max(1, int(side / 25))
  if kind == 0:  # an emoji face
    face = (255, int(rng.integers(180, 230)), 0, 255)
    d.ellipse(
        (x0, y0, x0 + side, y0 + side),
        fill=face,
        outline=(120, 70, 0, 255),
        width=line,
    )
    for ex in (cx - 0.35 * r, cx + 0.35 * r):
      d.ellipse(
          (ex - 0.12 * r, cy - 0.45 * r, ex + 0.12 * r, cy - 0.05 * r),
          fill=(60, 30, 0, 255),
      )
    d.arc(
        (cx - 0.55 * r, cy - 0.4 * r, cx + 0.55 * r, cy + 0.6 * r),
        20,
        160,
        fill=(60, 30, 0, 255),
        width=2 * line,
    )
  elif kind == 1:  # a star
    d.polygon(
        _star(cx, cy, r),
        fill=_colour(rng) + (255,),
        outline=(255, 255, 255, 255),
        width=line,
    )
  elif kind == 2:  # a heart: two discs and a triangle
    col = (int(rng.integers(180, 256)), 0, int(rng.integers(0, 90)), 255)
    d.ellipse((x0, y0 + 0.05 * side, cx + 0.05 * r, cy + 0.15 * r), fill=col)
    d.ellipse((cx - 0.05 * r, y0 + 0.05 * side, x0 + side, cy + 0.15 * r), fill=col)
    d.polygon([(x0 + 0.03 * side, cy), (x0 + 0.97 * side, cy), (cx, y0 + side)], fill=col)
  else:  # a label: a rounded box with a white outline and a word in it
    d.rounded_rectangle(
        (x0, y0 + 0.2 * side, x0 + side, y0 + 0.8 * side),
        radius=0.12 * side,
        fill=_colour(rng) + (255,),
        outline=(255, 255, 255, 255),
        width=2 * line,
    )
    word = _WORDS[int(rng.integers(0, len(_WORDS)))].upper()
    font = _fit(d, word, 0.3 * side, 0.85 * side)
    tw = d.textlength(word, font=font)
    d.text((cx - tw / 2, cy - 0.18 * side), word, fill=(255, 255, 255, 255), font=font)
  out = Image.alpha_composite(Image.fromarray(a).convert("RGBA"), layer)
  return np.asarray(out.convert("RGB"))


def _pad(a: np.ndarray, top: int, bottom: int, left: int, right: int, colour) -> np.ndarray:
  h, w = a.shape[:2]
  out = np.empty((h + top + bottom, w + left + right, 3), np.uint8)
  out[:] = np.asarray(colour, np.uint8)
  out[top : top + h, left : left + w] = a
  return out


def letterbox(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  a = _rgb(img)
  h, w = a.shape[:2]
  own = w / h
  frames = [r for r in (16 / 9, 1.85, 2.35, 4 / 3, 9 / 16) if max(r / own, own / r) >= 1.3]
  r = frames[int(rng.integers(0, len(frames)))]
  colour = (0, 0, 0) if rng.random() < 0.6 else _colour(rng)
  if r > own:  # a wider frame: bars left and right
    extra = int(round(h * r)) - w
    return _pad(a, 0, 0, extra // 2, extra - extra // 2, colour)
  extra = int(round(w / r)) - h
  return _pad(a, extra // 2, extra - extra // 2, 0, 0, colour)


def _stretch(a: np.ndarray, f: float, wide: bool) -> np.ndarray:
  h, w = a.shape[:2]
  size = (int(round(w * f)), h) if wide else (w, int(round(h * f)))
  return np.asarray(Image.fromarray(a).resize(size, Image.BICUBIC))


def pad_square(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  a = _rgb(img)
  h, w = a.shape[:2]
  if max(h, w) / min(h, w) < 1.15 or rng.random() < 0.5:
    a = _stretch(a, rng.uniform(1.2, 1.5), rng.random() < 0.5)
    h, w = a.shape[:2]
  colour = _colour(rng)
  side = max(h, w)
  dy, dx = side - h, side - w
  top, left = int(rng.integers(0, dy + 1)), int(rng.integers(0, dx + 1))
  if rng.random() < 0.7:  # centred, as most tools do
    top, left = dy // 2, dx // 2
  return _pad(a, top, dy - top, left, dx - left, colour)


def crop(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  a = _rgb(img)
  h, w = a.shape[:2]
  area = rng.uniform(0.6, 0.62) * h * w
  ar = (w / h) * np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
  ch = min(h, np.sqrt(area / ar))
  cw = min(w, area / ch)
  ch = min(h, area / cw)
  ch, cw = max(1, int(round(ch))), max(1, int(round(cw)))
  y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
  return a[y0 : y0 + ch, x0 : x0 + cw].copy()


def aspect(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return _stretch(_rgb(img), rng.uniform(1.3, 1.5), rng.random() < 0.5)


def _inner(w: float, h: float, angle: float) -> tuple[float, float]:
  """The largest upright rectangle inside a w x h rectangle turned by ``angle`` radians."""
  s, c = abs(np.sin(angle)), abs(np.cos(angle))
  long, short = max(w, h), min(w, h)
  if short <= 2 * s * c * long or abs(s - c) < 1e-10:
    x = 0.5 * short
    wr, hr = (x / s, x / c) if w >= h else (x / c, x / s)
  else:
    cos2 = c * c - s * s
    wr, hr = (w * c - h * s) / cos2, (h * c - w * s) / cos2
  return wr, hr


def rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  a = _rgb(img)
  h, w = a.shape[:2]
  deg = rng.uniform(5, 10) * rng.choice([-1, 1])
  m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
  c, s = abs(m[0, 0]), abs(m[0, 1])
  nw, nh = int(np.ceil(h * s + w * c)), int(np.ceil(h * c + w * s))
  m[0, 2] += nw / 2 - w / 2
  m[1, 2] += nh / 2 - h / 2
  fill = [(0, 0, 0), (255, 255, 255), _colour(rng)][int(rng.integers(0, 3))]
  out = cv2.warpAffine(
      a,
      m,
      (nw, nh),
      flags=cv2.INTER_LINEAR,
      borderMode=cv2.BORDER_CONSTANT,
      borderValue=fill,
  )
  if rng.random() < 0.5:  # filled corners
    return out
  wr, hr = _inner(w, h, np.deg2rad(deg))
  wr, hr = int(np.floor(wr)) - 2, int(np.floor(hr)) - 2
  y0, x0 = (nh - hr) // 2, (nw - wr) // 2
  return np.ascontiguousarray(out[y0 : y0 + hr, x0 : x0 + wr])


def perspective(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  a = _rgb(img)
  h, w = a.shape[:2]
  src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
  mag = rng.uniform(0.08, 0.15, 4)[:, None]
  ang = rng.uniform(0, 2 * np.pi, 4)
  dst = src + (mag * np.stack([w * np.cos(ang), h * np.sin(ang)], 1)).astype(np.float32)
  dst -= dst.min(0)
  size = np.ceil(dst.max(0)).astype(int)
  fill = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
  m = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
  return cv2.warpPerspective(
      a,
      m,
      (int(size[0]), int(size[1])),
      flags=cv2.INTER_LINEAR,
      borderMode=cv2.BORDER_CONSTANT,
      borderValue=fill,
  )


def jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(_rgb(img)).save(buf, "JPEG", quality=int(rng.integers(10, 21)))
  return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def downscale(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  a = _rgb(img)
  h, w = a.shape[:2]
  f = rng.uniform(0.28, 0.32)
  size = (max(8, int(round(w * f))), max(8, int(round(h * f))))
  resample = [Image.BILINEAR, Image.BICUBIC, Image.LANCZOS][int(rng.integers(0, 3))]
  return np.asarray(Image.fromarray(a).resize(size, resample))


def _strong(rng: np.random.Generator) -> float:
  return rng.uniform(0.5, 0.75) if rng.random() < 0.5 else rng.uniform(1.25, 1.5)


def color(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  im = Image.fromarray(_rgb(img))
  for kind in rng.permutation(3):
    enh = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[int(kind)]
    im = enh(im).enhance(_strong(rng))
  hsv = np.asarray(im.convert("HSV")).copy()
  turn = int(round(rng.uniform(0.05, 0.2) * rng.choice([-1, 1]) * 256))
  hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + turn) % 256).astype(np.uint8)
  return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def grey_mirror(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  g = np.asarray(Image.fromarray(_rgb(img)).convert("L"))[:, ::-1]
  return np.repeat(g[..., None], 3, axis=2)


def blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  a = _rgb(img)
  sigma = max(1.0, rng.uniform(1.5, 3.0) * max(a.shape[:2]) / 256)
  return cv2.GaussianBlur(a, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def sharpen(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  f = ImageFilter.UnsharpMask(
      radius=rng.uniform(2, 4), percent=int(rng.integers(150, 301)), threshold=0
  )
  return np.asarray(Image.fromarray(_rgb(img)).filter(f))


_MAKERS = {
    "caption": caption,
    "text": text,
    "sticker": sticker,
    "letterbox": letterbox,
    "pad_square": pad_square,
    "crop": crop,
    "aspect": aspect,
    "rotate": rotate,
    "perspective": perspective,
    "jpeg": jpeg,
    "downscale": downscale,
    "color": color,
    "grey_mirror": grey_mirror,
    "blur": blur,
    "sharpen": sharpen,
}
assert tuple(_MAKERS) == FAMILIES


def web_copy(img: np.ndarray, family: str, rng: np.random.Generator) -> np.ndarray:
  """A copy of ``img`` (uint8 HxW or HxWx{1,3}) made by ``family`` (one of ``FAMILIES``):
  a uint8 HxWx3 image (its size may differ: see the module doc)."""
  if family not in _MAKERS:
    raise ValueError(f"unknown web-copy family {family!r}: one of {', '.join(FAMILIES)}")
  return np.ascontiguousarray(_MAKERS[family](img, rng), dtype=np.uint8)


def combo(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
  """A copy made by two different families, drawn at random, one after the other, and
  their names as ``"first+second"``."""
  i, j = rng.choice(len(FAMILIES), 2, replace=False)
  a, b = FAMILIES[int(i)], FAMILIES[int(j)]
  return web_copy(web_copy(img, a, rng), b, rng), f"{a}+{b}"
