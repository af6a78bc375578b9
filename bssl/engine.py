"""The engine: one loop over the recipe's stage table (:mod:`bssl.stages`).

Each stage declares the config sections its artifact depends on and the stages whose
artifacts it reads; everything else is derived here, once, for every stage:

* **fingerprint** = the stage's non-cosmetic config fields (plus ``seed`` and ``data``),
  the backend, and the ``artifact_id`` of every artifact it reads. ``done.json`` records
  it; a rerun skips a stage whose fingerprint is unchanged and refuses one whose config
  changed (naming the fields) or whose inputs were recomputed since (naming them).
* **partial state** (training checkpoints, scoring parts) belongs to the fingerprint in
  ``started.json``, written before the stage writes anything else: a resume under another
  fingerprint is refused, never mixed.
* **checks before work**: every requested stage's inputs are complete or requested, and
  every check above passes, before anything is written (a refused run leaves the work
  directory as it was; ``config.json`` included).

Processes: every process runs every stage (the stage functions split the work); only
process 0 writes ``started.json`` / ``done.json``, between barriers.
"""
from __future__ import annotations

import time
import uuid
from typing import Callable

from bssl import config as config_lib
from bssl import parallel, workdir as workdir_lib
from bssl.stages.base import Context, Stage


class RefusedError(config_lib.ConfigError):
  """The work directory holds results of another config or of other inputs."""


_COMMON = ("seed", "data")


def fingerprint(cfg, stage: Stage, wd: workdir_lib.Workdir, backend: str,
                unlabelled_identity: str | None = None,
                data_identity: str | None = None) -> dict:
  """What a stage's result depends on: its config fields, the artifacts it reads, the
  backend and, for the stages that read U, what U's files are (``unlabelled_identity``:
  the same folder or ingest path may hold other files on a rerun); for every stage, what
  D's, validation's and test's files are when they are read from folders
  (``data_identity``)."""
  inputs = {}
  for up in stage.reads(cfg):
    d = wd.done(up)
    inputs[up] = d.get("artifact_id") if d else None
  sections = stage.sections_for(cfg)
  fields = config_lib.result_fields(cfg, _COMMON + sections)
  if unlabelled_identity and any(s.split(".")[0] == "unlabelled" for s in sections):
    fields = dict(fields, **{"unlabelled (files)": unlabelled_identity})
  if data_identity:  # D / validation / test read from folders: every stage reads them
    fields = dict(fields, **{"data (files)": data_identity})
  return {"config": fields, "inputs": inputs, "backend": backend}


def changes(old: dict, new: dict) -> list[str]:
  """What differs between two fingerprints, as ``field: old -> new`` lines."""
  out = []
  oc, nc = old.get("config") or {}, new.get("config") or {}
  for k in sorted(set(oc) | set(nc)):
    if k not in oc and k in nc:
      # a field newer than the work directory, at the default that keeps the old
      # behaviour; U's file identity, newer than the work directory: nothing to compare
      try:
        if k in ("unlabelled (files)", "data (files)") or \
            nc[k] == config_lib.schema_default(k):
          continue
      except KeyError:
        pass
    if oc.get(k, "(absent)") != nc.get(k, "(absent)"):
      out.append(f"{k}: {oc.get(k, '(absent)')!r} -> {nc.get(k, '(absent)')!r}")
  oi, ni = old.get("inputs") or {}, new.get("inputs") or {}
  for k in sorted(set(oi) | set(ni)):
    if oi.get(k) != ni.get(k):
      out.append(f"input {k!r} was recomputed since (artifact {oi.get(k)} -> {ni.get(k)})")
  if old.get("backend") != new.get("backend"):
    out.append(f"backend: {old.get('backend')!r} -> {new.get('backend')!r}")
  return out


def _dependents(table: dict[str, Stage], cfg, name: str) -> list[str]:
  """``name`` and every stage that reads it, directly or not, in table order."""
  out = [name]
  for s in table.values():
    if any(r in out for r in s.reads(cfg)) and s.name not in out:
      out.append(s.name)
  return out


def plan(table: dict[str, Stage], cfg, wd: workdir_lib.Workdir, backend: str,
         requested: tuple[str, ...], unlabelled_identity: str | None = None,
         data_identity: str | None = None) -> list[str]:
  """Checks the whole run before any work; returns the stages still to run.

  Every stage a requested stage reads (directly or not, and the optional inputs present)
  is checked too, so an input made under another config is refused even when it is not
  rerun.
  """
  names = list(table)
  needed = set(requested)
  for name in reversed(names):
    if name in needed:
      st = table[name]
      needed |= set(st.reads(cfg))
      needed |= {s for s in st.optional_reads if wd.done(s) is not None}
  will_run: set[str] = set()
  to_run = []
  for name in names:
    if name not in needed:
      continue
    st = table[name]
    if not st.fingerprinted:
      if name in requested:
        to_run.append(name)
        will_run.add(name)
      continue
    done = wd.done(name)
    fp = fingerprint(cfg, st, wd, backend, unlabelled_identity, data_identity)
    # An input this run recomputes gets a new artifact id: earlier results are stale.
    rerun = [up for up in st.reads(cfg) if up in will_run]
    if rerun:
      fp = dict(fp, inputs={**fp["inputs"], **{up: "(recomputed in this run)" for up in rerun}})
    for kind, rec in (("done", done), ("started", wd.started(name))):
      if rec is None:
        continue
      diff = changes(rec.get("fingerprint") or {}, fp)
      if diff:
        stale = [str(wd.stage(s)) for s in _dependents(table, cfg, name)
                 if wd.stage(s).exists()]
        what = "was produced" if kind == "done" else "was started (its partial state is kept)"
        raise RefusedError(
            f"stage {name!r} in {wd} {what} with a different config or inputs (changed: "
            f"{'; '.join(diff)}). Use a new --workdir, or delete {', '.join(stale)} to "
            f"recompute.")
      if kind == "done":
        break
    if done is None:
      if name not in requested:
        users = [s for s in requested if name in table[s].reads(cfg)] or list(requested)
        raise RefusedError(f"stage {users[0]!r} needs the output of stage {name!r}, which is "
                           f"not complete in {wd}; include {name!r} in --config.stages")
      to_run.append(name)
      will_run.add(name)
  return to_run


ShareHook = Callable[[str, dict], bool]


def run(table: dict[str, Stage], cfg, wd: workdir_lib.Workdir, data, backend,
        requested: tuple[str, ...], on_accepted: Callable[[], None] = lambda: None,
        share: ShareHook | None = None) -> dict:
  """Runs ``requested`` stages in table order; returns {stage: info} of those run.

  ``on_accepted`` runs once every check has passed, before the first stage (it writes
  config.json and splits.json). ``share(name, fingerprint)``, called on every process
  before a stage with no state of its own starts, may put a finished stage with that
  fingerprint into the work directory (``bssl.sweep`` copies it from another point) and
  return True: the stage is then taken as done.
  """
  requested = tuple(s for s in table if s in requested)
  uid = getattr(data, "unlabelled_identity", None)
  did = getattr(data, "data_identity", None)
  to_run = plan(table, cfg, wd, backend.name, requested, uid, did)
  parallel.sync("bssl_plan")
  if parallel.is_main_process():
    on_accepted()
  results = {}
  for name in requested:
    st = table[name]
    ctx = Context(cfg=cfg, wd=wd, data=data, backend=backend, stage=name)
    if name not in to_run:
      ctx.log(f"complete in {wd}; skipping")
      continue
    fp = fingerprint(cfg, st, wd, backend.name, uid, did) if st.fingerprinted else None
    if share is not None and fp is not None and wd.started(name) is None:
      shared = share(name, fp)
      parallel.sync(f"bssl_{name}_shared")
      if shared and wd.done(name) is not None:
        results[name] = dict(wd.done(name), shared=True)
        continue
    if parallel.is_main_process() and fp is not None and wd.started(name) is None:
      workdir_lib.write_json(wd.started_path(name), {"fingerprint": fp, "started": time.time()})
    parallel.sync(f"bssl_{name}_started")
    t0 = time.time()
    ctx.log("starting")
    info = st.run(ctx) or {}
    parallel.sync(f"bssl_{name}_before_done")
    info = dict(info, stage_seconds=time.time() - t0, finished=time.time(),
                artifact_id=uuid.uuid4().hex[:12])
    if fp is not None:
      info["fingerprint"] = fp
    if parallel.is_main_process():
      workdir_lib.write_json(wd.done_path(name), info)
    parallel.sync(f"bssl_{name}_done")
    ctx.log(f"done in {time.time() - t0:.1f}s")
    results[name] = info
  return results


def run_recipe(cfg, workdir, backend=None, share: ShareHook | None = None) -> dict:
  """The whole recipe (the configured stages) in ``workdir``, local or ``gs://``.

  Checks the config (fields, batch sizes against the devices), the work directory and the
  data before any work; returns {stage: info} of the stages run.
  """
  import jax

  from bssl import stages
  from bssl.backend import JaxBackend
  from bssl.data import recipe
  config_lib.validate(cfg)
  if backend is None:
    config_lib.check_batch_sizes(cfg, jax.device_count(), jax.process_count())
  wd = workdir_lib.Workdir(workdir)
  wd.check_usable()
  data = recipe.build_data(cfg)
  backend = backend or JaxBackend(cfg)
  table = stages.table(cfg)
  requested = stages.expand(config_lib.parse_stages(cfg.stages), cfg)
  if "transfer" in requested:  # a missing target stops the run now, not after training
    from bssl.data import targets
    targets.build(cfg)
  from bssl.data import video as video_lib
  for note in getattr(data, "notes", ()):
    parallel.log(f"bssl: note: {note}")
  parallel.log(f"bssl: {len(data.labelled)} labelled, {len(data.unlabelled)} unlabelled, "
               f"{len(data.test)} test "
               f"{'videos' if video_lib.is_video(data.spec) else 'images'}; "
               f"{jax.device_count()} devices on "
               f"{jax.process_count()} process(es); backend {backend.name}; stages "
               f"{', '.join(requested)}; workdir {wd}")

  def accepted():
    workdir_lib.write_text(wd.config_path, config_lib.to_json(cfg))
    workdir_lib.write_json(wd.splits_path, data.splits)

  return run(table, cfg, wd, data, backend, requested, accepted, share)
