"""Grids of recipe runs: ``python -m bssl.sweep --config=configs/demo.py --workdir=DIR
--sweep=select.k=1000,2000,5000 [--sweep=unlabelled.limit=...] [--seeds=0,1,2]``.

Every point of the grid (the product of the axes, times the seeds) is one engine run in
``DIR/points/<name>``, and shares every artifact that the point does not change: before a
point runs, each of its stages whose record (every config field and input file it read,
the stages it read; :mod:`bssl.deps`) holds for the point is copied from the point that
made it, so one teacher is trained per
seed and teacher setting, and one scoring pass serves a seed's every K and P (the sweep
scores once with ``score.max_k`` / ``score.max_p`` = the largest of the grid: the exact
D̂ of any smaller K and P is derived from it). Rerunning the command continues the grid:
an interrupted point resumes where it stopped. Before any point runs, the engine plans
every point with work in its folder under the config now: a rerun with another base
config or other inputs, or a grid grown so that a finished stage no longer holds, is
refused (exit 2, one line naming every stale point and its stale folders);
``--recompute_stale`` deletes exactly those (printed) and recomputes them, keeping the
rest. Point folders are named by their values alone (a path, dict or list: a readable
part and a hash), so another grid in the same ``DIR`` never finds another value's work.

``--jobs=N`` runs N points at once, each in its own process (a point that needs a stage
another point is computing waits for it, then copies it; SIGTERM is passed on to them).
It is meant for CPU machines: on one GPU or TPU, N processes would compete for it. ``--share_from=DIR,...`` lets
points copy finished stages of other sweeps (one baseline and teacher for every axis).
``--emit`` prints one command per point instead (this command with ``--point=<name>``, for
a SLURM array or a pod); run them in grid order so that shared stages exist when a later
point starts (run at once, a stage shared by points running on different machines may
be computed twice, never wrongly); ``--collect`` then writes the summary. The summary: ``DIR/sweep.json`` (every point: overrides, seed,
top-1 of every model, D̂ size and label precision), ``DIR/sweep.md`` (a table per axis:
mean ± std over seeds) and ``DIR/<axis>.png`` (student and baseline top-1 against the
axis; log x for sizes and counts); ``--collect`` shows no number of a point made with
another config (listed, with the command that recomputes it) or of a model replaced since
its point's report (listed, with the command that measures it again).

SIGTERM exits 143 wherever it lands (a training loop saves a checkpoint first); the point
workers of ``--jobs`` get SIGTERM when the sweep dies, even by SIGKILL. While a process works
in ``DIR`` it has an entry in ``DIR/running/``: a rerun refuses (exit 2, naming them) while
another sweep or point command still runs there, and waits for the workers of a killed
sweep to stop. Seeds are swept with ``--seeds`` only (``--sweep=seed=...`` is refused).
See docs/reproduction.md, "Running the sweeps".

Exit codes: 0 done, 2 a user error (one line), 143 preempted (rerun to continue).
The library: :mod:`bssl.sweep` (grid, share, runner, workers, summary).
"""

from __future__ import annotations

import json
import shlex
import signal
import sys

from absl import flags, logging

from bssl import parallel, storage, train
from bssl.cli import common
from bssl.sweep import grid, runner, workers

CONFIG, WORKDIR = common.define_config_flags()
_SWEEP = flags.DEFINE_multi_string("sweep", [], "<field>=<v1>,<v2>,... (repeat for a grid)")
_SEEDS = flags.DEFINE_string("seeds", "0", "Comma-separated seeds.")
_EMIT = flags.DEFINE_bool("emit", False, "Print one command per point instead of running.")
_COLLECT = flags.DEFINE_bool("collect", False, "Only write sweep.json/md and figures.")
_JOBS = flags.DEFINE_integer(
    "jobs",
    1,
    "Points run at once, each in its own process (local "
    "--workdir); points that share a stage wait for it.",
)
_SHARE_FROM = flags.DEFINE_string(
    "share_from",
    "",
    "Comma-separated --workdir folders of other sweeps "
    "whose finished stages may be copied (e.g. one baseline for all axes).",
)
_POINT = flags.DEFINE_string("point", "", "Run one point of the grid (what --jobs runs).")
_RECOMPUTE_STALE = flags.DEFINE_bool(
    "recompute_stale",
    False,
    "Delete the stages of the grid's points that are stale (made with another config or "
    "other inputs, or reading such a stage), printing each, and recompute them; without it "
    "a sweep with such points is refused before any point runs, naming each and its stale "
    "folders.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (also: BSSL_DISTRIBUTED=1)."
)

_NOT_FOR_POINTS = ("--jobs=", "--emit", "--noemit", "--collect", "--nocollect")


def _point_argv(argv: list[str]) -> list[str]:
  """This command's arguments as a point worker (or ``--emit``'s commands) takes them:
  without ``--jobs``, ``--emit`` and ``--collect``."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == "--jobs":
      skip = True  # "--jobs N"
    elif not a.startswith(_NOT_FOR_POINTS):
      out.append(a)
  return out


def _rerun_command(argv: list[str]) -> str:
  """The command that reruns this sweep (the summary's advice): these arguments without
  ``--collect`` and ``--recompute_stale``."""
  drop = ("--collect", "--nocollect", "--recompute_stale", "--norecompute_stale")
  return shlex.join(
      ["python", "-m", "bssl.sweep"]
      + [a for a in argv if a not in drop and not a.startswith(tuple(d + "=" for d in drop))]
  )


def main(argv):
  del argv  # (positional arguments are refused by common.run)
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO, as bssl
    logging.set_verbosity(logging.WARNING)
  base = common.config_and_workdir("--workdir is required (the sweep's folder, local or gs://)")
  workdir = WORKDIR.value
  if not _SWEEP.value:
    common.fail("--sweep is required, e.g. --sweep=select.k=1000,2000,5000")
  try:
    axes, seeds = grid.parse_grid(base, _SWEEP.value, _SEEDS.value)
    point_argv = _point_argv(sys.argv[1:])
    if _EMIT.value:  # the grid planned first: stale points refused here, not one by one
      runner.plan_points(
          base,
          workdir,
          axes,
          grid.points(base, axes, seeds),
          _RECOMPUTE_STALE.value,
          log=lambda m: print(m, file=sys.stderr),
      )
      print("\n".join(runner.emit(base, axes, seeds, point_argv)))
      return
    share_from = [r for r in _SHARE_FROM.value.split(",") if r.strip()]
    for r in share_from:
      if not storage.path(r).is_dir():
        raise grid.SweepError(f"--share_from: {r!r} is not a folder (another sweep's --workdir)")
    jobs = _JOBS.value
    if jobs < 1:
      raise grid.SweepError(f"--jobs must be a positive integer, got {jobs}")
    if jobs > 1 and storage.is_remote(workdir):
      raise grid.SweepError(
          "--jobs > 1 runs points as processes on this machine and needs a "
          "local --workdir; on a cluster use --emit"
      )
    # SIGTERM exits 143 wherever it lands (a training loop saves a checkpoint first)
    signal.signal(signal.SIGTERM, workers.on_sigterm)
    if _POINT.value:
      pts = {p["name"]: p for p in grid.points(base, axes, seeds)}
      if _POINT.value not in pts:
        raise grid.SweepError(f"--point: {_POINT.value!r} is not a point of this grid")
      parallel.maybe_initialize_distributed(force=_DISTRIBUTED.value)
      runner.run_claimed_point(
          base,
          workdir,
          axes,
          pts[_POINT.value],
          share_from,
          guard=parallel.process_count() == 1,
          recompute_stale=_RECOMPUTE_STALE.value,
      )
      return
    rerun = _rerun_command(sys.argv[1:])
    if _COLLECT.value:
      s = runner.collect(base, workdir, axes, seeds, rerun=rerun)
    else:
      parallel.maybe_initialize_distributed(force=_DISTRIBUTED.value)
      if jobs > 1 and parallel.process_count() > 1:
        raise grid.SweepError("--jobs > 1 cannot be combined with a multi-process launch")
      s = runner.run_sweep(
          base,
          workdir,
          axes,
          seeds,
          share_from=share_from,
          jobs=jobs,
          point_argv=point_argv,
          guard=parallel.process_count() == 1,
          recompute_stale=_RECOMPUTE_STALE.value,
          rerun=rerun,
      )
    print(json.dumps({k: s[k] for k in ("num_points", "num_done")}))
  except workers.PointsFailed as e:  # each failure was logged, with its point's log file
    sys.exit(e.code)
  except (train.Preempted, workers.Terminated) as e:
    workers.exit_preempted(str(e))


def run():
  """The ``bssl-sweep`` console command (= ``python -m bssl.sweep``)."""
  workers.die_with_parent()  # a point worker of --jobs: SIGTERM when its sweep dies
  common.run(main, prog="bssl", errors=(grid.SweepError, *common.user_errors()))


if __name__ == "__main__":
  run()
