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
finished points are kept, an interrupted one resumes where it stopped.

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
axis; log x for sizes and counts).

SIGTERM exits 143 wherever it lands (a training loop saves a checkpoint first); the point
workers of ``--jobs`` get SIGTERM when the sweep dies, even by SIGKILL. While a process works
in ``DIR`` it has an entry in ``DIR/running/``: a rerun refuses (exit 2, naming them) while
another sweep or point command still runs there, and waits for the workers of a killed
sweep to stop. Seeds are swept with ``--seeds`` only (``--sweep=seed=...`` is refused).
See docs/reproduction.md, "Running the sweeps".

Exit codes: 0 done, 2 a user error (one line), 143 preempted (rerun to continue).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from bssl import config as config_lib
from bssl import procs
from bssl import workdir as workdir_lib

LOG_AXES = ("select.k", "unlabelled.limit", "pretrain.steps", "unlabelled.size")


class SweepError(ValueError):
  """A bad --sweep / --seeds value (exit 2)."""


def parse_axis(text: str, cfg) -> tuple[str, list]:
  """``field=v1,v2`` -> (field, typed values), checked against the config schema."""
  if "=" not in text:
    raise SweepError(f"--sweep: expected <field>=<v1>,<v2>,..., got {text!r}")
  name, values = text.split("=", 1)
  name = name.strip()
  fields = {f.name: f for f in config_lib.all_fields()}
  if name not in fields:
    raise SweepError(f"--sweep: unknown config field {name!r}")
  f = fields[name]
  if values.lstrip().startswith("["):  # a JSON list: dicts and tuples, e.g. model_kwargs
    try:
      out = json.loads(values)
    except json.JSONDecodeError as e:
      raise SweepError(f"--sweep: {name}={values!r} is not a JSON list ({e})") from None
    kinds = {
        dict: (dict,),
        tuple: (list,),
        bool: (bool,),
        int: (int,),
        float: (int, float),
        str: (str,),
    }.get(f.type, (object,))
    if (
        not isinstance(out, list)
        or not out
        or not all(
            (v is None and f.optional)
            or (isinstance(v, kinds) and not (f.type is not bool and isinstance(v, bool)))
            for v in out
        )
    ):
      raise SweepError(f"--sweep: {name} takes {f.type.__name__} values; got {values!r}")
    if f.type is tuple:
      out = [None if v is None else tuple(v) for v in out]
    if len({json.dumps(v, sort_keys=True) for v in out}) != len(out):
      raise SweepError(f"--sweep: repeated values for {name!r}: {out}")
    return name, out
  if f.type not in (bool, int, float, str):
    raise SweepError(
        f"--sweep: field {name!r} ({f.type.__name__}) takes a JSON list, "
        f"e.g. --sweep='{name}=[{{...}},{{...}}]'"
    )
  out = []
  for v in values.split(","):
    v = v.strip()
    if not v:
      continue
    if v == "None" and f.optional:  # e.g. unlabelled.limit=...,None: all of U
      out.append(None)
      continue
    try:
      if f.type is bool:
        if v.lower() not in ("true", "false", "1", "0"):
          raise ValueError(v)
        out.append(v.lower() in ("true", "1"))
      else:
        out.append(f.type(v))
    except ValueError:
      raise SweepError(f"--sweep: {name}={v!r} is not a {f.type.__name__}") from None
  if not out:
    raise SweepError(f"--sweep: no values for {name!r}")
  if len(set(out)) != len(out):
    raise SweepError(f"--sweep: repeated values for {name!r}: {out}")
  return name, out


def _label(v) -> str:
  """A value as a folder-name piece: ``{"widths": [8, 16]}`` -> ``widths-8-16``."""
  if isinstance(v, (dict, list, tuple)):
    text = json.dumps(v, sort_keys=True)
    return "-".join(t for t in re.split(r"[^A-Za-z0-9._]+", text) if t) or "empty"
  return str(v).replace("/", "_")


def _labels(values: list) -> dict:
  """Folder-name labels of an axis's values; values whose labels collide (``{"x": -1}``
  and ``{"x": 1}`` both read ``x-1``) get a short hash of the value appended."""
  labels = [_label(v) for v in values]
  out = {}
  for v, lab in zip(values, labels):
    if labels.count(lab) > 1:
      lab += "~" + hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:8]
    out[json.dumps(v, sort_keys=True)] = lab
  return out


def _name(overrides: dict, seed: int, labels: dict | None = None) -> str:
  parts = []
  for k, v in overrides.items():
    lab = (labels or {}).get(k, {}).get(json.dumps(v, sort_keys=True)) or _label(v)
    parts.append(f"{k}={lab}")
  return ",".join(parts + [f"seed={seed}"])


def points(cfg, axes: list[tuple[str, list]], seeds: list[int]) -> list[dict]:
  """The grid, in an order where points sharing a teacher follow each other."""
  out = []
  labels = {name: _labels(vals) for name, vals in axes}
  for seed in seeds:
    for combo in itertools.product(*[vals for _, vals in axes]):
      overrides = {name: v for (name, _), v in zip(axes, combo)}
      out.append({"name": _name(overrides, seed, labels), "overrides": overrides, "seed": seed})
  if len({p["name"] for p in out}) != len(out):  # cannot happen after _labels; a guard
    raise SweepError("--sweep: two points of the grid would share a folder name")
  return out


def point_config(base, point: dict, axes: list[tuple[str, list]]):
  cfg = base.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.seed = int(point["seed"])
    for name, v in point["overrides"].items():
      node = cfg
      *head, last = name.split(".")
      for h in head:
        node = node[h]
      node[last] = v
    # One scoring pass per teacher for every K and P of the grid (derived exactly).
    ks = dict(axes).get("select.k")
    ps = dict(axes).get("select.p")
    if ks or ps:
      cfg.score.max_k = max([int(cfg.select.k)] + [int(k) for k in (ks or [])])
      cfg.score.max_p = max([int(cfg.select.p)] + [int(p) for p in (ps or [])])
  return cfg


def _copy_stage(src, dst) -> None:
  """Copies a finished stage's folder, ``done.json`` last (a copy cut short is not done)."""
  src, dst = workdir_lib.path(src), workdir_lib.path(dst)

  def copy(a, b, top):
    for child in sorted(a.iterdir(), key=lambda c: c.name):
      if top and child.name in ("done.json", "started.json"):
        continue
      if child.is_dir():
        copy(child, b / child.name, False)
      else:
        workdir_lib.write_bytes(b / child.name, child.read_bytes())

  copy(src, dst, True)
  workdir_lib.write_bytes(dst / "done.json", (src / "done.json").read_bytes())


class Sharer:
  """The engine's share hook for one point: before a stage starts, a finished stage of
  another point (of this sweep, or of the ``--share_from`` sweeps) whose record (every
  config field and input it read, :mod:`bssl.deps`) holds for this point is copied in
  instead of recomputed. With points in parallel processes (``--jobs``), a point that
  reaches a stage another live point is computing, and whose record so far holds for this
  point too, waits for it and then copies it (if its record, once complete, does not hold,
  the point computes its own). The decision and the stage's start happen under one lock
  per stage name (``<root>/claims/<stage>``), so two points do not both start a stage that
  one could share."""

  def __init__(self, root, point: str, share_from=(), log=print, poll_s: float = 2.0):
    self.root, self.point = workdir_lib.path(root), point
    self.roots = [self.root] + [workdir_lib.path(r) for r in share_from]
    self.log, self.poll_s = log, poll_s
    self.local = not workdir_lib.is_remote(self.root)
    self.copied: list[str] = []
    self._held = None

  def _others(self):
    for r in self.roots:
      pts = r / "points"
      if not pts.exists():
        continue
      for d in sorted(pts.iterdir(), key=lambda c: c.name):
        if not (d.name == self.point and r == self.root):
          yield d

  def _find_done(self, name: str, check):
    for d in self._others():
      done = workdir_lib.Workdir(str(d)).done(name)
      if done is not None and done.get("record") and not check(done["record"]):
        return d
    return None

  def _running(self, name: str, check):
    """Another live point computing ``name`` whose record so far holds here."""
    from bssl import engine

    for d in self._others():
      wd = workdir_lib.Workdir(str(d))
      st = wd.started(name)
      if st is None or wd.done(name) is not None or not procs.owner_alive(st.get("owner")):
        continue
      if not check(engine.partial_record(wd, name)):
        return d
    return None

  def __call__(self, name: str, check) -> bool:
    from bssl import parallel

    if parallel.process_count() > 1:  # one decision for every host: process 0's
      if parallel.is_main_process():
        self._share(name, check)
      parallel.sync(f"bssl_share_{name}_decided")
      return self.root.joinpath("points", self.point, name, "done.json").exists()
    return self._share(name, check)

  def started(self, name: str) -> None:
    """The engine wrote ``name``'s started.json: other points may now see it."""
    self._release()

  def _lock(self, name: str) -> None:
    if not self.local:
      return
    lock = self.root / "claims" / name
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = procs.owner()
    mine = lock.with_name(f".{name}.{me['pid']}.{me['host']}")
    mine.write_text(json.dumps(me))  # whole before it is linked: a lock is never empty
    while True:
      try:
        os.link(mine, lock)  # atomic, and fails if the lock exists
        mine.unlink(missing_ok=True)
        self._held = lock
        return
      except FileExistsError:
        pass
      try:
        owner = json.loads(lock.read_text() or "{}")
      except (OSError, json.JSONDecodeError):
        owner = {}
      if not owner:  # unreadable: a lock of an older bssl, or gone meanwhile
        try:
          owner = {} if time.time() - os.stat(lock).st_mtime < 10 else {"pid": -1}
        except OSError:
          continue
      if (
          owner.get("pid") == me["pid"]
          and owner.get("host") == me["host"]
          or (owner and not procs.owner_alive(owner))
      ):
        lock.unlink(missing_ok=True)  # ours (a point that stopped), or its process is gone
        continue
      time.sleep(0.2)

  def _release(self) -> None:
    if self._held is not None:
      self._held.unlink(missing_ok=True)
      self._held = None

  def _share(self, name: str, check) -> bool:
    dst = self.root / "points" / self.point / name
    if dst.exists():
      # no started.json and no done.json (the engine calls this hook only then): what is
      # there is a copy cut short by a kill; never resume from it
      workdir_lib.rmtree(dst)
    waiting = False
    while True:
      self._lock(name)
      src = self._find_done(name, check)
      if src is not None:
        _copy_stage(src / name, dst)
        self._release()
        self.copied.append(name)
        self.log(f"sweep: {name} shared from {src}")
        return True
      other = self._running(name, check) if self.local else None
      if other is None:
        return False  # ours: the lock is released once the engine has started it
      self._release()
      if not waiting:
        self.log(f"sweep: {name} is being computed by point {other.name}; waiting for it")
        waiting = True
      time.sleep(self.poll_s)


def _row(point: dict, res: dict) -> dict:
  models = {
      k: res[k]["top1"]
      for k in ("baseline", "teacher", "student_pretrained", "student")
      if k in res
  }
  sel = res.get("selection") or {}
  return {
      "name": point["name"],
      "seed": point["seed"],
      "overrides": point["overrides"],
      "top1": models,
      "dhat_rows": sel.get("num_selected"),
      "dhat_label_precision": sel.get("label_precision"),
      "unlabelled_images": (res.get("scoring") or {}).get("num_unlabelled"),
  }


def _group(rows, name, v) -> list[dict]:
  """The rows of the points whose axis ``name`` has value ``v``."""
  return [r for r in rows if r["overrides"].get(name) == v]


def _top1s(group, key) -> list[float]:
  """Test top-1 (%) of model ``key`` in each row that has it."""
  return [100 * r["top1"][key] for r in group if key in r["top1"]]


def _gains(group) -> list[float]:
  """The paired gain (points): each seed's student against the same seed's baseline."""
  return [
      100 * (r["top1"]["student"] - r["top1"]["baseline"])
      for r in group
      if {"student", "baseline"} <= set(r["top1"])
  ]


def _mean_std(xs) -> tuple[float, float]:
  """Mean and sample standard deviation over seeds (0 for one seed; NaN mean for none)."""
  if not xs:
    return np.nan, 0.0
  return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


_RESULT_STAGES = dict(config_lib.EVALUATED_MODELS, selection="select")


def _current(point_dir, res: dict) -> tuple[dict, list[str]]:
  """A point's report results without the numbers of artifacts replaced since the report
  was written (each result names the artifact it measured; a result that names none, from
  an older report, cannot be checked and is left out too), and what was left out."""
  wd = workdir_lib.Workdir(str(point_dir))
  out, gone = dict(res), []
  for key, stage in _RESULT_STAGES.items():
    if key in res:
      done = wd.done(stage)
      aid = res[key].get("artifact_id") if isinstance(res[key], dict) else None
      if aid is None or done is None or done.get("artifact_id") != aid:
        del out[key]
        gone.append(key)
  return out, gone


def collect(root, axes, pts) -> dict:
  """sweep.json, sweep.md and a figure per axis from the points' results. A number whose
  model (or D̂) has been replaced since the point's report is never shown: it is left out
  and the point is listed under ``stale`` (rerun the sweep to measure it again)."""
  root = workdir_lib.path(root)
  rows, stale = [], []
  for p in pts:
    f = root / "points" / p["name"] / "report" / "results.json"
    if f.exists():
      res, gone = _current(f.parent.parent, workdir_lib.read_json(f))
      if gone:
        stale.append({"name": p["name"], "replaced": gone})
      rows.append(_row(p, res))
  summary = {
      "axes": [{"field": n, "values": v} for n, v in axes],
      "seeds": sorted({p["seed"] for p in pts}),
      "num_points": len(pts),
      "num_done": len(rows),
      "points": rows,
      "stale": stale,
  }
  workdir_lib.write_json(root / "sweep.json", summary)
  md = [f"# Sweep ({len(rows)} of {len(pts)} points done)", ""]
  if stale:
    md += [
        "Not shown (replaced since the point's report; rerun the sweep to measure them "
        "again): " + "; ".join(f"{e['name']}: {', '.join(e['replaced'])}" for e in stale),
        "",
    ]
  evaluated = any(r["top1"] for r in rows)
  if not evaluated:  # nothing to tabulate or plot (and no figure to draw)
    md += [
        "No point is done yet: run the sweep (or `--emit`'s commands), then `--collect` " "again."
        if not rows
        else "No done point has a test evaluation (`evaluate` is "
        "not among `--config.stages`): nothing to compare.",
        "",
    ]
  for name, values in (axes if evaluated else []):
    md += [
        f"## {name}",
        "",
        "| " + name + " | points | baseline | teacher | student, "
        "pre-trained | student | student − baseline (paired) | D̂ rows | D̂ precision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in values:
      group = _group(rows, name, v)

      def ms(xs, sign=""):
        m, sd = _mean_std(xs)
        return f"{m:{sign}.2f} ± {sd:.2f}" if xs else "—"

      def model(key, group=group):
        return ms(_top1s(group, key))

      prec = [r["dhat_label_precision"] for r in group if r["dhat_label_precision"] is not None]
      size = [r["dhat_rows"] for r in group if r["dhat_rows"] is not None]
      gain = ms(_gains(group), "+")
      md.append(
          f"| {_label(v)} | {len(group)} | {model('baseline')} | {model('teacher')} | "
          f"{model('student_pretrained')} | {model('student')} | {gain} | "
          f"{int(np.mean(size)) if size else '—'} | "
          f"{f'{100 * np.mean(prec):.2f}%' if prec else '—'} |"
      )
    md.append("")
    _figure(root / f"{name}.png", name, values, rows)
    md += [f"![{name}]({name}.png)", ""]
  workdir_lib.write_text(root / "sweep.md", "\n".join(md))
  return summary


def _figure(path, name, values, rows) -> None:
  import io

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  numeric = all(
      isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in values
  )
  xs = list(range(len(values)))
  if numeric:  # None on a size axis (unlabelled.limit=None: all of U) at U's size
    xs = [
        v
        if v is not None
        else np.mean(
            [
                r["unlabelled_images"]
                for r in rows
                if r["overrides"].get(name) is None and r.get("unlabelled_images")
            ]
            or [np.nan]
        )
        for v in values
    ]
    numeric = not any(np.isnan(x) for x in xs)
    if not numeric:
      xs = list(range(len(values)))
  fig, (ax, gx) = plt.subplots(1, 2, figsize=(9, 3.5))
  for key, style in (("student", "o-"), ("student_pretrained", "^:"), ("baseline", "s--")):
    means, stds = zip(*[_mean_std(_top1s(_group(rows, name, v), key)) for v in values])
    ax.errorbar(
        xs,
        means,
        yerr=stds,
        fmt=style,
        capsize=3,
        label={"student_pretrained": "student, pre-trained only"}.get(key, key),
    )
  # the paired gain: each seed's student against the same seed's baseline (same D)
  means, stds = zip(*[_mean_std(_gains(_group(rows, name, v))) for v in values])
  gx.errorbar(xs, means, yerr=stds, fmt="o-", capsize=3, color="C2")
  gx.axhline(0, color="gray", lw=0.8)
  gx.set_ylabel("student − baseline, same seed (points)")
  has_data = {
      ax: any(
          _top1s(_group(rows, name, v), k)
          for v in values
          for k in ("student", "student_pretrained", "baseline")
      ),
      gx: any(_gains(_group(rows, name, v)) for v in values),
  }
  for a in (ax, gx):
    if numeric and name in LOG_AXES and min(xs) > 0 and has_data[a]:  # (log of no data fails)
      a.set_xscale("log")
    if not numeric:
      a.set_xticks(xs, [_label(v) for v in values], rotation=15, fontsize=7)
    a.set_xlabel(name)
    a.grid(alpha=0.3)
  ax.set_ylabel("test top-1 (%)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  workdir_lib.write_bytes(path, buf.getvalue())


def run_point(base, root: str, axes, point: dict, share_from=(), log=print) -> list[str]:
  """One point as an engine run sharing stages; returns the stages it copied."""
  from bssl import engine

  cfg = point_config(base, point, axes)
  wd = workdir_lib.Workdir(str(workdir_lib.path(root) / "points" / point["name"]))
  sharer = Sharer(root, point["name"], share_from, log)
  # a grown grid (a larger K: score.max_k) makes some of a point's finished stages stale:
  # they are deleted (printed) and recomputed; the rest are kept
  engine.run_recipe(cfg, str(wd.root), share=sharer, recompute_stale=True)
  return sharer.copied


def _launch_order(pts: list[dict], jobs: int) -> list[dict]:
  """With parallel jobs, seeds interleaved: the first points started share nothing."""
  if jobs <= 1:
    return pts
  by_seed: dict[int, list] = {}
  for p in pts:
    by_seed.setdefault(p["seed"], []).append(p)
  out = []
  for i in range(max(len(v) for v in by_seed.values())):
    out += [v[i] for v in by_seed.values() if i < len(v)]
  return out


# ----------------------------------------------------------------------------- processes
# A sweep's processes: SIGTERM exits 143 wherever it lands; point workers die with the sweep
# that started them; a rerun never races a process still at work in the same folders.

STOP_WAIT_S = 300  # how long a rerun waits for the point workers of a killed sweep to stop


class Terminated(BaseException):
  """The points of ``--jobs`` were stopped by SIGTERM (the sweep exits 143)."""


_ENTRIES: list = []  # this process's running/ entries (claim_running)


def _on_sigterm(signum, frame):
  """SIGTERM outside a training loop (where it saves a checkpoint and raises
  ``train.Preempted``): exit 143 now, as a SIGKILL would stop it (every stage survives
  that; the one cut short resumes from its last resume point), with a line and without
  the running/ entries. Not an exception: one raised in whatever Python code the signal
  lands on is dropped there if that is a gc callback or a ``__del__``."""
  for f in list(_ENTRIES):
    release_running(f)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, RuntimeError, ValueError):  # RuntimeError: it was writing
      pass
  os.write(2, b"bssl.sweep: SIGTERM; rerun the same command to continue\n")
  os._exit(143)


def _exit_preempted(msg: str) -> None:
  """Exits 143 (after ``finally`` blocks and atexit work); if a thread keeps the
  interpreter from exiting, a watchdog ends it after 60 s."""
  import threading

  signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping already: a repeat changes nothing
  print(f"bssl.sweep: {msg}; rerun the same command to continue", file=sys.stderr, flush=True)
  t = threading.Timer(60.0, os._exit, (143,))
  t.daemon = True
  t.start()
  sys.exit(143)


PARENT_ENV = "BSSL_SWEEP_PARENT"  # set for a point worker: the pid of the sweep that started it


def _die_with_parent() -> None:
  """In a point worker (``$BSSL_SWEEP_PARENT`` set), first thing: has Linux send it
  SIGTERM when the sweep that started it dies, even by SIGKILL
  (``prctl(PR_SET_PDEATHSIG)``), so that it saves a checkpoint and exits 143 instead of
  running on beside a rerun; exits 143 at once if that sweep is gone already. Done here
  rather than in a ``preexec_fn``: forking a process that runs JAX's threads is unsafe.
  Elsewhere than Linux the ``running/`` entries still keep a rerun off its folders."""
  parent = os.environ.pop(PARENT_ENV, "")
  if not parent.isdigit():
    return
  try:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() != int(parent):  # it died before prctl: no signal will come
    print(
        "bssl.sweep: the sweep that started this point is gone; rerun the sweep to " "continue",
        file=sys.stderr,
        flush=True,
    )
    os._exit(143)


def _process_entry() -> dict:
  """This process, as a ``running/`` entry names it."""
  me, parent = procs.proc_stat(os.getpid()), os.getppid()
  return {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "start": me and me[2],
      "ppid": parent,
      "argv": sys.argv,
      "since": time.time(),
  }


def _orphaned(e: dict) -> bool:
  """Whether a live entry's process lost the parent it had (a point worker of a sweep that
  was killed: it got SIGTERM with the parent's death and is stopping)."""
  st = procs.proc_stat(int(e["pid"]))
  return st is not None and e.get("ppid") is not None and st[1] != e["ppid"]


def _running_dir(root):
  root = workdir_lib.path(root)
  return None if workdir_lib.is_remote(root) else root / "running"


def check_running(root, names=None, wait_s: float = STOP_WAIT_S, log=print) -> None:
  """Raises SweepError naming the processes still at work in sweep folder ``root``
  (entries ``<root>/running/<name>.json`` of this machine: ``names``, or all, but this
  process's). A point worker that lost its sweep (killed: the worker got SIGTERM and is
  saving a checkpoint) is waited for, up to ``wait_s``; a live sweep, or a point whose
  parent still runs, is not. Entries of dead processes are removed."""
  d = _running_dir(root)
  if d is None:
    return
  deadline, told = time.time() + wait_s, set()
  while True:
    live, stopping = [], []
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
      name = f.name[: -len(".json")]
      if names is not None and name not in names:
        continue
      try:
        e = json.loads(f.read_text())
      except (OSError, ValueError):
        continue  # removed meanwhile (entries are written whole)
      if e.get("host") != socket.gethostname() or e.get("pid") == os.getpid():
        continue  # another machine's (cannot be checked), or ours
      if not procs.owner_alive(e, host_checked=True):
        f.unlink(missing_ok=True)  # a process killed without cleaning up
      elif name != "_sweep" and _orphaned(e):
        stopping.append((name, e))
      else:
        live.append((name, e))
    if live or (stopping and time.time() > deadline):
      what = ", ".join(
          ("a sweep" if n == "_sweep" else f"point {n}") + f" (pid {e['pid']})"
          for n, e in live + stopping
      )
      raise SweepError(
          f"--workdir {root} is in use by processes still running: {what}; "
          f"wait for them to end or stop them (kill PID), then rerun"
      )
    if not stopping:
      return
    for n, e in stopping:
      if n not in told:
        told.add(n)
        log(f"sweep: waiting for point {n} (pid {e['pid']}) of a sweep that was killed to " f"stop")
    time.sleep(0.5)


def claim_running(root, name: str, wait_s: float = STOP_WAIT_S, log=print):
  """Enters this process as running ``name`` (a point, or ``_sweep``: the grid) in
  ``<root>/running/`` once no live process holds it (``check_running``); returns the entry's
  path for ``release_running`` (None for a remote folder: not checked)."""
  d = _running_dir(root)
  if d is None:
    return None
  d.mkdir(parents=True, exist_ok=True)
  f = d / f"{name}.json"
  for _ in range(5):
    check_running(root, [name], wait_s, log)
    tmp = d / f".{name}.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(_process_entry()))
    try:
      os.link(tmp, f)  # whole, and only if no other process entered it meanwhile
      _ENTRIES.append(f)
      return f
    except FileExistsError:
      continue
    finally:
      tmp.unlink(missing_ok=True)
  raise SweepError(f"--workdir {root}: {name} is being started by another process")


def release_running(f) -> None:
  """Removes an entry of ``claim_running`` (if it is still this process's)."""
  if f is None:
    return
  try:
    if json.loads(f.read_text()).get("pid") == os.getpid():
      f.unlink(missing_ok=True)
  except (OSError, ValueError):
    pass
  if f in _ENTRIES:
    _ENTRIES.remove(f)


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
  root_p = workdir_lib.path(root)
  me = claim_running(root_p, "_sweep", log=log) if guard else None
  try:
    if guard:
      check_running(root_p, log=log)  # e.g. the point workers of a killed sweep
    return _run_grid(base, root, axes, seeds, log, share_from, jobs, point_argv, guard)
  finally:
    release_running(me)


def _run_grid(base, root, axes, seeds, log, share_from, jobs, point_argv, guard) -> dict:
  pts = points(base, axes, seeds)
  root_p = workdir_lib.path(root)
  workdir_lib.write_json(root_p / "grid.json", {"axes": [[n, v] for n, v in axes], "seeds": seeds})
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
    rate = (time.time() - t0) / finished
    log(
        f"sweep: point {p['name']} {what}; {finished}/{len(todo)} run, "
        f"eta {int(rate * (len(todo) - finished)) // 60}m{int(rate * (len(todo) - finished)) % 60:02d}s"
    )

  if jobs <= 1 or len(todo) <= 1:
    for p in todo:
      log(f"sweep: point {pts.index(p) + 1}/{len(pts)} {p['name']}")
      entry = claim_running(root_p, p["name"], log=log) if guard else None
      try:
        run_point(base, root, axes, p, share_from, log)
      finally:
        release_running(entry)
      progress(p, "done")
    return collect(root, axes, pts)
  queue, running, failed, stop, signalled = _launch_order(todo, jobs), {}, [], [], set()

  def terminate(q):
    if q not in signalled and q.poll() is None:
      signalled.add(q)
      q.send_signal(signal.SIGTERM)

  def on_term(signum, frame):  # preemption: pass it on, let the points checkpoint
    stop.append(signum)
    queue.clear()
    for q in list(running):
      terminate(q)

  previous = signal.signal(signal.SIGTERM, on_term)
  env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
  try:
    while queue or running:
      while queue and len(running) < jobs and not stop:
        p = queue.pop(0)
        logf = root_p / "points" / p["name"] / "sweep.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        fh = open(logf, "a")
        proc = subprocess.Popen(
            [sys.executable, "-m", "bssl.sweep", *point_argv, f"--point={p['name']}"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
        running[proc] = (p, fh)
        if stop:  # SIGTERM came while it started
          terminate(proc)
        log(f"sweep: started point {p['name']} (pid {proc.pid}, log {logf})")
      time.sleep(1.0)
      for proc in [q for q in running if q.poll() is not None]:
        p, fh = running.pop(proc)
        fh.close()
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode  # as a shell
        if code == 0:
          progress(p, "done")
        else:
          failed.append((p["name"], code))
          log(
              f"sweep: point {p['name']} failed (exit {code}); see "
              f"{root_p / 'points' / p['name'] / 'sweep.log'}"
          )
          if code in (2, 143):  # a user error or preemption: stop launching
            queue.clear()
  finally:
    signal.signal(signal.SIGTERM, previous)
  if failed or stop:
    collect(root, axes, pts)
    codes = {c for _, c in failed}
    code = 143 if stop or codes == {143} else 2 if 2 in codes else 1
    log(f"sweep: {len(failed)} point(s) failed: {failed}; rerun the same command to " f"continue")
    if code == 143:  # preempted: exits 143 with the line on stderr, as one process does
      raise Terminated(
          f"{'SIGTERM; ' if stop else ''}points stopped: "
          f"{', '.join(n for n, _ in failed) or 'none'}"
      )
    sys.exit(code)
  return collect(root, axes, pts)


def emit(base, axes, seeds, argv: list[str]) -> list[str]:
  """One command per point (grid order): this command with ``--point=<name>``; each
  shares the finished stages of the points before it (run them in grid order; points run
  at once on one machine wait for a stage another is computing)."""
  return [
      " ".join(
          shlex.quote(a)
          for a in [sys.executable, "-m", "bssl.sweep", *argv, f"--point={p['name']}"]
      )
      for p in points(base, axes, seeds)
  ]


def _main(argv):
  from absl import flags, logging

  from bssl import main as bssl_main
  from bssl import train

  f, fail = flags.FLAGS, bssl_main.fail
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  if not f["verbosity"].present:  # orbax logs every checkpoint at INFO, as in bssl.main
    logging.set_verbosity(logging.WARNING)
  base = bssl_main.config_and_workdir(
      "--workdir is required (the sweep's folder, local or " "gs://)"
  )
  if not f.sweep:
    fail("--sweep is required, e.g. --sweep=select.k=1000,2000,5000")
  try:
    if any(a.split("=", 1)[0].strip() == "seed" for a in f.sweep):
      raise SweepError(
          "--sweep=seed=... and --seeds both set the seed: give the seeds with "
          "--seeds=0,1,2 (every point runs once per seed)"
      )
    axes = [parse_axis(a, base) for a in f.sweep]
    if len({n for n, _ in axes}) != len(axes):
      raise SweepError("--sweep: a field is given twice")
    try:
      seeds = [int(s) for s in f.seeds.split(",") if s.strip()]
    except ValueError:
      raise SweepError(f"--seeds: expected comma-separated integers, got {f.seeds!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
      raise SweepError(f"--seeds: expected distinct non-negative integers, got {f.seeds!r}")
    for p in points(base, axes, seeds):  # every point's config checked before any work
      try:
        config_lib.validate(point_config(base, p, axes))
      except config_lib.ConfigError as e:
        raise SweepError(f"--sweep point {p['name']}: {e}") from None
    point_argv, skip = [], False
    for a in sys.argv[1:]:
      if skip:
        skip = False
      elif a == "--jobs":
        skip = True  # "--jobs N"
      elif not a.startswith(("--jobs=", "--emit", "--noemit", "--collect", "--nocollect")):
        point_argv.append(a)
    if f.emit:
      print("\n".join(emit(base, axes, seeds, point_argv)))
      return
    share_from = [r for r in f.share_from.split(",") if r.strip()]
    for r in share_from:
      if not workdir_lib.path(r).is_dir():
        raise SweepError(f"--share_from: {r!r} is not a folder (another sweep's --workdir)")
    if f.jobs < 1:
      raise SweepError(f"--jobs must be a positive integer, got {f.jobs}")
    if f.jobs > 1 and workdir_lib.is_remote(f.workdir):
      raise SweepError(
          "--jobs > 1 runs points as processes on this machine and needs a "
          "local --workdir; on a cluster use --emit"
      )
    # SIGTERM exits 143 wherever it lands (a training loop saves a checkpoint first)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if f.point:
      pts = {p["name"]: p for p in points(base, axes, seeds)}
      if f.point not in pts:
        raise SweepError(f"--point: {f.point!r} is not a point of this grid")
      from bssl import parallel

      parallel.maybe_initialize_distributed(force=f.distributed)
      entry = claim_running(f.workdir, f.point) if parallel.process_count() == 1 else None
      try:
        run_point(base, f.workdir, axes, pts[f.point], share_from)
      finally:
        release_running(entry)
      return
    if f.collect:
      s = collect(f.workdir, axes, points(base, axes, seeds))
    else:
      from bssl import parallel

      parallel.maybe_initialize_distributed(force=f.distributed)
      if f.jobs > 1 and parallel.process_count() > 1:
        raise SweepError("--jobs > 1 cannot be combined with a multi-process launch")
      s = run_sweep(
          base,
          f.workdir,
          axes,
          seeds,
          share_from=share_from,
          jobs=f.jobs,
          point_argv=point_argv,
          guard=parallel.process_count() == 1,
      )
    print(json.dumps({k: s[k] for k in ("num_points", "num_done")}))
  except (SweepError, *bssl_main.user_errors()) as e:
    fail(str(e))
  except (train.Preempted, Terminated) as e:
    _exit_preempted(str(e))


def main():
  _die_with_parent()  # a point worker: before the imports (seconds) that follow
  from absl import app, flags

  from bssl import main as bssl_main  # --config, --workdir (and malloc tuning)

  flags.DEFINE_multi_string("sweep", [], "<field>=<v1>,<v2>,... (repeat for a grid)")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds.")
  flags.DEFINE_bool("emit", False, "Print one command per point instead of running.")
  flags.DEFINE_bool("collect", False, "Only write sweep.json/md and figures.")
  flags.DEFINE_integer(
      "jobs",
      1,
      "Points run at once, each in its own process (local "
      "--workdir); points that share a stage wait for it.",
  )
  flags.DEFINE_string(
      "share_from",
      "",
      "Comma-separated --workdir folders of other sweeps "
      "whose finished stages may be copied (e.g. one baseline for all axes).",
  )
  flags.DEFINE_string("point", "", "Run one point of the grid (what --jobs runs).")
  app.run(_main, flags_parser=bssl_main.parse_flags)


if __name__ == "__main__":
  main()
