"""Entry point: ``python -m bssl.main --config=configs/demo.py --workdir=/tmp/run``.

``--config.<field>=<value>`` overrides a field (e.g. ``--config.select.k=2000``);
``--config.stages=teacher,score`` runs a subset. Rerunning the same command after a
crash or preemption continues where the work directory left off.
"""
import sys

from bssl import hostmem

hostmem.tune_malloc()  # before JAX starts its threads (see bssl/hostmem.py)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bssl import parallel  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:preset]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory for all artifacts.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (also: BSSL_DISTRIBUTED=1).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Libraries (orbax above all) log every checkpoint step at INFO; bssl prints its own
  # progress lines. `--verbosity=0` (absl's flag) brings their logs back.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # Multi-host init happens before anything touches devices.
  parallel.maybe_initialize_distributed(force=_DISTRIBUTED.value)
  from bssl import config_lib, pipeline, train
  from bssl.data.sources import DataError
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/bssl_demo")
  try:
    pipeline.run(cfg, _WORKDIR.value)
  except (config_lib.ConfigError, DataError, FileNotFoundError) as e:
    print(f"bssl: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except train.Preempted as e:
    print(f"bssl: {e}; rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(143)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
