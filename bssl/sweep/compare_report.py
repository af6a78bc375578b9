"""The JAX-vs-PyTorch comparison's report: from the results of every (backend, seed) point,
``compare.json`` (:func:`build_report`) and ``compare.md`` (:func:`to_markdown`).

* per stage (baseline, teacher, pre-trained student, fine-tuned student: test top-1 and
  top-5; D̂'s label precision; the student's gain over the baseline): the mean ± sample
  standard deviation over seeds of each backend, the difference (PyTorch − JAX) and
  whether the two agree within seed noise. The rule (:func:`bssl.stats.agreement`):
  **agree when |mean difference| ≤ 2 × the standard error of that difference**,
  ``sqrt(s_jax²/n_jax + s_torch²/n_torch)`` (seeds are independent replicates; n ≥ 2 per
  backend is needed);
* the overlap of the two teachers' D̂ for each seed: the Jaccard index of the sets of
  (image id, class) rows; for reference, the same index between two seeds of one backend
  (computed on the images the two seeds' U have in common) says how much D̂ moves with the
  seed alone.

Speed is not measured here: ``benchmarks/framework_speed.py`` times the same train step and
the same scoring (log-odds top-P) in both frameworks.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from bssl import stats
from bssl.data import recipe

STAGE_KEYS = ("baseline", "teacher", "student_pretrained", "student")
NAMES = {"jax": "JAX", "torch": "PyTorch"}  # the backend axis's values, as reports name them


def seed_config(cfg, seed: int):
  """The comparison's config for one seed (a plain copy of ``cfg`` with ``seed`` set)."""
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.seed = int(seed)
  return c


def _pairs(sel, num_classes: int, id_map=None):
  """D̂'s rows as integers ``id * num_classes + class`` (ids mapped by ``id_map``)."""
  ids = np.asarray(sel.ids, np.int64)
  if id_map is not None:
    ids = id_map[ids]
  return ids * num_classes + np.asarray(sel.classes, np.int64)


def _u_to_train_index(cfg):
  """U's ids -> indices into the training split (``rest_of_train`` only), so that the D̂ of
  two seeds (different D, hence different U) can be compared image by image. U is the
  training images outside D and the validation split, in index order (cut to its first
  ``limit``): its first len(U) members are all below len(D) + len(val) + len(U)."""
  if cfg.unlabelled.kind != "rest_of_train":
    return None
  data = recipe.build_data(cfg)
  taken = np.concatenate(
      [np.asarray(data.splits["labelled"], np.int64), np.asarray(data.splits["val"], np.int64)]
  )
  n = len(taken) + len(data.unlabelled)
  return np.setdiff1d(np.arange(n), taken)[: len(data.unlabelled)]


def dhat_overlaps(cfg, sels: dict, seeds: list[int], frameworks: list[str]) -> dict:
  """The overlap of the D̂ of the two backends for each seed (``sels[backend, seed]``: a
  :class:`bssl.selection.Selection`), and for reference between two seeds of one backend
  (on the images both seeds' U contain)."""
  nc = cfg.data.num_classes
  out: dict = {"per_seed": {}}
  if set(frameworks) >= {"jax", "torch"}:
    for s in seeds:
      out["per_seed"][str(s)] = stats.jaccard(
          _pairs(sels["jax", s], nc), _pairs(sels["torch", s], nc)
      )
    out["jax_vs_torch"] = stats.summarize([v["jaccard"] for v in out["per_seed"].values()])
  # Reference: two seeds of the same framework, on the images both seeds' U contain.
  maps = {s: _u_to_train_index(seed_config(cfg, s)) for s in seeds}
  if len(seeds) >= 2 and all(m is not None for m in maps.values()):
    ref: dict = {}
    for fw in frameworks:
      vals = []
      for i, s in enumerate(seeds):
        for t in seeds[i + 1 :]:
          common = np.intersect1d(maps[s], maps[t])
          pa = _pairs(sels[fw, s], nc, maps[s])
          pb = _pairs(sels[fw, t], nc, maps[t])
          pa = pa[np.isin(pa // nc, common)]
          pb = pb[np.isin(pb // nc, common)]
          vals.append(stats.jaccard(pa, pb)["jaccard"])
      ref[fw] = stats.summarize(vals)
    out["between_seeds_same_framework"] = ref
  return out


def build_report(
    cfg,
    seeds: list[int],
    frameworks: list[str],
    results: dict,
    overlap: dict,
    timings: dict,
    config_name: str,
) -> dict:
  """compare.json: every metric of every backend over the seeds (``results[backend][seed]``:
  the point's ``report/results.json``), with the agreement of the two backends
  (:func:`bssl.stats.agreement`), D̂'s overlap (:func:`dhat_overlaps`), the wall times."""
  metrics: dict = {}
  rows = [(k, m) for k in STAGE_KEYS for m in ("top1", "top5")]
  for key, m in rows + [("dhat_label_precision", None), ("gain_top1", None)]:
    name = key if m is None else f"{key}_{m}"
    entry: dict = {}
    for fw in frameworks:
      vals = []
      for s in seeds:
        r = results[fw][s]
        if key == "dhat_label_precision":
          v = r.get("selection", {}).get("label_precision")
        elif key == "gain_top1":
          v = r["student"]["top1"] - r["baseline"]["top1"]
        else:
          v = r[key][m]
        if v is not None:
          vals.append(float(v))
      entry[fw] = stats.summarize(vals)
    if set(frameworks) >= {"jax", "torch"}:
      entry.update(stats.agreement(entry["jax"], entry["torch"]))
    metrics[name] = entry
  report = {
      "config": config_name,
      "seeds": seeds,
      "frameworks": frameworks,
      "rule": "agree: |mean(torch) - mean(jax)| <= 2 * sqrt(s_jax^2/n_jax + s_torch^2/n_torch)"
      " (s: sample std over seeds; n: seeds)",
      "metrics": metrics,
      "dhat_overlap": overlap,
      "wall_seconds": timings,
      "per_seed": {fw: {str(s): results[fw][s] for s in seeds} for fw in frameworks},
      "schedule": {
          st: {
              "steps": cfg[st].get("steps"),
              "batch_size": cfg[st].batch_size,
              "lr": cfg[st].get("lr"),
          }
          for st in ("baseline", "teacher", "pretrain", "finetune")
      },
      "select": {"k": int(cfg.select.k), "p": int(cfg.select.p)},
  }
  stage_agree = [metrics[f"{k}_{m}"].get("agree") for k, m in rows]
  report["all_stages_agree"] = None if any(a is None for a in stage_agree) else all(stage_agree)
  return report


def _pct(s: dict) -> str:
  if not s or not s.get("n"):
    return "—"
  if s["n"] < 2:
    return f"{100 * s['mean']:.2f}"
  return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def to_markdown(rep: dict) -> str:
  """compare.md: the tables of :func:`build_report`'s report."""
  fws = rep["frameworks"]
  both = set(fws) >= {"jax", "torch"}
  seeds = ", ".join(str(s) for s in rep["seeds"])
  lines = [
      f"# JAX vs PyTorch: the same recipe ({rep['config']}, seeds {seeds})",
      "",
      "Test top-1 / top-5 (%), mean ± standard deviation over seeds. Both frameworks read "
      "the same data splits and the same batches (the same grain pipelines and seeds) "
      "with the same hyperparameters. Δ = PyTorch − JAX (points); "
      "agree: |Δ| ≤ 2 × SE(Δ), SE(Δ) = √(s²_JAX/n + s²_PyTorch/n).",
      "",
  ]
  head = "| stage | metric | " + " | ".join(NAMES[f] for f in fws)
  if both:
    head += " | Δ | 2 × SE | agree"
  lines += [head + " |", "|" + "---|" * (2 + len(fws) + (3 if both else 0))]
  names = [(f"{k}_{m}", k, f"top-{m[-1]}") for k in STAGE_KEYS for m in ("top1", "top5")]
  names += [
      ("dhat_label_precision", "D̂", "label precision"),
      ("gain_top1", "student − baseline", "top-1 gain"),
  ]
  for name, stage, metric in names:
    e = rep["metrics"][name]
    row = f"| {stage} | {metric} | " + " | ".join(_pct(e[f]) for f in fws)
    if both:
      agree = {True: "yes", False: "**no**", None: "n/a"}[e.get("agree")]
      se2 = "—" if not math.isfinite(e["se"]) else f"{200 * e['se']:.2f}"
      row += f" | {100 * e['diff']:+.2f} | {se2} | {agree}"
    lines.append(row + " |")
  if both:
    verdict = {
        True: "all four models agree within seed noise on top-1 and top-5",
        False: "at least one model does NOT agree within seed noise",
        None: "n/a",
    }
    lines += ["", f"Verdict: {verdict[rep['all_stages_agree']]}."]
  ov = rep["dhat_overlap"]
  if ov.get("per_seed"):
    lines += [
        "",
        "## Overlap of the two teachers' D̂",
        "",
        "Jaccard index of the (image id, class) rows of D̂ selected by the JAX teacher "
        "and by the PyTorch teacher of the same seed (same D, same U).",
        "",
        "| seed | JAX rows | PyTorch rows | common | Jaccard |",
        "|---|---|---|---|---|",
    ]
    for s, v in ov["per_seed"].items():
      lines.append(
          f"| {s} | {v['rows_a']:,} | {v['rows_b']:,} | {v['intersection']:,} | "
          f"{v['jaccard']:.3f} |"
      )
    j = ov["jax_vs_torch"]
    lines.append(
        f"| mean | | | | {j['mean']:.3f}" + (f" ± {j['std']:.3f}" if j["n"] > 1 else "") + " |"
    )
  ref = ov.get("between_seeds_same_framework")
  if ref:
    lines += [
        "",
        "For reference, the same index between teachers of two different seeds of one "
        "framework (on the images the two seeds' U share): "
        + "; ".join(f"{NAMES[f]} {v['mean']:.3f}" for f, v in ref.items())
        + ".",
    ]
  t = rep.get("wall_seconds") or {}
  if t:
    lines += [
        "",
        "Wall time: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in t.items() if v is not None)
        + ".",
    ]
  sched = rep.get("schedule") or {}
  if sched:
    lines += [
        "",
        "Schedule: "
        + ", ".join(f"{k} {v['steps']} steps × {v['batch_size']}" for k, v in sched.items())
        + f"; K = {rep['select']['k']}, P = {rep['select']['p']}.",
    ]
  lines += [
      "",
      "Speed (the same train step and the same log-odds top-P scoring in both frameworks): "
      "`python benchmarks/framework_speed.py --config=<this config>`.",
  ]
  return "\n".join(lines) + "\n"
