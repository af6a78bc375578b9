"""Running a sweep's grid: each point is one engine run in ``<sweep>/points/<name>`` that
shares every stage it does not change (:mod:`bssl.sweep.share`); the points run one after
the other in this process, or ``jobs`` at once as worker processes
(:mod:`bssl.sweep.workers`); the summary is written at the end (:mod:`bssl.sweep.summary`).

Before any point runs, the engine plans every point that has work in its folder
(:func:`bssl.engine.check_recipe`, the checks of a run): a rerun whose base config or
inputs changed is refused in one line naming every stale point and its stale folders,
or, with ``recompute_stale``, those folders are deleted (printed) and recomputed, as for
one run. Then every point is run through the engine, finished ones included: each
reuses what holds (an unchanged point only measures again a model replaced since its
report, and rewrites the report). A rerun continues the grid: an interrupted point resumes.
"""

from __future__ import annotations

import shlex
import sys
import time

from bssl import engine, storage
from bssl import workdir as workdir_lib
from bssl.progress import eta
from bssl.sweep import grid, share, summary, workers


def run_point(
    base, root: str, axes, point: dict, share_from=(), log=print, recompute_stale=False
) -> list[str]:
  """One point as an engine run sharing stages; returns the stages it copied. The engine
  plans it as any run: stale stages (another config or other inputs) are refused, or with
  ``recompute_stale`` deleted (printed) and recomputed; the rest is kept."""
  cfg = grid.point_config(base, point, axes)
  wd = workdir_lib.Workdir(str(storage.path(root) / "points" / point["name"]))
  sharer = share.Sharer(root, point["name"], share_from, log)
  engine.run_recipe(cfg, str(wd.root), share=sharer, recompute_stale=recompute_stale)
  return sharer.copied


def run_claimed_point(
    base, root: str, axes, point: dict, share_from=(), guard=True, log=print, recompute_stale=False
):
  """``run_point`` with this process entered in ``<root>/running/`` meanwhile (``guard``:
  refused while another process works on the same point)."""
  entry = workers.claim_running(root, point["name"], log=log) if guard else None
  try:
    return run_point(base, root, axes, point, share_from, log, recompute_stale)
  finally:
    workers.release_running(entry)


def check_point(base, root, axes, point: dict) -> dict | None:
  """The engine's plan of a point (:func:`bssl.engine.check_recipe`: its config, the files
  it names, and the record of every stage in its folder), None for a point with no folder
  yet (nothing made: nothing stale; its config is checked all the same)."""
  d = storage.path(root) / "points" / point["name"]
  plan = engine.check_recipe(grid.point_config(base, point, axes), str(d))
  return plan if d.exists() else None


def plan_points(base, root, axes, pts, recompute_stale=False, log=print) -> dict:
  """Every point with work in its folder planned by the engine before any point runs:
  {name: plan or None}. Stale points (work made with another config or other inputs, or
  damaged) are refused in ONE line (:class:`bssl.engine.RefusedError`, exit 2) naming
  each and its stale folders, in deletion order; with ``recompute_stale`` they are listed
  (each point's run deletes and recomputes them)."""
  root_p = storage.path(root)
  plans = {p["name"]: check_point(base, root, axes, p) for p in pts}
  stale = [(n, pl) for n, pl in plans.items() if pl and pl["stale"]]
  if not stale:
    return plans

  def rel(folder):
    return str(storage.path(folder).relative_to(root_p))

  what = " | ".join(
      f"point {n} ({summary.causes(pl['stale'])}): stale folders "
      + ", ".join(rel(f) for f in pl["folders"])
      for n, pl in stale
  )
  if not recompute_stale:
    raise engine.RefusedError(
        f"sweep {root}: {len(stale)} of its {len(pts)} points hold stale results (made "
        f"with a different config or inputs than this sweep's, or damaged): {what}. Rerun "
        f"this command with --recompute_stale to delete exactly those folders (in the "
        f"order given) and recompute them, keeping the rest; or use a new --workdir."
    )
  log(f"sweep: --recompute_stale: {len(stale)} point(s) to recompute in part: {what}")
  return plans


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
    recompute_stale: bool = False,
    rerun: str = "",
) -> dict:
  """Plans every point (:func:`plan_points`: stale ones refused before any work, or
  recomputed with ``recompute_stale``), runs every point (sharing stages), then collects.
  Resumable. ``jobs`` > 1 runs the points with work to do in that many processes
  (``point_argv``: this command's arguments, rerun with ``--point=<name>`` for each; each
  point's log in ``points/<name>/sweep.log``), which get SIGTERM if this process dies.
  ``guard``: refuse (SweepError) while processes of an earlier sweep still work in
  ``root`` (``<root>/running/``; one process per point). ``rerun``: the command that
  reruns this sweep, for the summary's advice."""
  root_p = storage.path(root)
  me = workers.claim_running(root_p, "_sweep", log=log) if guard else None
  try:
    if guard:
      workers.check_running(root_p, log=log)  # e.g. the point workers of a killed sweep
    return _run_grid(
        base, root, axes, seeds, log, share_from, jobs, point_argv, guard, recompute_stale, rerun
    )
  finally:
    workers.release_running(me)


def _others(root_p, pts) -> list[str]:
  """Folders of ``points/`` that are no point of this grid."""
  d = root_p / "points"
  names = {p["name"] for p in pts}
  return (
      sorted(c.name for c in d.iterdir() if c.is_dir() and c.name not in names)
      if d.is_dir()
      else []
  )


def _run_grid(
    base, root, axes, seeds, log, share_from, jobs, point_argv, guard, recompute_stale, rerun
) -> dict:
  pts = grid.points(base, axes, seeds)
  root_p = storage.path(root)
  plans = plan_points(base, root, axes, pts, recompute_stale, log)  # before any work
  storage.write_json(root_p / "grid.json", {"axes": [[n, v] for n, v in axes], "seeds": seeds})
  others = _others(root_p, pts)
  if others:
    log(
        f"sweep: {root_p / 'points'} also holds {len(others)} folder(s) that are no point of "
        f"this grid (of another grid, or named by an older bssl): never in this summary; "
        f"a stage of theirs is shared only where its record holds here"
    )
  # complete: every recorded stage done and current (the engine only measures again what
  # was replaced since the report, and rewrites the report)
  complete = [p for p in pts if plans[p["name"]] and not plans[p["name"]]["to_run"]]
  todo = [p for p in pts if p not in complete]
  n_stale = sum(1 for pl in plans.values() if pl and pl["stale"])
  log(
      f"sweep: {len(pts)} points, {len(complete)} complete (checked), {len(todo)} to run"
      + (f" ({n_stale} of them stale: recomputed in part)" if n_stale else "")
      + (f" in {jobs} parallel processes" if jobs > 1 and len(todo) > 1 else "")
  )
  t0, finished = time.time(), 0

  def progress(p, what):
    nonlocal finished
    finished += 1
    log(
        f"sweep: point {p['name']} {what}; {finished}/{len(pts)} run, "
        f"eta {eta(finished, len(pts), time.time() - t0)}"
    )

  def run_here(ps):
    for p in ps:
      log(f"sweep: point {pts.index(p) + 1}/{len(pts)} {p['name']}")
      run_claimed_point(base, root, axes, p, share_from, guard, log, recompute_stale)
      progress(p, "done")

  if jobs <= 1 or len(todo) <= 1:
    run_here(pts)
    return summary.collect(root, axes, pts, rerun=rerun)
  run_here(complete)  # quick: no training; the workers take the rest
  failed, stop = workers.run_points(todo, jobs, root_p, point_argv, progress, log)
  if failed or stop:
    summary.collect(root, axes, pts, rerun=rerun)
    codes = {c for _, c in failed}
    code = 143 if stop or codes == {143} else 2 if 2 in codes else 1
    log(f"sweep: {len(failed)} point(s) failed: {failed}; rerun the same command to continue")
    if code == 143:  # preempted: exits 143 with the line on stderr, as one process does
      raise workers.Terminated(
          f"{'SIGTERM; ' if stop else ''}points stopped: "
          f"{', '.join(n for n, _ in failed) or 'none'}"
      )
    raise workers.PointsFailed(failed, code)
  return summary.collect(root, axes, pts, rerun=rerun)


def collect(base, root, axes, seeds, rerun: str = "") -> dict:
  """``--collect``: the summary of the points as they are, each planned by the engine
  first: a point holding results of another config or other inputs than this sweep's is
  never shown (it is listed, with what changed and the command that recomputes it)."""
  pts = grid.points(base, axes, seeds)
  plans = {p["name"]: check_point(base, root, axes, p) for p in pts}
  other = {n: pl["stale"] for n, pl in plans.items() if pl and pl["stale"]}
  return summary.collect(root, axes, pts, rerun=rerun, other_config=other)


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
