"""A small img2dataset-style WebDataset shard set, made with ``tarfile`` (tests only).

Per sample ``<key>.jpg`` (or .png / .webp), ``<key>.json`` (url, caption, key, status,
width, height, sha256) and ``<key>.txt`` (the caption), as img2dataset writes them; plus
every hostile case of issue 22: a failed row (status ``failed_to_download``, no image), a
corrupt image member, an exact duplicate of another sample, and a placeholder image (one
dead-link picture) repeated many times across shards."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

WORDS = ("red", "blue", "green", "dog", "cat", "car", "tree", "house", "beach", "sky")


def photo(w: int, h: int, seed: int) -> Image.Image:
  rng = np.random.default_rng(seed)
  low = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.int16)
  img = img + rng.integers(-3, 4, img.shape)
  return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
  tf.addfile(info, io.BytesIO(data))


def make_shards(
    root: str, num_shards: int = 3, per_shard: int = 12, placeholder_every: int = 3, size: int = 40
) -> dict:
  """Writes ``root/{00000..}.tar`` (+ a parquet-free listing). Returns what a correct
  ingest must find: ``samples`` (in id order: key, url, caption, expected bad reason word
  or None, image bytes), ``skipped`` (failed rows), ``duplicates`` ({key: key of the
  first}), ``placeholders`` (keys)."""
  os.makedirs(root, exist_ok=True)
  placeholder = encode(photo(size, size, 999_999), quality=85)
  samples, skipped, duplicates, placeholders = [], 0, {}, []
  first_bytes: dict[bytes, str] = {}
  g = 0
  for s in range(num_shards):
    with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tf:
      for j in range(per_shard):
        key = f"{s:05d}{j:04d}"
        rng = np.random.default_rng(g)
        caption = " ".join(rng.choice(WORDS, 3)) + f" #{WORDS[g % len(WORDS)]}"
        url = f"https://example.com/img/{g}.jpg"
        status, ext, bad = "success", "jpg", None
        if g == 5:  # a failed download: no image, status says so
          status, img = "failed_to_download", None
        elif g == 7:  # a corrupt image member
          img, bad = b"\xff\xd8\xff\xe0 this is not a jpeg", "corrupt"
        elif g == 14:  # an exact copy of sample 2's image
          img = samples[2]["image"]
          duplicates[key] = samples[2]["key"]
        elif placeholder_every and g % placeholder_every == 1 and g not in (1,):
          img, bad = placeholder, "placeholder"
          placeholders.append(key)
        elif g % 5 == 3:
          img, ext = encode(photo(size + 8, size, g), "PNG"), "png"
        elif g % 11 == 4:
          img, ext = encode(photo(size, size + 6, g), "WEBP", quality=90), "webp"
        else:
          img = encode(photo(size + (g % 3) * 4, size, g), quality=90)
        meta = {
            "url": url,
            "caption": caption,
            "key": key,
            "status": status,
            "error_message": None if img is not None else "404 Not Found",
            "width": size,
            "height": size,
            "sha256": hashlib.sha256(img).hexdigest() if img is not None else None,
        }
        if img is not None:
          _add(tf, f"{key}.{ext}", img)
        _add(tf, f"{key}.json", json.dumps(meta).encode())
        _add(tf, f"{key}.txt", caption.encode())
        if status != "success":
          skipped += 1
        else:
          if img is not None and img not in first_bytes:
            first_bytes[img] = key
          samples.append({"key": key, "url": url, "caption": caption, "bad": bad, "image": img})
        g += 1
  return {
      "samples": samples,
      "skipped": skipped,
      "duplicates": duplicates,
      "placeholders": placeholders,
  }
