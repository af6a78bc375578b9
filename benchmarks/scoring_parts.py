"""Where a scoring batch's time goes, part by part (for the host-bound GPU stage).

Times, per batch of ``--batch`` random uint8 images of ``--size`` px, each part alone:
  input     the scoring pipeline producing one batch (``pipelines.ranges_dataset`` over
            ``pipelines.range_batches``, as ``scoring.score_process`` reads U)
  transfer  host -> this process's devices (``jax.device_put`` with the scorer's input
            sharding, what ``JaxScorer.dispatch`` does), waited for
  score     the scorer's jitted step (forward + softmax + top-P) on a batch already on
            the devices, waited for
  fetch     the step's outputs back to numpy (``JaxScorer.fetch``)

    python benchmarks/scoring_parts.py --model resnet50 --batch 512 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bssl import parallel
from bssl.backends.jax import JaxScorer
from bssl.data import pipelines, sources
from bssl.models import create_model


def _ms(fn, reps):
  fn()
  t0 = time.perf_counter()
  for _ in range(reps):
    fn()
  return 1000 * (time.perf_counter() - t0) / reps


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="resnet50")
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=512)
  ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  ap.add_argument("--reps", type=int, default=10)
  args = ap.parse_args(argv)
  b, size = args.batch, args.size
  model = create_model(
      args.model, 1000, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  )
  mesh = parallel.make_mesh()
  variables = jax.jit(
      lambda r: model.init(r, jnp.zeros((1, size, size, 3)), train=False),
      out_shardings=parallel.replicated(mesh),
  )(jax.random.key(0, impl="rbg"))
  images = np.random.default_rng(0).integers(0, 256, (4 * b, size, size, 3), dtype=np.uint8)
  spec = pipelines.ImageSpec(size=size, channels=3, augment="none")
  src = sources.ArraySource(images)
  scorer = JaxScorer(model, variables, 10, (120.0,) * 3, (60.0,) * 3)
  x = jax.device_put(images[:b], scorer.in_sharding)
  out = scorer.step(scorer.variables, x)
  jax.block_until_ready(out)
  bounds = pipelines.range_batches(0, len(src), b)

  def make_input():
    return next(
        iter(
            pipelines.ranges_dataset(
                src, spec, batch_size=b, bounds=bounds[:1], prefetch=0, num_threads=0
            )
        )
    )

  parts = {
      "input": _ms(make_input, max(2, args.reps // 3)),
      "transfer": _ms(
          lambda: jax.block_until_ready(jax.device_put(images[:b], scorer.in_sharding)), args.reps
      ),
      "score": _ms(lambda: jax.block_until_ready(scorer.step(scorer.variables, x)), args.reps),
      "fetch": _ms(lambda: scorer.fetch(out), args.reps),
  }
  print(
      f"[scoring_parts] {jax.devices()[0].device_kind}, {args.model} {size}px "
      f"{args.dtype}, batch {b} ({images[:b].nbytes / 2**20:.0f} MiB of uint8):"
  )
  for k, v in parts.items():
    print(f"  {k:9s} {v:8.1f} ms/batch  ({b / v * 1000:,.0f} images/s alone)")


if __name__ == "__main__":
  main()
