"""JPEG decoders measured on one core: Pillow (with and without ``draft``, bssl's
``bssl.data.decode.decode``), simplejpeg, PyTurboJPEG and pillow-simd, on the 256-px JPEGs
bssl's shards hold and on full-size photos.

Images: benchmarks/ingest.py's photo-like JPEGs (quality 90) at 2048x1536 and 1024x768
("full-size"), and the same photos ingested to short side 256 by ``bssl.ingest`` (what
scoring and D-hat training decode). Tasks:

- ``256px``: decode a 256-px shard JPEG to RGB pixels (every decoder the same pixels?
  ``max_abs_diff`` against Pillow);
- ``full``: decode a full-size photo to RGB pixels;
- ``full_to_256``: what the ingest does per photo before its resize: decode at the
  smallest DCT scale whose short side is still >= 256 (Pillow ``draft``, simplejpeg
  ``min_height``/``min_width``, TurboJPEG ``scaling_factor``);
- and, not a decode, Pillow's crop + bilinear resize of a 160-px square to 224 (the
  training crop: where pillow-simd's SIMD resampling would show).

Each decoder runs in the interpreter that has it: this one (bssl's environment: Pillow),
plus any ``--python`` given (e.g. a venv with simplejpeg and PyTurboJPEG, or one with
pillow-simd, which replaces Pillow and so cannot share an environment with it):

    python benchmarks/decoders.py
    python benchmarks/decoders.py --python /tmp/decvenv/bin/python --python /tmp/simdvenv/bin/python

The last line printed is one JSON object: microseconds per image, by decoder and task.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

MEASURE_ARG = "--measure"  # the child mode: measure the decoders of this interpreter


def _time(fn, items, reps=3):
  fn(items[0])
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    for x in items:
      fn(x)
    best = min(best, (time.perf_counter() - t0) / len(items))
  return best * 1e6


def measure(folder: str) -> dict:
  """{decoder: {task: us per image, task + '_max_abs_diff': vs Pillow}} of the decoders
  importable here."""
  import PIL
  from PIL import Image

  try:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  except (AttributeError, OSError):
    pass
  small = [open(p, "rb").read() for p in sorted(glob.glob(f"{folder}/small/*.jpg"))]
  full = [open(p, "rb").read() for p in sorted(glob.glob(f"{folder}/full/*.jpg"))]

  def pil(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

  def pil_draft(data, short=256):
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    s = short / min(w, h)
    im.draft("RGB", (int(np.ceil(w * s)), int(np.ceil(h * s))))
    return np.asarray(im.convert("RGB"))

  simd = "post" in PIL.__version__ or hasattr(Image, "SIMD")  # pillow-simd's version tag
  name = "pillow-simd" if simd else "pillow"
  ref_small = [pil(d) for d in small]
  ref_full = [pil(d) for d in full]
  ref_draft = [pil_draft(d) for d in full]
  out = {}

  def add(dec, task, fn, data, ref):
    us = _time(fn, data)

    def differs(got, want):  # largest pixel difference; 255 for another shape
      if got.shape != want.shape:
        return 255
      return int(np.abs(got.astype(np.int16) - want.astype(np.int16)).max())

    diff = max(differs(fn(d), r) for d, r in zip(data[:8], ref[:8]))
    out.setdefault(dec, {})[task] = round(us, 1)
    out[dec][task + "_max_abs_diff"] = diff

  add(name, "256px", pil, small, ref_small)
  add(name, "full", pil, full, ref_full)
  add(name, "full_to_256", pil_draft, full, ref_draft)
  # not a decoder: the training crop's resize (pillow-simd's SIMD resampling shows here)
  ims = [Image.fromarray(a) for a in ref_small]
  us = _time(lambda im: im.crop((16, 16, 176, 176)).resize((224, 224), Image.BILINEAR), ims)
  out[name]["resize_160_to_224"] = round(us, 1)
  if not simd:
    try:
      sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
      from bssl.data import decode as bssl_decode

      add("bssl decode()", "256px", lambda d: bssl_decode.decode(d, 3), small, ref_small)
      add(
          "bssl decode()",
          "full_to_256",
          lambda d: np.asarray(bssl_decode.open_image(d, 3, short_side=256)),
          full,
          ref_draft,
      )
    except ImportError:
      pass
  try:
    import simplejpeg

    def sj_min(data, short=256):
      h, w, _, _ = simplejpeg.decode_jpeg_header(data)
      s = short / min(w, h)
      return simplejpeg.decode_jpeg(
          data, colorspace="RGB", min_height=int(np.ceil(h * s)), min_width=int(np.ceil(w * s))
      )

    sj = lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB")
    add(f"simplejpeg {simplejpeg.__version__}", "256px", sj, small, ref_small)
    add(f"simplejpeg {simplejpeg.__version__}", "full", sj, full, ref_full)
    add(f"simplejpeg {simplejpeg.__version__}", "full_to_256", sj_min, full, ref_draft)
  except ImportError:
    pass
  try:
    import turbojpeg

    tj = turbojpeg.TurboJPEG()

    def tj_scaled(data, short=256):
      w, h, _, _ = tj.decode_header(data)
      best = (1, 1)
      for num, den in ((1, 8), (1, 4), (1, 2)):
        if min(w, h) * num / den >= short:
          best = (num, den)
          break
      return tj.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=best)

    dec = lambda d: tj.decode(d, pixel_format=turbojpeg.TJPF_RGB)
    add("PyTurboJPEG", "256px", dec, small, ref_small)
    add("PyTurboJPEG", "full", dec, full, ref_full)
    add("PyTurboJPEG", "full_to_256", tj_scaled, full, ref_draft)
  except (ImportError, RuntimeError, OSError):
    pass
  return out


def make_images(folder: str, n: int) -> None:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from ingest import photo_like  # benchmarks/ingest.py

  from bssl.data import ingest
  from bssl.data.shards import ShardSource

  rng = np.random.default_rng(0)
  os.makedirs(f"{folder}/full")
  for i in range(n):
    w, h = ((2048, 1536), (1024, 768))[i % 2]
    with open(f"{folder}/full/{i:04d}.jpg", "wb") as f:
      f.write(photo_like(w, h, rng))
  ingest.run_ingest(f"{folder}/full", f"{folder}/shards", ingest.Params(), log=lambda m: None)
  src = ShardSource(f"{folder}/shards", channels=3)
  os.makedirs(f"{folder}/small")
  for i in range(len(src)):
    with open(f"{folder}/small/{i:04d}.jpg", "wb") as f:
      f.write(src.record_bytes(i))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == MEASURE_ARG:
    print(json.dumps(measure(argv[1])))
    return None
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--images", type=int, default=40, help="full-size photos (half of each size)")
  ap.add_argument(
      "--python",
      action="append",
      default=[],
      help="another interpreter whose decoders to measure too (repeatable)",
  )
  args = ap.parse_args(argv)
  res = {}
  with tempfile.TemporaryDirectory(prefix="bssl_dec_") as d:
    make_images(d, args.images)
    res.update(measure(d))
    for py in args.python:
      r = subprocess.run(
          [py, os.path.abspath(__file__), MEASURE_ARG, d], capture_output=True, text=True
      )
      if r.returncode:
        print(f"{py}: failed: {r.stderr.strip().splitlines()[-1:]}")
        continue
      for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items():
        res.setdefault(k, {}).update(v)
  print(
      f"{args.images} photo-like JPEGs (2048x1536 and 1024x768, quality 90) and the same "
      "ingested to short side 256; us per image on one core (best of 3; max |diff| vs "
      "Pillow's pixels in brackets)"
  )
  print(
      f"{'decoder':24s} {'256px':>14s} {'full':>14s} {'full_to_256':>14s} " f"{'crop+resize':>12s}"
  )
  for k, v in res.items():
    cells = [
        f"{v[t]:8.0f} [{v[t + '_max_abs_diff']:3d}]" if t in v else f"{'-':>14s}"
        for t in ("256px", "full", "full_to_256")
    ]
    rs = v.get("resize_160_to_224")
    print(f"{k:24s} " + " ".join(cells) + (f" {rs:12.0f}" if rs else f" {'-':>12s}"))
  print(json.dumps(res))
  return res


if __name__ == "__main__":
  main()
