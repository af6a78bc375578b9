"""A sweep's summary, from the points' reports: ``<sweep>/sweep.json`` (every point: its
overrides, seed, the top-1 of every model, D̂'s size and label precision), ``sweep.md`` (a
table per axis: mean ± sd over seeds, :mod:`bssl.stats`) and ``<axis>.png`` (student and
baseline top-1 against the axis; log x for sizes and counts). Only the points of the
grid are read (each folder's name is its values: :func:`bssl.sweep.grid.point_name`). A
number whose model (or D̂) has been replaced since the point's report is never shown: the
point is listed as stale; a point made with another config or other inputs than the
sweep's (found by ``--collect``'s plan) is not shown at all: it is listed, with what changed.
"""

from __future__ import annotations

import io

import numpy as np

from bssl import config as config_lib
from bssl import stats, storage
from bssl import workdir as workdir_lib
from bssl.sweep import grid

LOG_AXES = ("select.k", "unlabelled.limit", "pretrain.steps", "unlabelled.size")


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


_RESULT_STAGES = dict(config_lib.EVALUATED_MODELS, selection="select")


def _current(point_dir, res: dict) -> tuple[dict, list[str]]:
  """A point's report results without the numbers of artifacts replaced since the report
  was written (each result names the artifact it measured; a result that names none, from
  an older report, cannot be checked and is left out too), and what was left out."""
  wd = workdir_lib.Workdir(str(point_dir))
  out, gone = dict(res), []
  for key, stage in _RESULT_STAGES.items():
    if key in res:
      try:
        done = wd.done(stage)
      except storage.CorruptArtifactError:  # damaged: its number is not shown
        done = None
      aid = res[key].get("artifact_id") if isinstance(res[key], dict) else None
      if aid is None or done is None or done.get("artifact_id") != aid:
        del out[key]
        gone.append(key)
  return out, gone


def causes(stale: dict[str, list[str]]) -> str:
  """What changed in a point's plan ({stage: what changed}), without the stages stale only
  because a stage they read is recomputed."""
  out = []
  for stage, why in stale.items():
    own = [w for w in why if not w.endswith("(recomputed in this run))")]
    if own:
      out.append(f"{stage}: {', '.join(own)}")
  return "; ".join(out) or "; ".join(f"{s}: {', '.join(w)}" for s, w in stale.items())


def collect(root, axes, pts, rerun: str = "", other_config: dict | None = None) -> dict:
  """sweep.json, sweep.md and a figure per axis from the results of the points ``pts`` (the
  grid's; no other folder is read). A number whose model (or D̂) has been replaced since
  the point's report is never shown: it is left out and the point is listed under
  ``stale`` (rerunning the sweep measures it again: every point goes through the engine).
  ``other_config``: {point: {stage: what changed}} of the points whose work was made with
  another config or other inputs than the sweep's: none of their numbers is shown; they
  are listed under ``other_config`` (``--recompute_stale`` recomputes them). ``rerun``:
  the command that reruns the sweep, named by that advice."""
  root = storage.path(root)
  other_config = other_config or {}
  rows, stale, other = [], [], []
  for p in pts:
    if p["name"] in other_config:
      other.append({"name": p["name"], "changed": other_config[p["name"]]})
      continue
    f = root / "points" / p["name"] / "report" / "results.json"
    if f.exists():
      res, gone = _current(f.parent.parent, storage.read_json(f))
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
      "other_config": other,
  }
  # the figures of an earlier summary (another grid's axes, or numbers not shown now) go
  drawn = {n for n, _ in axes} if any(r["top1"] for r in rows) else set()
  earlier = set()
  try:
    if (root / "sweep.json").exists():
      earlier = {a.get("field") for a in storage.read_json(root / "sweep.json").get("axes", [])}
  except (ValueError, OSError, AttributeError, TypeError):  # damaged: rewritten below
    pass
  for name in (earlier | {n for n, _ in axes}) - drawn:
    if isinstance(name, str) and "/" not in name and (root / f"{name}.png").exists():
      (root / f"{name}.png").unlink()
  storage.write_json(root / "sweep.json", summary)
  cmd = f"`{rerun}`" if rerun else "the sweep's command (without --collect)"
  recompute = f"`{rerun} --recompute_stale`" if rerun else f"{cmd} with --recompute_stale"
  md = [f"# Sweep ({len(rows)} of {len(pts)} points done)", ""]
  if other:
    md += [
        "Not shown (made with another config or other inputs than this sweep's): "
        + " | ".join(f"{e['name']}: {causes(e['changed'])}" for e in other)
        + f". Rerun {recompute} to recompute their stale stages (each point's others are "
        "kept).",
        "",
    ]
  if stale:
    md += [
        "Not shown (replaced since the point's report): "
        + "; ".join(f"{e['name']}: {', '.join(e['replaced'])}" for e in stale)
        + f". Rerun {cmd} to measure them again.",
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
        m, sd = stats.mean_std(xs, single_std=0.0)
        return f"{m:{sign}.2f} ± {sd:.2f}" if xs else "—"

      def model(key, group=group):
        return ms(_top1s(group, key))

      prec = [r["dhat_label_precision"] for r in group if r["dhat_label_precision"] is not None]
      size = [r["dhat_rows"] for r in group if r["dhat_rows"] is not None]
      gain = ms(_gains(group), "+")
      cell = grid.value_text(v).replace("|", "\\|")
      md.append(
          f"| {cell} | {len(group)} | {model('baseline')} | {model('teacher')} | "
          f"{model('student_pretrained')} | {model('student')} | {gain} | "
          f"{int(np.mean(size)) if size else '—'} | "
          f"{f'{100 * np.mean(prec):.2f}%' if prec else '—'} |"
      )
    md.append("")
    _figure(root / f"{name}.png", name, values, rows)
    md += [f"![{name}]({name}.png)", ""]
  storage.write_text(root / "sweep.md", "\n".join(md))
  return summary


def _figure(path, name, values, rows) -> None:
  from matplotlib.figure import Figure  # ~1.5 s to import: only when a figure is drawn

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
  fig = Figure(figsize=(9, 3.5))  # no pyplot: no global figure state, no GUI backend
  ax, gx = fig.subplots(1, 2)
  for key, style in (("student", "o-"), ("student_pretrained", "^:"), ("baseline", "s--")):
    means, stds = zip(
        *[stats.mean_std(_top1s(_group(rows, name, v), key), single_std=0.0) for v in values]
    )
    ax.errorbar(
        xs,
        means,
        yerr=stds,
        fmt=style,
        capsize=3,
        label={"student_pretrained": "student, pre-trained only"}.get(key, key),
    )
  # the paired gain: each seed's student against the same seed's baseline (same D)
  means, stds = zip(
      *[stats.mean_std(_gains(_group(rows, name, v)), single_std=0.0) for v in values]
  )
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
      a.set_xticks(xs, [grid.value_text(v)[:40] for v in values], rotation=15, fontsize=7)
    a.set_xlabel(name)
    a.grid(alpha=0.3)
  ax.set_ylabel("test top-1 (%)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  storage.write_bytes(path, buf.getvalue())
