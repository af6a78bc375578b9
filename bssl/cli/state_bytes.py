"""Bytes of train state per device, for every model of the registry, under each mesh:
``python -m bssl.cli.state_bytes [--models=a,b] [--fsdp=1,2,4,8] [--hbm_gb=16]``.

From abstract shapes only (``jax.eval_shape`` of the model's init and of the optimizer's:
nothing is allocated, no device is needed): weights (with BatchNorm statistics), SGD
momentum and gradients, each array laid out as :func:`bssl.parallel.fsdp_spec` lays it
out on an ``fsdp`` axis of that size (1: replicated, the one-axis mesh). The ``data``
axis does not change these bytes. Activations, and the weights XLA gathers for the
layer it computes, come on top. Prints a Markdown table (docs/scale.md has it).
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bssl import models, parallel, train

# the input each model is built for: ImageNet images, Kinetics clips, the demo's digits
_IMAGE, _CLIP, _SMALL = (224, 224, 3), (16, 112, 112, 3), (28, 28, 1)


def _input(name: str) -> tuple[int, ...]:
  if models.is_video_model(name):
    return (8, 32, 32, 1) if name.endswith("_small") else _CLIP
  return _SMALL if name == "resnet_small" else _IMAGE


def abstract_state(name: str, num_classes: int | None = None) -> dict:
  """ShapeDtypeStructs of ``name``'s weights, BatchNorm statistics, momentum and gradients."""
  if num_classes is None:
    num_classes = 400 if models.is_video_model(name) else 1000
  model = models.create_model(name, num_classes)
  x = jax.ShapeDtypeStruct((1, *_input(name)), jnp.float32)
  v = jax.eval_shape(lambda r: model.init(r, jnp.zeros(x.shape), train=False), jax.random.key(0))
  opt = ml_collections.ConfigDict(dict(weight_decay=1e-4, momentum=0.9, nesterov=False))
  tx = train.make_optimizer(opt, optax.constant_schedule(0.1))
  return {
      "weights": {"params": v["params"], "batch_stats": v["batch_stats"]},
      "momentum": jax.eval_shape(tx.init, v["params"]),
      "gradients": v["params"],
  }


def _bytes(tree, fsdp: int) -> tuple[int, int]:
  """(bytes per device, bytes of the arrays left replicated) of ``tree`` under ``fsdp``."""
  per_device = unsharded = 0
  for s in jax.tree.leaves(tree):
    n = math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
    if parallel.fsdp_spec(s.shape, fsdp) == jax.sharding.PartitionSpec():
      per_device += n
      unsharded += n
    else:
      per_device += n // fsdp
  return per_device, unsharded


def state_bytes(name: str, fsdps=(1, 2, 4, 8)) -> dict:
  """``{"params": count, "fsdp": {n: {"total", "weights", "momentum", "gradients",
  "unsharded"}}}``: bytes per device of ``name``'s train state under each fsdp size."""
  st = abstract_state(name)
  out: dict = {"params": models.count_params(st["gradients"]), "fsdp": {}}
  for n in fsdps:
    parts = {k: _bytes(v, n) for k, v in st.items()}
    row = {k: b for k, (b, _) in parts.items()}
    row["total"] = sum(row.values())
    row["unsharded"] = sum(u for _, u in parts.values())
    out["fsdp"][n] = row
  return out


def table(names, fsdps=(1, 2, 4, 8), hbm_gb: float = 16.0) -> str:
  """The Markdown table: GB (1e9 bytes) per device; ✓ where the state leaves at least
  half of an ``hbm_gb`` chip to activations and the gathered weights of a layer."""
  head = " | ".join("replicated" if n == 1 else f"fsdp={n}" for n in fsdps)
  lines = [
      f"| model | parameters | {head} | unsharded remainder |",
      "|---" * (len(fsdps) + 3) + "|",
  ]
  for name in names:
    r = state_bytes(name, fsdps)
    cells = []
    for n in fsdps:
      gb = r["fsdp"][n]["total"] / 1e9
      cells.append(f"{gb:.3g}" + (" ✓" if gb <= hbm_gb / 2 else ""))
    rest = r["fsdp"][max(fsdps)]["unsharded"] / 1e6
    lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {' | '.join(cells)} | {rest:.2g} MB |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="bssl.cli.state_bytes", description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default=",".join(models.MODEL_NAMES), help="comma-separated")
  p.add_argument("--fsdp", default="1,2,4,8", help="fsdp axis sizes (1: replicated)")
  p.add_argument("--hbm_gb", type=float, default=16.0, help="device memory, GB (TPU v5e: 16)")
  a = p.parse_args(argv)
  names = [n for n in a.models.split(",") if n]
  bad = sorted(set(names) - set(models.MODEL_NAMES))
  if bad:
    p.error(f"unknown --models {bad}; accepted: {', '.join(models.MODEL_NAMES)}")
  try:
    fsdps = tuple(int(n) for n in a.fsdp.split(","))
  except ValueError:
    p.error(f"--fsdp must be comma-separated positive integers, got {a.fsdp!r}")
  if not fsdps or min(fsdps) < 1:
    p.error(f"--fsdp must be comma-separated positive integers, got {a.fsdp!r}")
  print(
      f"Train state per device (GB = 1e9 bytes): weights + BatchNorm statistics + SGD "
      f"momentum + gradients, float32; arrays under {parallel.FSDP_MIN_SIZE} elements "
      f"replicated. ✓: at most half of a {a.hbm_gb:g}-GB chip."
  )
  print(table(names, fsdps, a.hbm_gb))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
