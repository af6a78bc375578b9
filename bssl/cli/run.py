"""``bssl`` / ``python -m bssl.main --config=configs/demo.py --workdir=/tmp/run`` (the
packaged configs are found from any folder: ``--config=demo``).

``--config.<field>=<value>`` overrides a field (e.g. ``--config.select.k=2000``);
``--config.stages=teacher,score`` runs a subset. Rerunning the same command after a
crash or preemption continues where the work directory (local or ``gs://``) left off.
One command at a time per work directory (``<workdir>/lock.json``): a second exits 2
naming the first (host, pid, since when, command), or waits for it with
``--wait_for_lock``; the lock of a command that is gone (killed, or its host silent for
5 minutes) is taken over.

Exit codes: 0 done; 2 a user error (bad flag, config, data or work directory: one line on
stderr, nothing written); 143 preempted by SIGTERM (a checkpoint was saved; rerun).
"""

from absl import flags, logging

from bssl import engine, parallel
from bssl.cli import common

CONFIG, WORKDIR = common.define_config_flags()
_RECOMPUTE_STALE = flags.DEFINE_bool(
    "recompute_stale",
    False,
    "Delete the stages of --workdir that are stale (made with "
    "another config or other inputs, or reading such a stage), printing each, and rerun "
    "them; without it such a run is refused, naming every stale folder.",
)
_WAIT_FOR_LOCK = flags.DEFINE_bool(
    "wait_for_lock",
    False,
    "When another bssl command runs in --workdir (it holds <workdir>/lock.json), wait for "
    "it to end (a line now and then), then run; without it such a run exits 2 naming it.",
)
_DISTRIBUTED = common.define_distributed_flag()


def main(argv):
  del argv  # (positional arguments are refused by common.run)
  # Libraries (orbax above all) log every checkpoint step at INFO; bssl prints its own
  # progress lines. `--verbosity=0` (absl's flag) brings their logs back.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  cfg = common.config_and_workdir(
      "--workdir is required, e.g. --workdir=/tmp/bssl_demo or gs://bucket/run"
  )
  # Multi-host init happens before anything touches devices.
  parallel.maybe_initialize_distributed(force=_DISTRIBUTED.value)
  engine.run_recipe(
      cfg,
      WORKDIR.value,
      recompute_stale=_RECOMPUTE_STALE.value,
      wait_for_lock=_WAIT_FOR_LOCK.value,
  )


def run():
  """The ``bssl`` console command (= ``python -m bssl.main``)."""
  common.run(main, prog="bssl")


if __name__ == "__main__":
  run()
