"""Ingest and shard-decode throughput on one core.

Makes synthetic photo-like JPEGs (quality 90: smooth random fields + edges + sensor-like
noise, ~60-70 KB at 500x375 as YFCC's typical photo) at 500x375 and 1024x768, then, pinned
to one CPU core:

1. ``ingest_images_per_s_per_core``: the ingest path (read, hash, decode with DCT
   downscaling, EXIF transpose, resize to short side 256, JPEG re-encode, ArrayRecord
   write, shard manifest) over both sizes, half each;
2. ``tar_ingest_images_per_s_per_core``: the same images as WebDataset tar shards
   (img2dataset's layout: ``<key>.jpg``, ``<key>.json``, ``<key>.txt``; 256 samples a
   tar), the same ingest from the tars (stream read, grouping by key, json parsed);
   ``tar_over_folder`` is its ratio to the folder ingest (target: >= 1); both are the
   medians of 3 runs, interleaved;
3. ``decode_images_per_s_per_core``: what scoring does per image of the ingested shards:
   read the record, decode the 256-px JPEG, resize/centre-crop to the model's 224 input
   (``bssl.data.pipelines.eval_image``).

    python benchmarks/ingest.py                 # 200 images of each size
    python benchmarks/ingest.py --images 500

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image

from bssl.data import ingest, pipelines
from bssl.data.shards import ShardSource


def photo_like(w: int, h: int, rng: np.random.Generator) -> bytes:
  """A JPEG (quality 90) with the statistics of a photo rather than of white noise."""
  low = rng.normal(0, 1, (h // 32 + 2, w // 32 + 2, 3))
  field = np.asarray(
      Image.fromarray(((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)).resize(
          (w, h), Image.BICUBIC
      ),
      np.float32,
  )
  yy, xx = np.mgrid[0:h, 0:w]
  edges = 60 * (np.sin(xx / rng.uniform(5, 30)) > 0.7)[..., None]
  img = field * 0.8 + edges + rng.normal(0, 10, (h, w, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--images", type=int, default=200, help="images of each size")
  ap.add_argument("--size", type=int, default=224, help="the model's input size")
  args = ap.parse_args()
  try:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cores = "pinned to 1 core"
  except (AttributeError, OSError):
    cores = "not pinned (no sched_setaffinity)"
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "u")
    os.makedirs(src)
    sizes = {}
    for w, h in ((500, 375), (1024, 768)):
      for i in range(args.images):
        data = photo_like(w, h, rng)
        sizes.setdefault(f"{w}x{h}", []).append(len(data))
        with open(os.path.join(src, f"{w}x{h}_{i:05d}.jpg"), "wb") as f:
          f.write(data)
    per_size = {}
    for w, h in ((500, 375), (1024, 768)):  # each size alone, then both together
      sub = os.path.join(tmp, f"list_{w}")
      with open(sub, "w") as f:
        f.writelines(f"{src}/{w}x{h}_{i:05d}.jpg\n" for i in range(args.images))
      t0 = time.perf_counter()
      ingest.run_ingest(
          sub, os.path.join(tmp, f"out_{w}"), ingest.Params(shard_size=256), log=lambda m: None
      )
      per_size[f"{w}x{h}"] = args.images / (time.perf_counter() - t0)
    out = os.path.join(tmp, "out")
    t0 = time.perf_counter()
    m = ingest.run_ingest(src, out, ingest.Params(shard_size=256), log=lambda m: None)
    ingest_rate = m["num_images"] / (time.perf_counter() - t0)

    # the same images as img2dataset-style tar shards (256 samples each)
    import tarfile

    names = sorted(os.listdir(src))
    tars = os.path.join(tmp, "tars")
    os.makedirs(tars)
    for s in range(0, len(names), 256):
      with tarfile.open(os.path.join(tars, f"{s // 256:05d}.tar"), "w") as tf:
        for j, name in enumerate(names[s : s + 256]):
          key = f"{s // 256:05d}{j:04d}"
          meta = json.dumps(
              {
                  "url": f"https://example.com/{name}",
                  "key": key,
                  "status": "success",
                  "caption": f"a photo {name}",
              }
          ).encode()
          for ext, data in (
              ("jpg", open(os.path.join(src, name), "rb").read()),
              ("json", meta),
              ("txt", f"a photo {name}".encode()),
          ):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    # folder and tar ingests interleaved (this VM's speed drifts within minutes): medians
    folder_rates, tar_rates = [ingest_rate], []
    for r in range(3):
      t0 = time.perf_counter()
      mt = ingest.run_ingest(
          tars, os.path.join(tmp, f"out_tar{r}"), ingest.Params(), log=lambda m: None
      )
      tar_rates.append(mt["num_images"] / (time.perf_counter() - t0))
      assert mt["num_images"] == m["num_images"] and mt["num_bad"] == 0
      if r < 2:
        t0 = time.perf_counter()
        ingest.run_ingest(
            src,
            os.path.join(tmp, f"out_again{r}"),
            ingest.Params(shard_size=256),
            log=lambda m: None,
        )
        folder_rates.append(m["num_images"] / (time.perf_counter() - t0))
    ingest_rate, tar_rate = float(np.median(folder_rates)), float(np.median(tar_rates))

    unl = ShardSource(out, channels=3)
    spec = pipelines.ImageSpec(
        size=args.size, channels=3, augment="none", eval_transform="resize_center_crop"
    )
    for i in range(min(20, len(unl))):  # warm (opens the readers)
      pipelines.eval_image(unl[i]["image"], spec)
    t0 = time.perf_counter()
    for i in range(len(unl)):
      x = pipelines.eval_image(unl[i]["image"], spec)
      assert x is not None and x.shape == (args.size, args.size, 3)
    decode_rate = len(unl) / (time.perf_counter() - t0)
    stored = os.path.getsize(os.path.join(out, "shards", "u-00000.array_record")) / 256
  print(
      f"{cores}; {args.images} images of each size; source JPEG sizes "
      + ", ".join(f"{k}: {np.mean(v) / 1e3:.0f} KB" for k, v in sizes.items())
      + f"; stored at short side 256: {stored / 1e3:.0f} KB/image"
  )
  print(
      f"ingest: {ingest_rate:.0f} images/s (500x375 alone {per_size['500x375']:.0f}, "
      f"1024x768 alone {per_size['1024x768']:.0f}); decode of ingested shards to "
      f"{args.size}: {decode_rate:.0f} images/s"
  )
  print(
      f"tar ingest (the same images in img2dataset-style tar shards): {tar_rate:.0f} "
      f"images/s, {tar_rate / ingest_rate:.2f}x the folder ingest"
  )
  print(
      json.dumps(
          {
              "ingest_images_per_s_per_core": round(ingest_rate, 1),
              "tar_ingest_images_per_s_per_core": round(tar_rate, 1),
              "tar_over_folder": round(tar_rate / ingest_rate, 3),
              "decode_images_per_s_per_core": round(decode_rate, 1),
              "ingest_500x375_per_s": round(per_size["500x375"], 1),
              "ingest_1024x768_per_s": round(per_size["1024x768"], 1),
              "stored_kb_per_image": round(stored / 1e3, 1),
          }
      )
  )


if __name__ == "__main__":
  main()
