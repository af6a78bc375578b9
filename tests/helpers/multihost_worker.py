"""One process of the multi-host test: a few training steps, then scoring + selection.

Launched as 2 processes x 2 fake devices by launch/local.sh, or as 1 process x 4
devices for the reference. Writes OUT/params.npz and OUT/dhat (process 0).
usage: tests/helpers/multihost_worker.py OUT
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bssl import parallel

parallel.maybe_initialize_distributed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import train_worker as tw  # noqa: E402

from bssl import scoring, selection  # noqa: E402
from bssl.backends.jax import JaxScorer  # noqa: E402
from bssl.data import pipelines, sources  # noqa: E402
from bssl.models import create_model  # noqa: E402


def main(out):
  assert jax.device_count() == 4, jax.device_count()
  os.makedirs(out, exist_ok=True)
  # Training: 4 steps of the tiny model, global batch 16, synchronised BN.
  res = tw.run(os.path.join(out, "train"), tw.tiny_cfg(steps=4, checkpoint_every=2))
  flat = tw.flat(res["variables"])
  # Scoring + selection of 90 fake images with a fixed model.
  model = create_model("resnet_small", 4, widths=(4,), depths=(1,))
  mesh = parallel.make_mesh()
  variables = jax.jit(
      lambda r: model.init(r, jnp.zeros((1, 8, 8, 1)), train=False),
      out_shardings=parallel.replicated(mesh),
  )(jax.random.key(1, impl="rbg"))
  src = sources.fake_source(90, (8, 8, 1), 4, seed=5)
  unl = sources.SubsetView(src, np.arange(90), hide_labels=True, reindex=True)
  # Scoring: each process scores its own chunks of U on its own devices (the score stage's
  # protocol: every process plans from the same listing, then writes only its own part).
  parts = os.path.join(out, "score", "parts")
  spec = pipelines.ImageSpec(size=8, channels=1, augment="none")
  scorer = JaxScorer(model, variables, 2, (100.0,), (60.0,))
  gen, chunks = scoring.plan_chunks(parts, len(unl), 32)
  parallel.sync("planned")
  res = scoring.score_process(
      scorer=scorer,
      source=unl,
      spec=spec,
      parts_dir=parts,
      gen=gen,
      chunks=chunks,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_classes=4,
      k=6,
      p=2,
      local_batch_size=16 // jax.process_count(),
  )
  print("SCORED", jax.process_index(), res["num_scored"], flush=True)
  parallel.sync("scored")
  if parallel.is_main_process():
    np.savez(os.path.join(out, "params.npz"), **flat)
    acc, info = scoring.merge_parts(parts, len(unl))
    selection.write_selection(os.path.join(out, "dhat"), acc.result())
    print("MULTIHOST_DONE", jax.process_count(), info["num_scored"], flush=True)
  parallel.sync("written")


if __name__ == "__main__":
  main(sys.argv[1])
