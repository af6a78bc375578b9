"""Input pipelines side by side: bssl's training and scoring input against torchvision's
ImageFolder + DataLoader and grain's plain ArrayRecord source, and the scoring stage's
ceiling (a model that costs nothing), in one run.

The data: ``--images`` synthetic photo-like JPEGs (benchmarks/ingest.py's ``photo_like``,
quality 90) of mixed sizes (500x375, 375x500, 640x480, 1024x768) in 4 class folders, kept
as the folder (what torchvision reads) and ingested once by ``bssl.ingest`` (short side
256, JPEG quality 90, ArrayRecord shards: what bssl reads). Every pipeline runs on all the
cores this process may use (``cores``) and yields batches of ``--batch`` (256) uint8
images at 224 px; images/s per core = images/s / cores. Each rate is the median of
``--rounds`` rounds, interleaved; a round times ``--batches`` batches after the first
(start-up excluded for every pipeline alike).

  a. ``bssl_train``: ``bssl.data.pipelines.train_dataset`` as configs/resnext.py trains
     (random-resized crop + flip to 224), over the ingested shards;
  b. ``bssl_score``: ``bssl.data.pipelines.ranges_dataset`` as the scoring stage reads U
     (resize + centre crop 224/0.875), over the ingested shards;
  c. ``torchvision_train`` / ``torchvision_score``: ``ImageFolder`` + ``DataLoader``
     (workers = cores) with ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()`` /
     ``Resize(256)`` + ``CenterCrop(224)``, then ``PILToTensor()`` (uint8, as bssl's
     batches; normalisation happens on the device in both), over the original folder; and,
     for the cost of the transforms alone, over a folder of the ingested 256-px images
     (``*_256``). Runs in a separate environment (``bash benchmarks/torchvision_env.sh``:
     PyPI's torchvision does not load with bssl's CPU build of torch);
  d. ``grain_plain``: ``grain.sources.ArrayRecordDataSource`` over the same shards ->
     ``map(decode)`` (Pillow, centre 224 crop) -> ``batch``, ``num_threads`` = cores.

Then the scoring stage's ceiling (``benchmarks/scoring.py --models null``): the whole loop
(read, decode, transfer, top-P, per-class top-K, checkpointed parts) with a jitted
function returning fixed logits, for U in memory and U from the ingested shards.

    python benchmarks/input.py                      # 512 images, 12 batches x 3 rounds
    python benchmarks/input.py --images 256 --batches 4 --rounds 1 --no-ceiling   # quick

The last line printed is one JSON object: ``train_input_over_torchvision`` and
``score_input_over_torchvision`` (bssl's images/s per core / torchvision's),
``score_ceiling_shards_per_core``, ``score_ceiling_memory`` and every rate.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ((500, 375), (375, 500), (640, 480), (1024, 768))
CLASSES = 4

# The torchvision side, run by the torchvision environment's Python (argv: folder, mode,
# workers, batch, batches, rounds); prints one JSON line {"rates": [...]}.
TORCHVISION = r"""
import json, sys, time
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms as T
folder, mode, workers, batch, batches, rounds = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
if mode == "train":
  tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.PILToTensor()])
else:
  tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
ds = datasets.ImageFolder(folder, transform=tf)
rates = []
for r in range(rounds):
  n = (batches + 1) * batch
  order = torch.randperm(n, generator=torch.Generator().manual_seed(r)) if mode == "train" else torch.arange(n)
  sub = Subset(ds, [int(i) % len(ds) for i in order])
  it = iter(DataLoader(sub, batch_size=batch, num_workers=workers, drop_last=True))
  x, _ = next(it)
  assert x.shape == (batch, 3, 224, 224) and x.dtype == torch.uint8
  t0 = time.perf_counter()
  for _ in range(batches):
    x, _ = next(it)
  rates.append(batches * batch / (time.perf_counter() - t0))
  del it
print(json.dumps({"rates": rates, "torch": torch.__version__,
                  "torchvision": __import__("torchvision").__version__,
                  "pillow": __import__("PIL").__version__}))
"""


def make_data(tmp: str, n: int, rng) -> tuple[str, str, str]:
  """(original folder, ingested shards, folder of the ingested 256-px JPEGs)."""
  from ingest import photo_like  # benchmarks/ingest.py

  from bssl.data import ingest
  from bssl.data.shards import ShardSource

  folder = os.path.join(tmp, "folder")
  for i in range(n):
    w, h = SIZES[i % len(SIZES)]
    d = os.path.join(folder, f"class{i % CLASSES}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
      f.write(photo_like(w, h, rng))
  shards = os.path.join(tmp, "shards")
  ingest.run_ingest(folder, shards, ingest.Params(shard_size=256), log=lambda m: None)
  small = os.path.join(tmp, "folder256")
  src = ShardSource(shards, channels=3)
  for i in range(len(src)):
    d = os.path.join(small, f"class{i % CLASSES}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
      f.write(src.record_bytes(i))
  return folder, shards, small


def _rate(it, batch: int, batches: int, shape) -> float:
  """Images/s of ``batches`` batches of an iterator after its first."""
  b = next(it)
  assert b["image"].shape == shape, (b["image"].shape, shape)
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  return batches * batch / (time.perf_counter() - t0)


def bssl_train(shards, cores, batch, batches, round_, workers=None):
  from bssl.data import pipelines
  from bssl.data.shards import ShardSource

  spec = pipelines.ImageSpec(
      size=224,
      channels=3,
      augment="random_resized_crop_flip",
      eval_transform="resize_center_crop",
      pad=0,
  )
  ds = pipelines.train_dataset(
      ShardSource(shards, channels=3),
      spec,
      local_batch_size=batch,
      seed=round_,
      num_threads=cores if not workers else 1,
      num_workers=workers or 0,
  )
  return _rate(iter(ds), batch, batches, (batch, 224, 224, 3))


def bssl_score(shards, cores, batch, batches, round_, workers=None):
  from bssl.data import pipelines, sources
  from bssl.data.shards import ShardSource

  src = ShardSource(shards, channels=3)
  n = (batches + 1) * batch
  u = sources.SubsetView(src, np.arange(n) % len(src), reindex=True)
  spec = pipelines.ImageSpec(
      size=224, channels=3, augment="none", eval_transform="resize_center_crop"
  )
  ds = pipelines.ranges_dataset(
      u,
      spec,
      batch_size=batch,
      bounds=pipelines.range_batches(0, n, batch),
      num_threads=cores if not workers else 1,
      num_workers=workers or 0,
  )
  return _rate(iter(ds), batch, batches, (batch, 224, 224, 3))


def grain_plain(shards, cores, batch, batches, round_):
  import glob

  import grain
  from PIL import Image

  def decode(data):
    a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    h, w = a.shape[:2]
    top, left = (h - 224) // 2, (w - 224) // 2
    return {"image": a[top : top + 224, left : left + 224]}

  src = grain.sources.ArrayRecordDataSource(sorted(glob.glob(f"{shards}/shards/*.array_record")))
  ds = (
      grain.MapDataset.source(src)
      .repeat()
      .map(decode)
      .batch(batch, drop_remainder=True)
      .to_iter_dataset(grain.ReadOptions(num_threads=cores, prefetch_buffer_size=2 * batch))
  )
  return _rate(iter(ds), batch, batches, (batch, 224, 224, 3))


def decode_alone(shards, cores, batch, batches, round_):
  """The shard images' JPEG decode alone (bssl.data.decode.decode: simplejpeg where it
  applies), one thread: the floor of every shard pipeline's cost per image."""
  from bssl.data import decode
  from bssl.data.shards import ShardSource

  src = ShardSource(shards, channels=3)
  data = [src.record_bytes(i) for i in range(len(src))]
  decode.decode(data[0], 3)
  n = batches * batch
  t0 = time.perf_counter()
  for i in range(n):
    decode.decode(data[i % len(data)], 3)
  return n / (time.perf_counter() - t0) * cores  # one core's rate, reported as if on all


def score_breakdown(shards, batch) -> dict:
  """Where one image's time goes in the scoring input, one thread, microseconds: the
  record's read, its JPEG decode, its view (centre crop), and the whole batcher per image
  (``ImageRecordsBatch.map``: the three, the per-record Python and the copy into the
  batch)."""
  from bssl.data import decode, pipelines, sources
  from bssl.data.shards import ShardSource

  src = ShardSource(shards, channels=3)
  spec = pipelines.ImageSpec(
      size=224, channels=3, augment="none", eval_transform="resize_center_crop"
  )
  n = len(src)
  data = [src.record_bytes(i) for i in range(n)]
  imgs = [decode.decode(d, 3) for d in data]

  def per_image(fn):
    fn(0)
    t0 = time.perf_counter()
    for i in range(n):
      fn(i)
    return round((time.perf_counter() - t0) / n * 1e6, 1)

  out = {
      "read": per_image(src.record_bytes),
      "decode": per_image(lambda i: decode.decode(data[i], 3)),
      "view": per_image(lambda i: pipelines.eval_image(imgs[i], spec)),
  }
  u = sources.SubsetView(src, np.arange(n), reindex=True)
  b = pipelines.ImageRecordsBatch(
      u, spec, batch_size=batch, bounds=pipelines.range_batches(0, n, batch)
  )
  b.map(0)
  t0 = time.perf_counter()
  for j in range(len(b.bounds)):
    b.map(j)
  out["batcher"] = round((time.perf_counter() - t0) / n * 1e6, 1)
  return out


def torchvision(python, folder, mode, cores, batch, batches, rounds):
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(TORCHVISION)
  try:
    out = subprocess.run(
        [python, f.name, folder, mode, str(cores), str(batch), str(batches), str(rounds)],
        capture_output=True,
        text=True,
        check=True,
    )
  finally:
    os.unlink(f.name)
  return json.loads(out.stdout.strip().splitlines()[-1])


def find_torchvision(arg):
  for p in (
      arg,
      os.environ.get("BSSL_TORCHVISION_PYTHON"),
      os.path.join(ROOT, ".venv-torchvision", "bin", "python"),
  ):
    if p and os.path.exists(p):
      return p
  return None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--images", type=int, default=512, help="distinct images (mixed sizes)")
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--batches", type=int, default=12, help="timed batches per round")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument(
      "--torchvision_python",
      default=None,
      help="Python with torchvision (default: $BSSL_TORCHVISION_PYTHON, then "
      ".venv-torchvision made by benchmarks/torchvision_env.sh)",
  )
  ap.add_argument(
      "--ceiling",
      action=argparse.BooleanOptionalAction,
      default=True,
      help="also measure the scoring stage's ceiling (benchmarks/scoring.py)",
  )
  args = ap.parse_args(argv)
  cores = len(os.sched_getaffinity(0))
  tv = find_torchvision(args.torchvision_python)
  rng = np.random.default_rng(0)
  rates: dict[str, list[float]] = {}
  with tempfile.TemporaryDirectory(prefix="bssl_input_") as tmp:
    t0 = time.perf_counter()
    folder, shards, small = make_data(tmp, args.images, rng)
    print(
        f"{args.images} photo-like JPEGs {', '.join(f'{w}x{h}' for w, h in SIZES)} made and "
        f"ingested in {time.perf_counter() - t0:.0f} s; {cores} cores; batch {args.batch}, "
        f"{args.batches} timed batches x {args.rounds} rounds",
        flush=True,
    )
    if tv is None:
      print(
          "torchvision: no environment (make it with: bash benchmarks/torchvision_env.sh); "
          "its rows and the ratios are left out",
          flush=True,
      )
    tv_info = {}
    for r in range(args.rounds):
      runs = {
          "bssl_train": lambda: bssl_train(shards, cores, args.batch, args.batches, r),
          "bssl_train_workers": lambda: bssl_train(
              shards, cores, args.batch, args.batches, r, workers=cores
          ),
          "bssl_score": lambda: bssl_score(shards, cores, args.batch, args.batches, r),
          "bssl_score_workers": lambda: bssl_score(
              shards, cores, args.batch, args.batches, r, workers=cores
          ),
          "grain_plain": lambda: grain_plain(shards, cores, args.batch, args.batches, r),
          "decode_alone_1_thread": lambda: decode_alone(shards, cores, args.batch, args.batches, r),
      }
      if tv:
        for mode in ("train", "score"):
          for name, f in ((f"torchvision_{mode}", folder), (f"torchvision_{mode}_256", small)):
            runs[name] = lambda f=f, mode=mode: torchvision(
                tv, f, mode, cores, args.batch, args.batches, 1
            )
      for name, fn in runs.items():
        res = fn()
        if isinstance(res, dict):
          tv_info = {k: v for k, v in res.items() if k != "rates"}
          res = res["rates"][0]
        rates.setdefault(name, []).append(res)
        print(
            f"round {r + 1}/{args.rounds} {name:24s} {res:8.1f} images/s "
            f"({res / cores:.1f} per core)",
            flush=True,
        )
    parts = score_breakdown(shards, args.batch)
    print(
        "scoring input, one image, one thread (us): "
        + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()),
        flush=True,
    )
  med = {k: float(np.median(v)) for k, v in rates.items()}
  per_core = {k: v / cores for k, v in med.items()}
  out = {
      "cores": cores,
      "images": args.images,
      "batch": args.batch,
      "score_input_us_per_image": parts,
      "per_core": {k: round(v, 1) for k, v in per_core.items()},
      "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
  }
  # bssl's better way on this machine of the two it offers: read threads (num_threads;
  # simplejpeg and Pillow's resize release the GIL) or decode worker processes
  # (num_workers, score.num_workers); both rows are shown
  bssl_train_rate = max(per_core["bssl_train"], per_core["bssl_train_workers"])
  bssl_score_best = max(per_core["bssl_score"], per_core["bssl_score_workers"])
  print(f"\nimages/s per core (median of {args.rounds} rounds, {cores} cores):")
  for k, v in per_core.items():
    print(f"  {k:24s} {v:8.1f}")
  if tv:
    out["torchvision_env"] = tv_info
    out["train_input_over_torchvision"] = round(bssl_train_rate / per_core["torchvision_train"], 3)
    out["score_input_over_torchvision"] = round(bssl_score_best / per_core["torchvision_score"], 3)
    out["train_input_over_torchvision_256"] = round(
        bssl_train_rate / per_core["torchvision_train_256"], 3
    )
    out["score_input_over_torchvision_256"] = round(
        bssl_score_best / per_core["torchvision_score_256"], 3
    )
    print(
        f"bssl / torchvision per core: training input {out['train_input_over_torchvision']}x"
        f" (same 256-px images: {out['train_input_over_torchvision_256']}x), scoring input "
        f"{out['score_input_over_torchvision']}x (same 256-px images: "
        f"{out['score_input_over_torchvision_256']}x)"
    )
  else:
    out["train_input_over_torchvision"] = out["score_input_over_torchvision"] = None
  out["bssl_over_grain_plain_score"] = round(bssl_score_best / per_core["grain_plain"], 3)
  if args.ceiling:
    import scoring as scoring_bench  # benchmarks/scoring.py

    mem = scoring_bench.bench("null", num_images=16384, rounds=args.rounds, from_shards=False)
    # from shards: decode in read threads (simplejpeg releases the GIL) and in worker
    # processes; the better of the two is the ceiling
    sh_t = scoring_bench.bench(
        "null", num_images=4096, rounds=args.rounds, from_shards=True, threads=cores
    )
    # (worker processes start in seconds — they import bssl — so they get 3x the images)
    sh_w = scoring_bench.bench(
        "null", num_images=12288, rounds=args.rounds, from_shards=True, workers=cores
    )
    best = max(sh_t["stage_images_per_s"], sh_w["stage_images_per_s"])
    out["score_ceiling_memory"] = round(mem["stage_images_per_s"], 1)
    out["score_ceiling_shards"] = round(best, 1)
    out["score_ceiling_shards_threads"] = round(sh_t["stage_images_per_s"], 1)
    out["score_ceiling_shards_workers"] = round(sh_w["stage_images_per_s"], 1)
    out["score_ceiling_shards_per_core"] = round(best / cores, 1)
    out["score_ceiling_over_decode_alone"] = round(
        out["score_ceiling_shards_per_core"] / per_core["decode_alone_1_thread"], 3
    )
    print(
        f"scoring stage ceiling (null model): U in memory {out['score_ceiling_memory']:,.0f}"
        f" images/s; U from shards {out['score_ceiling_shards']:,.0f} images/s = "
        f"{out['score_ceiling_shards_per_core']:,.0f} per core (threads "
        f"{out['score_ceiling_shards_threads']:,.0f}, workers "
        f"{out['score_ceiling_shards_workers']:,.0f} images/s), "
        f"{100 * out['score_ceiling_over_decode_alone']:.0f}% of the JPEG decode alone"
    )
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
