"""Running a sweep's grid: each point is one engine run in ``<sweep>/points/<name>`` that
shares every stage it does not change (:mod:`bssl.sweep.share`); the points run one after
the other in this process, or ``jobs`` at once as worker processes
(:mod:`bssl.sweep.workers`); the summary is written at the end (:mod:`bssl.sweep.summary`).
Rerunning continues the grid: finished points are kept, an interrupted one resumes.
"""

from __future__ import annotations

import shlex
import sys
import time

from bssl import engine, storage
from bssl import workdir as workdir_lib
from bssl.progress import eta
from bssl.sweep import grid, share, summary, workers


def run_point(base, root: str, axes, point: dict, share_from=(), log=print) -> list[str]:
  """One point as an engine run sharing stages; returns the stages it copied."""
  cfg = grid.point_config(base, point, axes)
  wd = workdir_lib.Workdir(str(storage.path(root) / "points" / point["name"]))
  sharer = share.Sharer(root, point["name"], share_from, log)
  # a grown grid (a larger K: score.max_k) makes some of a point's finished stages stale:
  # they are deleted (printed) and recomputed; the rest are kept
  engine.run_recipe(cfg, str(wd.root), share=sharer, recompute_stale=True)
  return sharer.copied


def run_claimed_point(base, root: str, axes, point: dict, share_from=(), guard=True, log=print):
  """``run_point`` with this process entered in ``<root>/running/`` meanwhile (``guard``:
  refused while another process works on the same point)."""
  entry = workers.claim_running(root, point["name"], log=log) if guard else None
  try:
    return run_point(base, root, axes, point, share_from, log)
  finally:
    workers.release_running(entry)


def run_sweep(
    base,
    root: str,
    axes,
    seeds,
    log=print,
    share_from=(),
    jobs: int = 1,
    point_argv: list[str] | None = None,
    guard: bool = True,
) -> dict:
  """Runs every point (sharing stages), then collects. Resumable. ``jobs`` > 1 runs points
  in that many processes (``point_argv``: this command's arguments, rerun with
  ``--point=<name>`` for each; each point's log in ``points/<name>/sweep.log``), which get
  SIGTERM if this process dies. ``guard``: refuse (SweepError) while processes of an
  earlier sweep still work in ``root`` (``<root>/running/``; one process per point)."""
  root_p = storage.path(root)
  me = workers.claim_running(root_p, "_sweep", log=log) if guard else None
  try:
    if guard:
      workers.check_running(root_p, log=log)  # e.g. the point workers of a killed sweep
    return _run_grid(base, root, axes, seeds, log, share_from, jobs, point_argv, guard)
  finally:
    workers.release_running(me)


def _run_grid(base, root, axes, seeds, log, share_from, jobs, point_argv, guard) -> dict:
  pts = grid.points(base, axes, seeds)
  root_p = storage.path(root)
  storage.write_json(root_p / "grid.json", {"axes": [[n, v] for n, v in axes], "seeds": seeds})
  todo = [
      p
      for p in pts
      if workdir_lib.Workdir(str(root_p / "points" / p["name"])).done("report") is None
  ]
  log(
      f"sweep: {len(pts)} points, {len(pts) - len(todo)} complete, {len(todo)} to run"
      + (f" in {jobs} parallel processes" if jobs > 1 and todo else "")
  )
  t0, finished = time.time(), 0

  def progress(p, what):
    nonlocal finished
    finished += 1
    log(
        f"sweep: point {p['name']} {what}; {finished}/{len(todo)} run, "
        f"eta {eta(finished, len(todo), time.time() - t0)}"
    )

  if jobs <= 1 or len(todo) <= 1:
    for p in todo:
      log(f"sweep: point {pts.index(p) + 1}/{len(pts)} {p['name']}")
      run_claimed_point(base, root, axes, p, share_from, guard, log)
      progress(p, "done")
    return summary.collect(root, axes, pts)
  failed, stop = workers.run_points(todo, jobs, root_p, point_argv, progress, log)
  if failed or stop:
    summary.collect(root, axes, pts)
    codes = {c for _, c in failed}
    code = 143 if stop or codes == {143} else 2 if 2 in codes else 1
    log(f"sweep: {len(failed)} point(s) failed: {failed}; rerun the same command to continue")
    if code == 143:  # preempted: exits 143 with the line on stderr, as one process does
      raise workers.Terminated(
          f"{'SIGTERM; ' if stop else ''}points stopped: "
          f"{', '.join(n for n, _ in failed) or 'none'}"
      )
    raise workers.PointsFailed(failed, code)
  return summary.collect(root, axes, pts)


def emit(base, axes, seeds, argv: list[str]) -> list[str]:
  """One command per point (grid order): this command with ``--point=<name>``; each
  shares the finished stages of the points before it (run them in grid order; points run
  at once on one machine wait for a stage another is computing)."""
  return [
      " ".join(
          shlex.quote(a)
          for a in [sys.executable, "-m", "bssl.sweep", *argv, f"--point={p['name']}"]
      )
      for p in grid.points(base, axes, seeds)
  ]
