"""One image decoder for every source of encoded images (folders, file lists, ingested
shards, TFDS records): bytes -> uint8 [H, W, C], or :class:`DecodeError` with a reason.

What it does, in order:

1. refuses what is not an image, with the reason (empty file, not an image Pillow can
   identify, truncated or corrupt data, a decompression bomb);
2. for JPEG, when a ``short_side`` target is given, lets libjpeg scale in the DCT domain
   (``Image.draft``: 1/2, 1/4 or 1/8 while the short side stays >= the target), which is
   most of the cost of big photos;
3. applies the EXIF orientation (phones store portraits as rotated landscapes);
4. converts any mode to ``L`` or ``RGB`` with the right scaling: integer greys are scaled
   from their type's range to 0..255 (Pillow's own ``convert('L')`` clips them, turning
   almost every pixel of a 16-bit PNG white): ``I;16*`` by 255/65535; ``I`` (32-bit
   signed in Pillow) by the range of what the file stores (:func:`_int_range`: a TIFF's
   bits per sample and sign, e.g. 255/(2^31 - 1) for int32 and 255/(2^32 - 1) for uint32;
   16-bit PNG/PGM data by 255/65535), negatives clipped to 0; float greys (``F``) are
   taken as 0..1 when they fit and clipped to 0..255 otherwise; palette images with
   transparency go through RGBA; alpha is dropped as Pillow drops it; CMYK, YCbCr, LAB,
   HSV as Pillow converts them;
5. optionally resizes (bilinear, antialiased) so the short side is ``short_side`` (only
   down: a smaller image is kept as it is).

Images are returned as ``channels`` = 1 (L) or 3 (RGB); an RGB image asked for 1 channel
uses ITU-R 601 luma as Pillow's ``convert('L')`` does.

A baseline or progressive JPEG with no APP1 segment (so no EXIF or XMP orientation to
apply), YCbCr or grey, asked for RGB (or grey asked for grey), with no ``short_side``, is
decoded by simplejpeg (libjpeg-turbo straight into a numpy array: 300 us against Pillow's
550 us for a 256-px shard image, the same pixels; ``benchmarks/decoders.py``,
docs/performance.md): what scoring and D-hat training decode per image. Everything else,
and anything simplejpeg refuses (it is strict: a truncated file is refused, then Pillow
names the reason), takes Pillow's path; without simplejpeg installed, everything does.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bssl import storage

_GREY_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

try:
  import simplejpeg as _simplejpeg
except ImportError:  # Pillow decodes everything (the same pixels, slower)
  _simplejpeg = None


class DecodeError(ValueError):
  """An encoded image that cannot be decoded; ``reason`` says why, in a few words."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _draft_size(w: int, h: int, short_side: int) -> tuple[int, int]:
  """The size to ask ``Image.draft`` for: the image scaled so its short side is
  ``short_side`` (draft only ever returns a size >= the one asked for)."""
  s = short_side / min(w, h)
  return max(1, int(np.ceil(w * s))), max(1, int(np.ceil(h * s)))


def _int_range(im: Image.Image) -> tuple[int, bool]:
  """(the largest value, stored unsigned 32-bit) of an integer grey image's source type.

  Pillow holds every ``I`` image as int32, whatever the file stores: a TIFF says its bits
  per sample (tag 258) and sign (tag 339: 2 = signed); PNG and PGM/PPM data in ``I`` are
  16-bit (older Pillow opens 16-bit PNGs as ``I``; PGM is scaled to 0..65535 by Pillow);
  anything else is taken as int32. An unsigned 32-bit TIFF's values above 2^31 - 1 come
  out negative in int32 and are read back as uint32 (second value True)."""
  if im.mode != "I":
    return 65535, False  # I;16, I;16B, I;16L, I;16N
  if im.format == "TIFF":
    tags = getattr(im, "tag_v2", {})
    bits = tags.get(258, (32,))
    signed = tags.get(339, (1,))
    bits = int(bits[0] if isinstance(bits, tuple) else bits)
    signed = int(signed[0] if isinstance(signed, tuple) else signed) == 2
    if 1 <= bits <= 32:
      return (2 ** (bits - 1) - 1 if signed else 2**bits - 1), (bits == 32 and not signed)
  if im.format in ("PNG", "PPM"):
    return 65535, False
  return 2**31 - 1, False


def scale_to_uint8(a: np.ndarray, maximum: float | None = None) -> np.ndarray:
  """uint8 pixels of an array of any dtype, scaled from its type's range: integers by
  255 / ``maximum`` (default: the dtype's largest value, e.g. 65535 for uint16, 2^31 - 1
  for int32; negatives clipped to 0), floats taken as 0..1 when they fit and clipped to
  0..255 otherwise (NaN 0), booleans as 0/255. uint8 comes back as it is (no copy)."""
  a = np.asarray(a)
  if a.dtype == np.uint8:
    return a
  if a.dtype == np.bool_:
    return a.astype(np.uint8) * np.uint8(255)
  if np.issubdtype(a.dtype, np.integer):
    top = float(maximum if maximum is not None else np.iinfo(a.dtype).max)
    f = np.clip(a.astype(np.float64), 0, top) * (255.0 / top)
  elif np.issubdtype(a.dtype, np.floating):
    f = a.astype(np.float64)
    fin = f[np.isfinite(f)]
    if fin.size and fin.min() >= 0.0 and fin.max() <= 1.0:
      f = f * 255.0
    f = np.nan_to_num(f, nan=0.0, posinf=255.0, neginf=0.0)
  else:
    raise ValueError(f"cannot make pixels of an array of dtype {a.dtype}")
  return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def _to_mode(
    im: Image.Image, channels: int, int_range: tuple[int, bool] | None = None
) -> Image.Image:
  """``im`` as an ``L`` (channels 1) or ``RGB`` (channels 3) image, scaled correctly;
  ``int_range``: :func:`_int_range` of the opened file (a transposed copy has lost the
  file's format and tags)."""
  want = "L" if channels == 1 else "RGB"
  if im.mode in _GREY_INT_MODES or im.mode == "F":
    a = np.asarray(im)
    if im.mode == "F":
      a = scale_to_uint8(a.astype(np.float64))
    else:
      top, unsigned32 = int_range or _int_range(im)
      if unsigned32:
        a = a.astype(np.int32, copy=False).view(np.uint32)
      a = scale_to_uint8(a, top)
    grey = Image.fromarray(a, "L")
    return grey if want == "L" else grey.convert("RGB")
  if im.mode == want:
    return im
  if im.mode == "P" and "transparency" in im.info:
    im = im.convert("RGBA")  # what Pillow asks for (a warning otherwise)
  if im.mode in ("LA", "La") and want == "L":
    return im.convert("L")
  return im.convert(want)


def open_image(
    data: bytes, channels: int = 3, short_side: int | None = None, name: str = ""
) -> Image.Image:
  """Decodes ``data`` into a loaded ``L``/``RGB`` PIL image (steps 1-4 of the module
  docstring; no resize). ``short_side`` only enables JPEG DCT downscaling."""
  if not data:
    raise DecodeError("empty file (0 bytes)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      im = Image.open(io.BytesIO(data))
      if short_side and im.format == "JPEG" and min(im.size) >= 2 * short_side:
        im.draft(im.mode if im.mode in ("L", "RGB") else None, _draft_size(*im.size, short_side))
      im.load()
  except UnidentifiedImageError:
    raise DecodeError("not an image (Pillow cannot identify the format)") from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise DecodeError(f"too large: {e}") from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    msg = str(e) or type(e).__name__
    kind = "truncated" if "truncat" in msg.lower() else "corrupt"
    raise DecodeError(f"{kind}: {msg}") from None
  int_range = _int_range(im) if im.mode in _GREY_INT_MODES else None
  try:
    im = ImageOps.exif_transpose(im)
  except Exception:
    pass
  try:
    return _to_mode(im, channels, int_range)
  except (OSError, ValueError) as e:
    raise DecodeError(f"cannot convert mode {im.mode}: {e}") from None


def resize_short_side(im: Image.Image, short_side: int) -> Image.Image:
  """``im`` scaled (bilinear, antialiased) so its short side is ``short_side``; images
  whose short side is already <= ``short_side`` are returned unchanged."""
  w, h = im.size
  if min(w, h) <= short_side:
    return im
  if w <= h:
    size = (short_side, max(short_side, int(round(h * short_side / w))))
  else:
    size = (max(short_side, int(round(w * short_side / h))), short_side)
  return im.resize(size, Image.BILINEAR)


def _has_app1(data: bytes) -> bool:
  """Whether a JPEG's header segments (before the first scan) hold an APP1 segment (EXIF
  or XMP, where an orientation may be); True when the header cannot be walked."""
  i, n = 2, len(data)
  while i + 4 <= n:
    if data[i] != 0xFF:
      return True
    marker = data[i + 1]
    if marker == 0xFF:  # fill byte
      i += 1
      continue
    if marker == 0xDA:  # start of scan: no APP1 before it
      return False
    if marker == 0xE1:
      return True
    i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
  return True


def fast_jpeg(data: bytes, channels: int) -> np.ndarray | None:
  """uint8 [H, W, channels] by simplejpeg when the module docstring's conditions hold (the
  pixels Pillow's path gives), else None."""
  if _simplejpeg is None or data[:3] != b"\xff\xd8\xff" or _has_app1(data):
    return None
  try:
    h, w, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
    if Image.MAX_IMAGE_PIXELS and h * w > Image.MAX_IMAGE_PIXELS:
      return None  # Pillow's path names the decompression bomb
    if channels == 3 and colorspace in ("YCbCr", "Gray"):
      return _simplejpeg.decode_jpeg(data, colorspace="RGB")
    if channels == 1 and colorspace == "Gray":
      return _simplejpeg.decode_jpeg(data, colorspace="GRAY")
  except ValueError:  # strict: damaged data, an unsupported kind of JPEG
    return None
  return None


def decode(data: bytes, channels: int = 3, short_side: int | None = None) -> np.ndarray:
  """uint8 [H, W, channels]: :func:`open_image`, resized down to ``short_side`` when
  given. Raises :class:`DecodeError`."""
  if not short_side:
    fast = fast_jpeg(bytes(data), channels)
    if fast is not None:
      return fast
  im = open_image(data, channels, short_side)
  if short_side:
    im = resize_short_side(im, short_side)
  a = np.asarray(im, np.uint8)
  return a[..., None] if a.ndim == 2 else a


def read_bytes(path) -> bytes:
  """The bytes of a local or remote (gs://) file; a missing or unreadable file is a
  :class:`DecodeError` with the reason."""
  try:
    return storage.path(path).read_bytes()
  except (OSError, ValueError) as e:
    raise DecodeError(f"unreadable: {type(e).__name__}: {e}") from None


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never grey pixels
