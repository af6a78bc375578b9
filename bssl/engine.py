"""The engine: one loop over the recipe's stage table (:mod:`bssl.stages`).

What a stage's result depends on is *recorded while it runs*, never declared
(:mod:`bssl.deps`): every config field it reads (with its value, through any function it
calls, on every process), every input file or folder it reads (by content), the
``artifact_id`` of every stage whose output it reads, and the backend. ``done.json`` holds
that record; a rerun, a resume and a sweep's sharing compare exactly it:

* a finished stage whose record still holds (every recorded field has the same value
  now, every recorded input the same identity, every input stage the same artifact) is
  skipped; otherwise it is *stale*;
* partial state (training checkpoints, scoring parts) is covered by the record of what
  the stage had read so far (``<stage>/reads/p<process>.json``, written before any value
  is used, plus the input stages and backend of ``started.json``): a resume under
  another record is refused, never mixed;
* a stale stage makes every stage that reads it stale. One refusal names every stale
  folder, in deletion order; with ``recompute_stale`` (``--recompute_stale``) they are
  deleted (printed) and rerun instead.

Every check passes before anything is written (a refused run leaves the work directory as
it was; ``config.json`` included). The stage table's ``reads`` (which stages' outputs a
stage needs) orders the stages; a stage that opens another stage's output it does not list
stops with an internal error, so that list cannot be incomplete either.

Processes: every process runs every stage (the stage functions split the work); each
records its own reads; only process 0 writes ``started.json`` / ``done.json`` (the union of
the processes' records), between barriers.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable

import jax

from bssl import backends, deps, parallel, stages, storage
from bssl import config as config_lib
from bssl import workdir as workdir_lib
from bssl.data import checks, recipe, targets
from bssl.data import video as video_lib
from bssl.stages.base import Context, Stage


class RefusedError(config_lib.ConfigError):
  """The work directory holds results of another config or of other inputs."""


class InternalDependencyError(RuntimeError):
  """A stage read another stage's output that the stage table does not list."""


current_files = deps.current_files
check_record = deps.check_record


def partial_record(wd: workdir_lib.Workdir, name: str) -> dict | None:
  """The record of a started stage: the union of its processes' reads so far, with the
  input stages and backend it started from."""
  st = wd.started(name)
  if st is None:
    return None
  rec = deps.Recorder()
  folder = wd.stage(name) / "reads"
  for f in storage.listdir(folder):
    if f.startswith("p") and f.endswith(".json"):
      rec.merge(storage.read_json(folder / f))
  return dict(
      rec.to_dict(),
      version=st.get("version", 1),
      inputs=st.get("inputs") or {},
      backend=st.get("backend"),
  )


def _dependents(table: dict[str, Stage], cfg, names) -> list[str]:
  """``names`` and every stage that reads one of them, directly or not, in table order."""
  out = set(names)
  for s in table.values():
    if any(r in out for r in s.reads(cfg)):
      out.add(s.name)
  return [s for s in table if s in out]


def _input_ids(table, cfg, wd, name: str, recomputed: set[str]) -> dict:
  return {
      up: (None if up in recomputed else (wd.done(up) or {}).get("artifact_id"))
      for up in table[name].reads(cfg)
  }


def stale_stages(
    table: dict[str, Stage],
    cfg,
    wd: workdir_lib.Workdir,
    backend: str,
    data=None,
    run: set[str] = frozenset(),
) -> dict[str, list[str]]:
  """{stage: what changed} of every finished or started stage of ``wd`` whose record no
  longer holds, or which reads such a stage or one of ``run`` (stages this run makes
  afresh), in table order."""
  out: dict[str, list[str]] = {}
  for name, st in table.items():
    if not st.fingerprinted:
      continue
    done = wd.done(name)
    rec = done.get("record") if done is not None else partial_record(wd, name)
    if rec is None and done is None:
      continue
    redo = set(out) | set(run)
    ids = _input_ids(table, cfg, wd, name, redo)
    diff = check_record(rec, cfg, data, ids, backend, methods=st.methods(cfg))
    if diff:
      out[name] = diff
  return out


def check_plan(
    table: dict[str, Stage],
    cfg,
    wd: workdir_lib.Workdir,
    backend: str,
    requested: tuple[str, ...],
    data=None,
) -> tuple[set[str], dict[str, list[str]], list[str]]:
  """The checks of :func:`plan`, without acting on them: (the stages the run needs, {stale
  stage: what changed}, the stale stages whose folders exist, in deletion order)."""
  needed = set(requested)
  for name in reversed(list(table)):
    if name in needed:
      st = table[name]
      needed |= set(st.reads(cfg))
      needed |= {s for s in st.optional_reads if wd.done(s) is not None}
  missing = {n for n in needed if table[n].fingerprinted and wd.done(n) is None and n in requested}
  stale = stale_stages(table, cfg, wd, backend, data, missing)
  folders = (
      [n for n in reversed(_dependents(table, cfg, stale)) if wd.stage(n).exists()] if stale else []
  )
  return needed, stale, folders


def damaged_stages(table: dict[str, Stage], wd: workdir_lib.Workdir) -> dict[str, str]:
  """{stage: why} of the stages whose done.json, started.json or reads/ are damaged."""
  out = {}
  for name in table:
    try:
      wd.done(name)
      partial_record(wd, name)
    except storage.CorruptArtifactError as e:
      out[name] = " ".join(str(e).split())
  return out


def _damaged(table: dict[str, Stage], wd: workdir_lib.Workdir, recompute_stale: bool, log) -> None:
  """A stage whose done.json, started.json or reads/ are damaged (truncated, not JSON, not
  what bssl writes) is refused, naming the file (storage.CorruptArtifactError, exit 2);
  with ``recompute_stale`` its folder is deleted (printed), so that the plan recomputes it
  and, through their records, what read it."""
  for name, msg in damaged_stages(table, wd).items():
    if not recompute_stale:
      if "--recompute_stale" not in msg:
        msg += f"; or delete {wd.stage(name)}, or rerun with --recompute_stale to recompute it"
      raise storage.CorruptArtifactError(msg)
    if parallel.is_main_process():
      log(f"bssl: recomputing {name}: deleting {wd.stage(name)} ({msg.split(': delete')[0]})")
      storage.rmtree(wd.stage(name))
  if recompute_stale:
    parallel.sync("bssl_recompute_damaged")


def plan(
    table: dict[str, Stage],
    cfg,
    wd: workdir_lib.Workdir,
    backend: str,
    requested: tuple[str, ...],
    data=None,
    recompute_stale: bool = False,
    log=print,
) -> list[str]:
  """Checks the whole run before any work; returns the stages to run, in table order.

  Every stage a requested stage reads (directly or not, and the optional inputs present)
  is checked too, so an input made under another config is refused even when it is not
  rerun. A refusal names every stale folder (every root and what reads it), in deletion
  order; with ``recompute_stale`` they are deleted (printed) and rerun.
  """
  names = list(table)
  _damaged(table, wd, recompute_stale, log)
  needed, stale, folders = check_plan(table, cfg, wd, backend, requested, data)
  if stale:
    why = "; ".join(f"{n}: {', '.join(d)}" for n, d in stale.items())
    if not recompute_stale:
      raise RefusedError(
          f"{wd} holds results made with a different config or inputs ({why}). Use a new "
          f"--workdir, or delete {', '.join(str(wd.stage(n)) for n in folders)} (in this "
          f"order) to recompute them, or rerun with --recompute_stale to do exactly that."
      )
    if parallel.is_main_process():
      for n in folders:
        log(
            f"bssl: recomputing {n}: deleting {wd.stage(n)} ({'; '.join(stale.get(n, ['reads a stage recomputed now']))})"
        )
        storage.rmtree(wd.stage(n))
    parallel.sync("bssl_recompute_stale")
    requested = tuple(n for n in names if n in requested or (n in folders and n in needed))
  to_run = []
  for name in names:
    if name not in needed:
      continue
    st = table[name]
    if not st.fingerprinted:
      if name in requested:
        to_run.append(name)
      continue
    if wd.done(name) is None:
      if name not in requested:
        users = [s for s in requested if name in table[s].reads(cfg)] or list(requested)
        raise RefusedError(
            f"stage {users[0]!r} needs the output of stage {name!r}, which is "
            f"not complete in {wd}; include {name!r} in --config.stages"
        )
      to_run.append(name)
  return to_run


class ShareHook:
  """What ``bssl.sweep`` gives the engine: ``__call__(name, check)`` may put a finished stage
  whose record passes ``check(record) == []`` into the work directory and return True;
  ``started(name)`` is called once the stage's started.json is written."""

  def __call__(self, name: str, check: Callable[[dict], list[str]]) -> bool:
    return False

  def started(self, name: str) -> None:
    pass


def _flusher(wd: workdir_lib.Workdir, name: str) -> Callable[[dict], None]:
  path = wd.stage(name) / "reads" / f"p{parallel.process_index()}.json"
  return lambda rec: storage.write_json(path, rec)


def run(
    table: dict[str, Stage],
    cfg,
    wd: workdir_lib.Workdir,
    data,
    backend,
    requested: tuple[str, ...],
    on_accepted: Callable[[], None] = lambda: None,
    share: ShareHook | None = None,
    recompute_stale: bool = False,
) -> dict:
  """Runs ``requested`` stages in table order; returns {stage: info} of those run.

  ``on_accepted`` runs once every check has passed, before the first stage (it writes
  config.json and splits.json). ``share(name, check)``, called on every process before a
  stage with no state of its own starts, may copy a finished stage whose record passes
  ``check`` into the work directory (``bssl.sweep`` copies it from another point) and
  return True: the stage is then taken as done.
  """
  tracked = deps.Tracked(deps.raw(cfg))
  requested = tuple(s for s in table if s in requested)
  to_run = plan(table, cfg, wd, backend.name, requested, data, recompute_stale, log=parallel.log)
  parallel.sync("bssl_plan")
  if parallel.is_main_process():
    on_accepted()
  results = {}
  for name in [s for s in table if s in requested or s in to_run]:
    st = table[name]
    ctx = Context(cfg=tracked, wd=wd, data=data, backend=backend, stage=name)
    if name not in to_run:
      ctx.log(f"complete in {wd}; skipping")
      continue
    if not st.fingerprinted:
      results[name] = _run_unrecorded(st, ctx, wd, name)
      continue
    inputs = {up: (wd.done(up) or {}).get("artifact_id") for up in st.reads(cfg)}
    methods = st.methods(cfg)

    def check(record, inputs=inputs, methods=methods):
      return check_record(record, cfg, data, inputs, backend.name, methods=methods)

    if share is not None and wd.started(name) is None:
      shared = share(name, check)
      parallel.sync(f"bssl_{name}_shared")
      if shared and wd.done(name) is not None:
        results[name] = dict(wd.done(name), shared=True)
        continue
    initial = partial_record(wd, name)
    parallel.sync(f"bssl_{name}_read_partial")
    if parallel.is_main_process() and wd.started(name) is None:
      storage.write_json(
          wd.started_path(name),
          {
              "version": deps.RECORD_VERSION,
              "started": time.time(),
              "inputs": inputs,
              "backend": backend.name,
              "owner": parallel.owner(),
          },
      )
    parallel.sync(f"bssl_{name}_started")
    if share is not None and hasattr(share, "started"):
      share.started(name)
    rec = deps.Recorder(initial, flush=_flusher(wd, name))
    t0 = time.time()
    ctx.log("starting")
    with deps.recording(rec):
      for m in st.methods(cfg):  # first: a record without them was made before they were
        deps.note_method(m)
      rec.flush(rec.to_dict())
      info = st.run(ctx) or {}
    _check_reads(st, cfg, ctx)
    parallel.sync(f"bssl_{name}_before_done")
    info = dict(
        info,
        stage_seconds=time.time() - t0,
        finished=time.time(),
        artifact_id=uuid.uuid4().hex[:12],
    )
    if parallel.is_main_process():
      merged = partial_record(wd, name)
      info["record"] = dict(merged, version=deps.RECORD_VERSION)
      storage.write_json(wd.done_path(name), info)
      storage.rmtree(wd.stage(name) / "reads")
    parallel.sync(f"bssl_{name}_done")
    ctx.log(f"done in {time.time() - t0:.1f}s")
    results[name] = info
  return results


def _run_unrecorded(st: Stage, ctx: Context, wd, name: str) -> dict:
  """A stage that is rerun every time (evaluate, report): no record, no started.json."""
  t0 = time.time()
  ctx.log("starting")
  info = st.run(ctx) or {}
  parallel.sync(f"bssl_{name}_before_done")
  info = dict(
      info, stage_seconds=time.time() - t0, finished=time.time(), artifact_id=uuid.uuid4().hex[:12]
  )
  if parallel.is_main_process():
    storage.write_json(wd.done_path(name), info)
  parallel.sync(f"bssl_{name}_done")
  ctx.log(f"done in {time.time() - t0:.1f}s")
  return info


def _check_reads(st: Stage, cfg, ctx: Context) -> None:
  """Every stage output ``st`` opened is one the table lists (else the planner, which
  orders and invalidates by the table, could miss a dependency)."""
  extra = set(ctx.opened) - set(st.reads(cfg)) - set(st.optional_reads) - {st.name}
  if extra:
    raise InternalDependencyError(
        f"stage {st.name!r} read the output of {sorted(extra)}, which its entry in the "
        f"stage table does not list: add them to its reads"
    )


def run_recipe(
    cfg,
    workdir,
    backend: str = "jax",
    backend_options: dict | None = None,
    share: ShareHook | None = None,
    recompute_stale: bool = False,
    wait_for_lock: bool = False,
) -> dict:
  """The whole recipe (the configured stages) in ``workdir``, local or ``gs://``, on the
  backend called ``backend`` (:func:`bssl.backends.create`, given ``backend_options``).

  Checks the config (fields, batch sizes against the devices), the work directory and the
  data before any work; returns {stage: info} of the stages run. The work directory is
  locked meanwhile (:func:`lock_workdir`, after the config checks, before anything is
  read or written there): a live command there refuses this one (WorkdirLockedError) or,
  with ``wait_for_lock``, is waited for.
  """
  wd = _checked(cfg, workdir, backend)
  lock = lock_workdir(wd, wait_for_lock, log=parallel.log)
  try:
    return _run_locked(cfg, wd, backend, backend_options, share, recompute_stale)
  finally:
    if lock is not None:
      lock.release()


def _checked(cfg, workdir, backend: str) -> workdir_lib.Workdir:
  """The checks of a run before it touches the work directory (the config's fields, the
  paths its stages open, batch sizes against the devices, the work directory itself);
  inputs are identified afresh from here on."""
  config_lib.validate(cfg)
  config_lib.check_paths(cfg)  # every init_from / weak file the stages open exists
  deps.forget_identities()
  if backend == "jax":
    config_lib.check_batch_sizes(cfg, jax.device_count(), jax.process_count())
  wd = workdir_lib.Workdir(workdir)
  wd.check_usable()
  return wd


class WorkdirLockedError(config_lib.ConfigError):
  """Another live command holds the work directory's lock (:class:`bssl.workdir.WorkdirLock`)."""


_LOCK_ROUNDS = itertools.count()  # one key of the processes' agreement per lock taken


def lock_workdir(wd: workdir_lib.Workdir, wait: bool = False, log=print):
  """Process 0 takes ``wd``'s lock (:class:`bssl.workdir.WorkdirLock`; the other processes
  of the run do not); every process learns the outcome before any collective (through the
  coordination service's key-value store), so all stop (WorkdirLockedError, exit 2) or all
  go on. Returns the lock on process 0 (release it at the end), None on the others."""
  key = f"bssl_workdir_lock_{next(_LOCK_ROUNDS)}"
  lock, refusal, failed = None, None, True
  if parallel.is_main_process():
    lock = workdir_lib.WorkdirLock(wd.root, log=log)
    try:
      lock.acquire(wait)
      failed = False
    except workdir_lib.LockedError as e:
      lock, refusal, failed = None, str(e), False
    finally:  # (an error: the others must not wait for a word that never comes)
      refusal = parallel.outcome_from_main(key, refusal, failed)
  else:
    refusal = parallel.outcome_from_main(key, None)
  if refusal is not None:
    raise WorkdirLockedError(refusal)
  return lock


def _run_locked(cfg, wd, backend, backend_options, share, recompute_stale) -> dict:
  data = recipe.build_data(cfg)
  checks.check_num_classes(data, cfg)  # classes of the data = data.num_classes
  # built on a view of the config: what the backend reads while a stage runs is recorded too
  backend = backends.create(backend, deps.Tracked(cfg), **(backend_options or {}))
  table = stages.table(cfg)
  requested = stages.expand(config_lib.parse_stages(cfg.stages), cfg)
  if "transfer" in requested:  # a missing target stops the run now, not after training
    targets.build(cfg)
  for note in getattr(data, "notes", ()):
    parallel.log(f"bssl: note: {note}")
  parallel.log(
      f"bssl: {len(data.labelled)} labelled, {len(data.unlabelled)} unlabelled, "
      f"{len(data.test)} test "
      f"{'videos' if video_lib.is_video(data.spec) else 'images'}; "
      f"{jax.device_count()} devices on "
      f"{jax.process_count()} process(es); backend {backend.name}; stages "
      f"{', '.join(requested)}; workdir {wd}"
  )
  # every undecodable file of D, validation, test (stop, all named at once) and of U from
  # the training folder (skipped, listed) found now, before any training
  checks.scan_decodable(data, cfg, parallel.log)

  def accepted():
    storage.write_text(wd.config_path, config_lib.to_json(cfg))
    storage.write_json(wd.splits_path, data.splits)

  return run(table, cfg, wd, data, backend, requested, accepted, share, recompute_stale)


def check_recipe(cfg, workdir, backend: str = "jax") -> dict:
  """What :func:`run_recipe` would find in ``workdir`` for ``cfg``, without running or
  writing anything (a sweep plans every point with it before any point runs):
  ``{"stale": {stage: [what changed]}, "folders": [the stale folders, in deletion order],
  "to_run": [recorded stages the run would compute]}``. Raises what ``run_recipe`` raises
  for a bad config or data (the data is built only when a stage was started: else nothing
  can be stale)."""
  wd = _checked(cfg, workdir, backend)
  table = stages.table(cfg)
  requested = stages.expand(config_lib.parse_stages(cfg.stages), cfg)
  requested = tuple(s for s in table if s in requested)
  # what the run refuses, or deletes with recompute_stale (_damaged)
  damaged = {n: [why] for n, why in damaged_stages(table, wd).items()}
  if damaged:  # the rest is planned once they are recomputed
    folders = [n for n in reversed(_dependents(table, cfg, damaged)) if wd.stage(n).exists()]
    to_run = [n for n in table if table[n].fingerprinted and (n in requested or n in folders)]
    return {"stale": damaged, "folders": [str(wd.stage(n)) for n in folders], "to_run": to_run}
  data = None
  if any(wd.done(n) is not None or wd.started(n) is not None for n in table):
    data = recipe.build_data(cfg)
    checks.check_num_classes(data, cfg)
  needed, stale, folders = check_plan(table, cfg, wd, backend, requested, data)
  to_run = [
      n
      for n in table
      if n in needed and table[n].fingerprinted and (n in stale or wd.done(n) is None)
  ]
  return {"stale": stale, "folders": [str(wd.stage(n)) for n in folders], "to_run": to_run}
