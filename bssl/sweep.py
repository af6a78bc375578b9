"""Grids of recipe runs: ``python -m bssl.sweep --config=configs/demo.py --workdir=DIR
--sweep=select.k=1000,2000,5000 [--sweep=unlabelled.limit=...] [--seeds=0,1,2]``.

Every point of the grid (the product of the axes, times the seeds) is one engine run in
``DIR/points/<name>``, and shares every artifact that the point does not change: before a
point runs, each of its stages whose fingerprint (config fields, inputs, backend, U) equals
a completed stage of an earlier point is copied from there, so one teacher is trained per
seed and teacher setting, and one scoring pass serves a seed's every K and P (the sweep
scores once with ``score.max_k`` / ``score.max_p`` = the largest of the grid: the exact
D̂ of any smaller K and P is derived from it). Rerunning the command continues the grid:
finished points are kept, an interrupted one resumes where it stopped.

``--emit`` prints one command per point instead (for a SLURM array or a pod); run them in
grid order so that shared stages exist when a later point starts; ``--collect`` then
writes the summary. The summary: ``DIR/sweep.json`` (every point: overrides, seed,
top-1 of every model, D̂ size and label precision), ``DIR/sweep.md`` (a table per axis:
mean ± std over seeds) and ``DIR/<axis>.png`` (student and baseline top-1 against the
axis; log x for sizes and counts).

Exit codes: 0 done, 2 a user error (one line), 143 preempted (rerun to continue).
"""
from __future__ import annotations

import itertools
import json
import shlex
import sys
import time

import numpy as np

from bssl import config as config_lib
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
  out = []
  for v in values.split(","):
    v = v.strip()
    if not v:
      continue
    try:
      if f.type is bool:
        if v.lower() not in ("true", "false", "1", "0"):
          raise ValueError(v)
        out.append(v.lower() in ("true", "1"))
      elif f.type in (int, float, str):
        out.append(f.type(v))
      else:
        raise SweepError(f"--sweep: field {name!r} ({f.type.__name__}) cannot be swept")
    except ValueError:
      raise SweepError(f"--sweep: {name}={v!r} is not a {f.type.__name__}") from None
  if not out:
    raise SweepError(f"--sweep: no values for {name!r}")
  if len(set(out)) != len(out):
    raise SweepError(f"--sweep: repeated values for {name!r}: {out}")
  return name, out


def _name(overrides: dict, seed: int) -> str:
  parts = [f"{k}={v}" for k, v in overrides.items()] + [f"seed={seed}"]
  return ",".join(parts).replace("/", "_")


def points(cfg, axes: list[tuple[str, list]], seeds: list[int]) -> list[dict]:
  """The grid, in an order where points sharing a teacher follow each other."""
  out = []
  for seed in seeds:
    for combo in itertools.product(*[vals for _, vals in axes]):
      overrides = {name: v for (name, _), v in zip(axes, combo)}
      out.append({"name": _name(overrides, seed), "overrides": overrides, "seed": seed})
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


def _copy_tree(src, dst) -> None:
  src, dst = workdir_lib.path(src), workdir_lib.path(dst)
  for child in src.iterdir():
    if child.is_dir():
      _copy_tree(child, dst / child.name)
    else:
      workdir_lib.write_bytes(dst / child.name, child.read_bytes())


def share(cfg, wd: workdir_lib.Workdir, done_points: list[workdir_lib.Workdir],
          log=print) -> list[str]:
  """Copies into ``wd`` every stage whose fingerprint equals a completed stage of one of
  ``done_points``; returns the stages copied. Stages go in table order, so a copied
  stage's inputs (their artifact ids) are the copied upstream stages'."""
  from bssl import engine, stages
  from bssl.data import recipe
  table = stages.table(cfg)
  uid = recipe.build_data(cfg).unlabelled_identity
  requested = set(stages.expand(config_lib.parse_stages(cfg.stages), cfg))
  copied = []
  for name, st in table.items():
    if not st.fingerprinted or name not in requested or wd.done(name) is not None:
      continue
    if wd.started(name) is not None:
      break  # this point's own partial work: resume it, copy nothing downstream
    fp = engine.fingerprint(cfg, st, wd, "jax", uid)
    for other in done_points:
      d = other.done(name)
      if d is not None and not engine.changes(d.get("fingerprint") or {}, fp):
        _copy_tree(other.stage(name), wd.stage(name))
        copied.append(name)
        log(f"sweep: {name} shared from {other}")
        break
  return copied


def _row(point: dict, res: dict) -> dict:
  models = {k: res[k]["top1"] for k in ("baseline", "teacher", "student_pretrained",
                                        "student") if k in res}
  sel = res.get("selection") or {}
  return {"name": point["name"], "seed": point["seed"], "overrides": point["overrides"],
          "top1": models, "dhat_rows": sel.get("num_selected"),
          "dhat_label_precision": sel.get("label_precision")}


def collect(root, axes, pts) -> dict:
  """sweep.json, sweep.md and a figure per axis from the points' results."""
  root = workdir_lib.path(root)
  rows = []
  for p in pts:
    f = root / "points" / p["name"] / "report" / "results.json"
    if f.exists():
      rows.append(_row(p, workdir_lib.read_json(f)))
  summary = {"axes": [{"field": n, "values": v} for n, v in axes],
             "seeds": sorted({p["seed"] for p in pts}), "num_points": len(pts),
             "num_done": len(rows), "points": rows}
  workdir_lib.write_json(root / "sweep.json", summary)
  md = [f"# Sweep ({len(rows)} of {len(pts)} points done)", ""]
  for name, values in axes:
    md += [f"## {name}", "", "| " + name + " | points | baseline | teacher | student, "
           "pre-trained | student | D̂ rows | D̂ precision |", "|---|---|---|---|---|---|---|---|"]
    for v in values:
      group = [r for r in rows if r["overrides"].get(name) == v]
      def ms(key, group=group):
        xs = [r["top1"][key] for r in group if key in r["top1"]]
        if not xs:
          return "—"
        return f"{100 * np.mean(xs):.2f} ± {100 * np.std(xs, ddof=1) if len(xs) > 1 else 0:.2f}"
      prec = [r["dhat_label_precision"] for r in group if r["dhat_label_precision"] is not None]
      size = [r["dhat_rows"] for r in group if r["dhat_rows"] is not None]
      md.append(f"| {v} | {len(group)} | {ms('baseline')} | {ms('teacher')} | "
                f"{ms('student_pretrained')} | {ms('student')} | "
                f"{int(np.mean(size)) if size else '—'} | "
                f"{f'{100 * np.mean(prec):.2f}%' if prec else '—'} |")
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
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  xs = list(values) if numeric else list(range(len(values)))
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for key, style in (("student", "o-"), ("baseline", "s--")):
    means, stds = [], []
    for v in values:
      g = [100 * r["top1"][key] for r in rows if r["overrides"].get(name) == v and key in
           r["top1"]]
      means.append(np.mean(g) if g else np.nan)
      stds.append(np.std(g, ddof=1) if len(g) > 1 else 0.0)
    ax.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=key)
  if numeric and name in LOG_AXES and min(values) > 0:
    ax.set_xscale("log")
  if not numeric:
    ax.set_xticks(xs, [str(v) for v in values])
  ax.set_xlabel(name)
  ax.set_ylabel("test top-1 (%)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  workdir_lib.write_bytes(path, buf.getvalue())


def run_sweep(base, root: str, axes, seeds, log=print) -> dict:
  """Runs every point (sharing stages), then collects. Resumable."""
  from bssl import engine
  pts = points(base, axes, seeds)
  root_p = workdir_lib.path(root)
  workdir_lib.write_json(root_p / "grid.json", {"axes": [[n, v] for n, v in axes],
                                                "seeds": seeds})
  done: list[workdir_lib.Workdir] = []
  t0 = time.time()
  for i, p in enumerate(pts):
    cfg = point_config(base, p, axes)
    wd = workdir_lib.Workdir(str(root_p / "points" / p["name"]))
    if wd.done("report") is None:
      log(f"sweep: point {i + 1}/{len(pts)} {p['name']}")
      share(cfg, wd, done, log)
      engine.run_recipe(cfg, str(wd.root))
    else:
      log(f"sweep: point {i + 1}/{len(pts)} {p['name']} complete")
    done.append(wd)
    rate = (time.time() - t0) / (i + 1)
    log(f"sweep: {i + 1}/{len(pts)} points, eta {int(rate * (len(pts) - i - 1)) // 60}m")
  return collect(root, axes, pts)


def emit(config_arg: str, root: str, base, axes, seeds) -> list[str]:
  """One ``python -m bssl.main`` command per point (grid order)."""
  out = []
  for p in points(base, axes, seeds):
    cfg = point_config(base, p, axes)
    args = [f"--config={config_arg}", f"--workdir={root}/points/{p['name']}",
            f"--config.seed={p['seed']}"]
    args += [f"--config.{k}={v}" for k, v in p["overrides"].items()]
    if cfg.score.get("max_k") is not None:
      args += [f"--config.score.max_k={cfg.score.max_k}",
               f"--config.score.max_p={cfg.score.max_p}"]
    out.append(" ".join(shlex.quote(a) for a in [sys.executable, "-m", "bssl.main", *args]))
  return out


def _config_arg() -> str:
  for i, a in enumerate(sys.argv):
    if a.startswith("--config="):
      return a[len("--config="):]
    if a == "--config" and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
  return ""


def _main(argv):
  from absl import flags
  from bssl import main as bssl_main, train
  from absl import logging
  f, fail = flags.FLAGS, bssl_main.fail
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  if not f["verbosity"].present:  # orbax logs every checkpoint at INFO, as in bssl.main
    logging.set_verbosity(logging.WARNING)
  base = bssl_main.config_and_workdir("--workdir is required (the sweep's folder, local or "
                                      "gs://)")
  if not f.sweep:
    fail("--sweep is required, e.g. --sweep=select.k=1000,2000,5000")
  try:
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
    if f.emit:
      print("\n".join(emit(_config_arg(), f.workdir, base, axes, seeds)))
      return
    if f.collect:
      s = collect(f.workdir, axes, points(base, axes, seeds))
    else:
      from bssl import parallel
      parallel.maybe_initialize_distributed()
      s = run_sweep(base, f.workdir, axes, seeds)
    print(json.dumps({k: s[k] for k in ("num_points", "num_done")}))
  except (SweepError, *bssl_main.user_errors()) as e:
    fail(str(e))
  except train.Preempted as e:
    print(f"bssl.sweep: {e}; rerun the same command to continue", file=sys.stderr, flush=True)
    sys.exit(143)


def main():
  from absl import app, flags
  from bssl import main as bssl_main  # --config, --workdir (and malloc tuning)
  flags.DEFINE_multi_string("sweep", [], "<field>=<v1>,<v2>,... (repeat for a grid)")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds.")
  flags.DEFINE_bool("emit", False, "Print one command per point instead of running.")
  flags.DEFINE_bool("collect", False, "Only write sweep.json/md and figures.")
  app.run(_main, flags_parser=bssl_main.parse_flags)


if __name__ == "__main__":
  main()
