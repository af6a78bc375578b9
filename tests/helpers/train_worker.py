"""A tiny training run in its own process, for the kill -9 and device-count resume tests.

python tests/helpers/train_worker.py WORKDIR OUT.npz [--bn_mode sync] [--stop_after_steps N]

The device count is XLA_FLAGS=--xla_force_host_platform_device_count (default 2 here).
With --stop_after_steps the run stops (as a crash would, without a final save) after N
steps of this call and OUT is not written.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  ).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import ml_collections
import numpy as np

from bssl import models, parallel, train
from bssl.data import pipelines, sources

SPEC = pipelines.ImageSpec(size=8, channels=1, augment="pad_crop_flip", pad=1)
NUM_CLASSES = 4


def tiny_cfg(steps=12, checkpoint_every=2, bn_mode="sync", lr=0.1):
  return ml_collections.ConfigDict(
      dict(
          steps=steps,
          batch_size=16,
          lr=lr,
          schedule="cosine",
          warmup_fraction=0.1,
          momentum=0.9,
          nesterov=True,
          weight_decay=5e-4,
          label_smoothing=0.1,
          bn_mode=bn_mode,
          log_every=1,
          checkpoint_every=checkpoint_every,
          keep_checkpoints=2,
      )
  )


def tiny_model():
  return models.create_model("resnet_small", NUM_CLASSES, widths=(4, 8), depths=(1, 1))


def tiny_source():
  return sources.fake_source(64, (8, 8, 1), NUM_CLASSES, seed=7)


def run(workdir, cfg, mesh=None, **kw):
  return train.fit(
      name="tiny",
      model=tiny_model(),
      cfg=cfg,
      source=tiny_source(),
      spec=SPEC,
      mesh=mesh or parallel.make_mesh(),
      workdir=workdir,
      num_classes=NUM_CLASSES,
      mean=(100.0,),
      std=(60.0,),
      seed=3,
      **kw,
  )


def flat(variables):
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(variables))
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


if __name__ == "__main__":
  import argparse

  ap = argparse.ArgumentParser()
  ap.add_argument("workdir")
  ap.add_argument("out")
  ap.add_argument("--bn_mode", default="sync")
  ap.add_argument("--stop_after_steps", type=int, default=None)
  args = ap.parse_args()
  res = run(args.workdir, tiny_cfg(bn_mode=args.bn_mode), stop_after_steps=args.stop_after_steps)
  print(f"DEVICES {jax.device_count()}", flush=True)
  if "interrupted_at" in res:
    print(f"INTERRUPTED {res['interrupted_at']}", flush=True)
  else:
    np.savez(args.out, **flat(res["variables"]))
    print("FINISHED", flush=True)
