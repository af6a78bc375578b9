"""Throughput of the scoring stage and the share of its time spent outside the model.

For each model: (1) the forward pass alone — the jitted ``model.apply`` on a batch
already on the device, repeated; (2) the whole stage as the engine's score stage runs it
on one process — ``bssl.scoring.plan_chunks`` + ``bssl.scoring.score_process`` with the
JAX backend's scorer (``bssl.backends.jax.JaxScorer``) over an in-memory U of random uint8
images: grain input, host->device transfer, forward, softmax + top-P on device,
device->host (one batch in flight), streaming top-K selection, a checkpointed part after
each chunk of ``50`` batches. The share outside the forward pass is
``1 - forward_time / stage_time``, per round of (forward, stage) measured back to back;
the medians over ``--rounds`` are reported (this VM's speed drifts between runs).

    python benchmarks/scoring.py                       # 2-block small ResNet and resnet50 @ 224
    python benchmarks/scoring.py --models demo --images 20000
    python benchmarks/scoring.py --models null --source memory    # the stage's ceiling
    python benchmarks/scoring.py --models null --source shards --workers 2

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bssl.hostmem import tune_malloc

# As bssl.main does, before JAX starts its threads; BSSL_MALLOC=default measures glibc's.
MALLOC_TUNED = tune_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bssl import parallel, scoring  # noqa: E402
from bssl.backends.jax import JaxScorer  # noqa: E402
from bssl.data import pipelines, sources  # noqa: E402
from bssl.models import create_model  # noqa: E402
from bssl.train import normalize  # noqa: E402

MODELS = {
    # name: (registry name, kwargs, image size, channels, classes, batch, images, top_p, k)
    "demo": ("resnet_small", dict(depths=(2, 2, 2)), 28, 1, 10, 1000, 20000, 1, 4000),
    "resnet50": ("resnet50", {}, 224, 3, 1000, 32, 256, 10, 16000),
    # the ceiling of the stage: a "model" that costs nothing (see NullModel)
    "null": ("null", {}, 224, 3, 1000, 256, 4096, 10, 16000),
}


class NullModel:
  """Logits that cost nothing: a fixed pseudo-random vector per class plus each image's
  first pixel (so that scores differ between images and the top-K does real work). The
  scoring loop around it — reading, decoding, host->device transfer, top-P, per-class
  top-K, checkpointed parts — is all that is left: the stage's ceiling on any device."""

  def __init__(self, num_classes: int, dtype=None):
    self.num_classes = num_classes
    self.base = jax.random.normal(jax.random.key(1), (num_classes,))

  def init(self, rng, x, train=False):
    return {"params": {"scale": jnp.ones(())}, "batch_stats": {}}

  def apply(self, variables, x, train=False):
    first = x[:, 0, 0, 0].astype(jnp.float32)
    return variables["params"]["scale"] * (self.base[None, :] + first[:, None] * 1e-2)


def _ingested(num: int, workers: int, rng):
  """A ShardSource over ``num`` photo-like 500x375 JPEGs ingested to short side 256."""
  from ingest import photo_like  # benchmarks/ingest.py

  from bssl.data import ingest
  from bssl.data.shards import ShardSource

  d = tempfile.mkdtemp(prefix="bssl_bench_u_")
  os.makedirs(os.path.join(d, "in"))
  for i in range(num):
    with open(os.path.join(d, "in", f"{i:06d}.jpg"), "wb") as f:
      f.write(photo_like(500, 375, rng))
  ingest.run_ingest(
      os.path.join(d, "in"),
      os.path.join(d, "out"),
      ingest.Params(shard_size=256),
      log=lambda m: None,
  )
  return ShardSource(os.path.join(d, "out"), channels=3), d


def bench(
    name,
    num_images=None,
    batch=None,
    dtype="float32",
    rounds=3,
    threads=1,
    from_shards=None,
    workers=0,
):
  arch, kwargs, size, ch, classes, gbs, n, top_p, k = MODELS[name]
  from_shards = (ch == 3) if from_shards is None else from_shards
  n = num_images or n
  gbs = batch or gbs
  model = (
      NullModel(classes)
      if arch == "null"
      else create_model(
          arch, classes, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32, **kwargs
      )
  )
  mesh = parallel.make_mesh()
  variables = jax.jit(
      lambda r: model.init(r, jnp.zeros((1, size, size, ch)), train=False),
      out_shardings=parallel.replicated(mesh),
  )(jax.random.key(0, impl="rbg"))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(n, size, size, ch), dtype=np.uint8)
  mean, std = (120.0,) * ch, (60.0,) * ch
  shard_dir = None
  if from_shards:
    # U as the stage reads it at scale: ingested shards of 256-px JPEGs (made from
    # photo-like 500x375 JPEGs by the ingest path), decoded and centre-cropped to ``size``.
    unl, shard_dir = _ingested(min(n, 512), workers, rng)
    unl = sources.SubsetView(unl, np.arange(n) % len(unl), reindex=True)  # repeat to n
    spec = pipelines.ImageSpec(
        size=size, channels=ch, augment="none", eval_transform="resize_center_crop"
    )
  else:
    unl = sources.ArraySource(images)
    spec = pipelines.ImageSpec(size=size, channels=ch, augment="none")

  # (1) forward pass alone, on a device-resident batch; (2) the scoring stage end to end.
  # This VM's speed drifts by tens of percent within minutes, so the two are interleaved
  # over ``rounds`` and each round's share compares measurements taken a minute apart.
  fwd = jax.jit(lambda v, x: model.apply(v, normalize(x, mean, std), train=False))
  x = parallel.global_batch_from_local(mesh, images[:gbs])
  jax.block_until_ready(fwd(variables, x))
  reps = max(2, n // gbs)

  def forward_seconds_per_image():
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fwd(variables, x)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / (reps * gbs)

  scorer = JaxScorer(model, variables, top_p, mean, std)

  def stage_seconds(src, score_dir, checkpoint_every):
    t0 = time.perf_counter()
    parts = os.path.join(score_dir, "parts")
    gen, chunks = scoring.plan_chunks(parts, len(src), checkpoint_every * gbs)
    out = scoring.score_process(
        scorer=scorer,
        source=src,
        spec=spec,
        parts_dir=parts,
        gen=gen,
        chunks=chunks,
        process_index=0,
        process_count=1,
        num_classes=classes,
        k=k,
        p=top_p,
        local_batch_size=gbs,
        num_threads=threads,
        num_workers=workers,
        log=lambda m: None,
        log_every=10**9,
    )
    assert out["num_scored"] == len(src)
    return time.perf_counter() - t0

  fwd_ips, stage_ips, shares, ratios = [], [], [], []
  with tempfile.TemporaryDirectory() as d:
    stage_seconds(sources.ArraySource(images[:gbs]), os.path.join(d, "warm"), 1)  # compile
    for r in range(rounds):
      f = forward_seconds_per_image()
      st = stage_seconds(unl, os.path.join(d, f"run{r}"), 50)
      fwd_ips.append(1 / f)
      stage_ips.append(n / st)
      shares.append(max(0.0, 1.0 - f * n / st))
      ratios.append(stage_ips[-1] / fwd_ips[-1])
      print(
          f"[{name}] round {r + 1}/{rounds}: forward alone {fwd_ips[-1]:,.1f} img/s, "
          f"stage {stage_ips[-1]:,.1f} img/s, outside the forward pass "
          f"{100 * shares[-1]:.1f}%, stage/forward {ratios[-1]:.3f}",
          flush=True,
      )
  if shard_dir:
    import shutil

    shutil.rmtree(shard_dir, ignore_errors=True)
  share = float(np.median(shares))
  src = "ingested 256-px JPEG shards" if from_shards else "in-memory uint8 arrays"
  print(
      f"[{name}] {arch} {size}px {dtype} batch {gbs}, U from {src}, {threads} read "
      f"thread(s), {workers} decode worker process(es): forward alone "
      f"{np.median(fwd_ips):,.1f} img/s; scoring stage {np.median(stage_ips):,.1f} img/s over "
      f"{n:,} images; time outside the forward pass {100 * share:.1f}% (median of {rounds} "
      f"rounds)",
      flush=True,
  )
  return {
      "model": arch,
      "image_size": size,
      "dtype": dtype,
      "batch": gbs,
      "images": n,
      "forward_images_per_s": float(np.median(fwd_ips)),
      "stage_images_per_s": float(np.median(stage_ips)),
      "share_outside_forward": share,
      "stage_over_forward": float(np.median(ratios)),
      "from_shards": bool(from_shards),
      "threads": threads,
      "workers": workers,
      "rounds": {
          "forward_images_per_s": fwd_ips,
          "stage_images_per_s": stage_ips,
          "share_outside_forward": shares,
      },
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="demo,resnet50")
  ap.add_argument("--images", type=int, default=None)
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument(
      "--rounds",
      type=int,
      default=3,
      help="interleaved (forward alone, whole stage) rounds; medians reported",
  )
  ap.add_argument(
      "--threads",
      type=int,
      default=1,
      help="grain read threads of the scoring pipeline (config num_threads)",
  )
  ap.add_argument(
      "--workers",
      type=int,
      default=0,
      help="decode worker processes (config score.num_workers; 0: threads only)",
  )
  ap.add_argument(
      "--source",
      default="auto",
      choices=("auto", "shards", "memory"),
      help="U: ingested shards (RGB models by default) or in-memory arrays",
  )
  args = ap.parse_args(argv)
  print(
      f"devices: {jax.devices()}; malloc {'tuned' if MALLOC_TUNED else 'glibc default'}", flush=True
  )
  shards = {"auto": None, "shards": True, "memory": False}[args.source]
  res = {
      m: bench(
          m, args.images, args.batch, args.dtype, args.rounds, args.threads, shards, args.workers
      )
      for m in args.models.split(",")
  }
  res["device"] = str(jax.devices()[0].device_kind)
  res["stage_over_forward"] = res[args.models.split(",")[-1]]["stage_over_forward"]
  print(json.dumps(res))
  return res


if __name__ == "__main__":
  main()
