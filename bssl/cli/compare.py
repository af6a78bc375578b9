"""JAX against PyTorch: the same recipe in both frameworks, side by side, over several seeds.

    bssl-compare --config=configs/demo.py:compare --workdir=runs/compare
    python -m bssl.compare --config=configs/demo.py:tiny --workdir=/tmp/c --seeds=0,1

A sweep over the backend axis (:mod:`bssl.sweep.compare`): for every seed, the whole recipe
runs through the engine on the JAX backend in ``<workdir>/jax/seed_<s>`` and on the
PyTorch backend in ``<workdir>/torch/seed_<s>``, on the same data splits, the same batches
and the same hyperparameters. By default the PyTorch seeds run in a second process beside
the JAX ones (``--parallel``); a rerun resumes each where it stopped. The results go to
``<workdir>/compare.json`` and ``<workdir>/compare.md`` (:mod:`bssl.sweep.compare_report`):
per model, mean ± sd over seeds in each framework, the difference and whether the two agree
within seed noise (|Δ| ≤ 2 × its standard error); the overlap of the two teachers' D̂.

Speed is measured apart, by ``python benchmarks/framework_speed.py --config=...``: the same
train step and the same scoring (log-odds top-P) timed in both frameworks.

Exit codes: 0 done, 2 a user error (one line), 143 preempted (rerun to continue).
"""

from __future__ import annotations

import sys

from absl import flags, logging

from bssl.cli import common
from bssl.sweep import compare

CONFIG, WORKDIR = common.define_config_flags()
_SEEDS = flags.DEFINE_list(
    "seeds", ["0", "1", "2"], "Seeds (each: data split, initialisation, batches)."
)
_FRAMEWORKS = flags.DEFINE_list(
    "frameworks", ["jax", "torch"], "Frameworks (the backend axis) to run: jax, torch."
)
_PARALLEL = flags.DEFINE_bool(
    "parallel", True, "Run the PyTorch seeds in a second process beside the JAX ones."
)
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads",
    1,
    "torch.set_num_threads for the PyTorch recipe (0: PyTorch's default, "
    "one per core; on a shared CPU its OpenMP threads slow down badly under contention).",
)
_JAX_CACHE = flags.DEFINE_bool(
    "jax_cache",
    True,
    "Persistent XLA compilation cache in <workdir>/jax_cache (seeds after "
    "the first reuse the compiled steps).",
)


def main(argv):
  del argv  # (positional arguments are refused by common.run)
  cfg = common.config_and_workdir("--workdir is required (the comparison's folder)")
  logging.set_verbosity(logging.WARNING)  # orbax's per-checkpoint INFO lines
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    common.fail(f"--seeds must be integers, got {','.join(_SEEDS.value)}")
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    common.fail(f"--seeds must be distinct non-negative integers, got {','.join(_SEEDS.value)}")
  frameworks = list(_FRAMEWORKS.value)
  bad = [fw for fw in frameworks if fw not in compare.BACKENDS]
  if bad or not frameworks:
    common.fail(f"--frameworks: {','.join(bad) or '(none)'} not accepted; give jax, torch or both")
  config_name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  compare.compare(
      cfg,
      WORKDIR.value,
      seeds=seeds,
      frameworks=frameworks,
      parallel=_PARALLEL.value,
      torch_threads=_TORCH_THREADS.value,
      jax_cache=_JAX_CACHE.value,
      config_name=config_name,
  )


def run():
  """The ``bssl-compare`` console command (= ``python -m bssl.compare``)."""
  common.run(main, prog="bssl")


if __name__ == "__main__":
  run()
