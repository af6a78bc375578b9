"""The report: results.json, results.md, a figure of selected images at several
ranks for a few classes (as the paper's "tiger shark" figure) and a histogram of
images per class in D̂."""

from __future__ import annotations

import io

import numpy as np

from bssl import parallel, selection, storage
from bssl.config import round_stage
from bssl.data.pipelines import eval_image
from bssl.data.video import eval_clips, is_video
from bssl.stages import evaluate

MODEL_KEYS = ("baseline", "teacher", "student_pretrained", "student")


def results_table(results: dict, keys=MODEL_KEYS) -> str:
  lines = [
      "| model | architecture | params | train steps | val top-1 | test top-1 | test top-5 |",
      "|---|---|---|---|---|---|---|",
  ]
  for key in keys:
    m = results.get(key)
    if not m:
      continue
    val = f"{100 * m['val_top1']:.2f}" if m.get("val_top1") is not None else "—"
    lines.append(
        f"| {key} | {m.get('model', '')} | {m.get('num_params') or 0:,} | "
        f"{m.get('train_steps', '')} | {val} | {100 * m['top1']:.2f} | "
        f"{100 * m['top5']:.2f} |"
    )
  return "\n".join(lines)


def selection_table(sel: dict, unit: str = "images", num_bad: int = 0) -> str:
  rows = [
      f"- K = {sel['k']}, P = {sel['p']}: {sel['num_selected']:,} rows in D̂ "
      f"({sel.get('num_unique_images', 0):,} distinct {unit}) from "
      f"{sel.get('num_scored', 0):,} scored {unit}"
  ]
  if num_bad:
    rows.append(
        f"- {num_bad:,} {unit} of U could not be scored (undecodable, duplicates or "
        f"copies of evaluation images): listed with reasons in "
        f"select/bad_images.json"
    )
  ec = sel.get("eval_copies")
  if ec is not None:
    by = ec.get("removed_by_split", {})
    rows.append(
        f"- near-duplicates of evaluation images kept out of D̂: {ec['num_removed']:,} "
        f"(of test images {by.get('test', 0):,}, of validation images "
        f"{by.get('val', 0):,}); near-duplicates of D, left in U: "
        f"{ec['num_copies_of_labelled']:,}; listed in select/eval_copies.json"
    )
  nd = sel.get("near_duplicates")
  if nd is not None:
    rows.append(
        f"- near-duplicates within U collapsed in D̂: {nd['num_dropped']:,} {unit} left out "
        f"(a better-ranked member of their family was selected in the class; "
        f"{nd['num_families_collapsed']:,} families), from the top "
        f"{nd['candidates_per_class']:,} candidates per class; listed in "
        f"select/near_duplicates.parquet"
        + (f"; classes short of K for it: {nd['classes_short']}" if nd.get("classes_short") else "")
    )
  if "label_precision" in sel:
    rows.append(
        f"- label precision of D̂ (pseudo-label = hidden true label): "
        f"{100 * sel['label_precision']:.2f}%"
    )
    by = sel.get("label_precision_by_rank") or []
    if by:
      rows.append(
          "- precision by rank: "
          + ", ".join(f"{b['ranks'][0]}–{b['ranks'][1]}: {100 * b['precision']:.1f}%" for b in by)
      )
  short = sel.get("classes_short_of_k") or []
  rows.append(
      f"- classes with fewer than K candidates (kept all they had): "
      f"{short if short else 'none'}"
  )
  return "\n".join(rows)


def _save(fig, path) -> None:
  import matplotlib.pyplot as plt

  buf = io.BytesIO()
  fig.savefig(buf, dpi=110, format="png")
  plt.close(fig)
  storage.write_bytes(path, buf.getvalue())


def _class_figure(
    path,
    sel: selection.Selection,
    unlabelled,
    class_names,
    spec,
    num_classes_shown: int,
    num_images: int,
) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  counts = sel.counts()
  shown = [int(c) for c in np.argsort(-counts, kind="stable")[:num_classes_shown] if counts[c]]
  if not shown:
    return
  fig, axes = plt.subplots(
      len(shown), num_images, figsize=(1.3 * num_images, 1.5 * len(shown)), squeeze=False
  )
  for row, c in enumerate(shown):
    rows = np.flatnonzero(sel.classes == c)
    n = len(rows)
    # ranks spread from the top to the last selected image of the class
    picks = np.unique(np.linspace(0, n - 1, num_images).round().astype(int))
    for col in range(num_images):
      ax = axes[row, col]
      ax.axis("off")
      if col >= len(picks):
        continue
      r = rows[picks[col]]
      img = eval_image(unlabelled[int(sel.ids[r])]["image"], spec)
      if img is None:
        continue
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray")
      ax.set_title(f"rank {int(sel.ranks[r])}\n{float(sel.scores[r]):.3f}", fontsize=7)
    name = class_names[c] if c < len(class_names) else str(c)
    axes[row, 0].text(
        -0.15, 0.5, name, transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=8
    )
  fig.suptitle("Selected images by rank (score under each)", fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def _video_figure(
    path,
    sel: selection.Selection,
    unlabelled,
    class_names,
    spec,
    num_classes_shown: int,
    num_videos: int,
    frames_shown: int = 4,
) -> None:
  """Video-level D̂: for a few classes, the top-ranked and the lowest-ranked selected
  videos, each as a strip of ``frames_shown`` frames of its middle clip (rank and
  video-level score above it)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  counts = sel.counts()
  shown = [int(c) for c in np.argsort(-counts, kind="stable")[:num_classes_shown] if counts[c]]
  if not shown:
    return
  per_end = max(1, num_videos // 2)  # top ones and low ones
  fig, axes = plt.subplots(
      len(shown),
      2 * per_end,
      figsize=(1.0 * frames_shown * 2 * per_end, 1.4 * len(shown)),
      squeeze=False,
  )
  for row, c in enumerate(shown):
    rows = np.flatnonzero(sel.classes == c)
    order = rows[np.argsort(sel.ranks[rows], kind="stable")]
    picks = list(order[:per_end]) + list(order[-per_end:] if len(order) > per_end else [])
    for col in range(2 * per_end):
      ax = axes[row, col]
      ax.axis("off")
      if col >= len(picks):
        continue
      r = picks[col]
      clips = eval_clips(unlabelled[int(sel.ids[r])]["image"], spec)
      if clips is None:
        continue
      clip = clips[len(clips) // 2]
      idx = np.unique(np.linspace(0, len(clip) - 1, frames_shown).round().astype(int))
      strip = np.concatenate(
          [np.pad(f, ((1, 1), (1, 1), (0, 0)), constant_values=255) for f in clip[idx]], axis=1
      )
      ax.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255)
      which = "top" if col < per_end else "lowest"
      ax.set_title(f"{which}: rank {int(sel.ranks[r])}, {float(sel.scores[r]):.3f}", fontsize=7)
    name = class_names[c] if c < len(class_names) else str(c)
    axes[row, 0].text(
        -0.05, 0.5, name, transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=8
    )
  fig.suptitle(
      "Video-level D̂: top- and lowest-ranked selected videos (frames of the middle "
      "clip; rank, video-level score)",
      fontsize=9,
  )
  fig.tight_layout()
  _save(fig, path)


def _histogram(path, sel: selection.Selection, k: int, class_names) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  counts = sel.counts()
  fig, ax = plt.subplots(figsize=(max(4, min(12, 0.4 * len(counts))), 3))
  if len(counts) <= 40:
    ax.bar(np.arange(len(counts)), counts, color="tab:blue")
    ax.set_xticks(np.arange(len(counts)))
    ax.set_xticklabels(
        [class_names[c] if c < len(class_names) else str(c) for c in range(len(counts))],
        rotation=60,
        ha="right",
        fontsize=7,
    )
    ax.axhline(k, color="tab:red", ls="--", lw=1, label=f"K = {k}")
    ax.set_ylabel("images in D̂")
    ax.legend(fontsize=7)
  else:
    ax.hist(counts, bins=50)
    ax.axvline(k, color="tab:red", ls="--", lw=1, label=f"K = {k}")
    ax.set_xlabel("images per class in D̂")
    ax.set_ylabel("classes")
    ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)


def report(ctx) -> dict:
  """The report stage: process 0 writes it; every other process waits."""
  if not parallel.is_main_process():
    return {}
  return write_report(ctx.cfg, ctx.data, ctx.wd)


def write_report(cfg, data, wd) -> dict:
  out_dir = wd.stage("report")
  results: dict = {"name": cfg.get("name", ""), "seed": int(cfg.seed)}
  keys = [key for key, _ in evaluate.models(cfg)]
  ev = wd.done("evaluate")
  stale = []
  if ev is not None:
    for key in keys:
      if key in ev:
        if not evaluate.current(wd, cfg, key, ev[key]):  # a model replaced since
          stale.append(key)
          continue
        results[key] = {k: v for k, v in ev[key].items() if k != "record"}
  if stale:
    print(
        f"[report] not shown: {', '.join(stale)} (the evaluation measured a model that has "
        f"since been replaced; run the evaluate stage)",
        flush=True,
    )
  sel = None
  sel_done = wd.done("select")
  if sel_done is not None:
    results["selection"] = {
        k: v for k, v in sel_done.items() if k not in ("record", "finished")
    }  # artifact_id: sweep --collect
    sel = selection.read_selection(wd.stage("select") / "dhat")
  s = wd.done("score")
  if s is not None:
    results["scoring"] = {
        k: s[k] for k in ("num_scored", "num_bad_images", "num_unlabelled") if k in s
    }
  if "student" in results and "baseline" in results:
    results["gain_top1"] = results["student"]["top1"] - results["baseline"]["top1"]
  tr = wd.done("transfer")
  if tr is not None:
    results["transfer"] = {
        k: v
        for k, v in tr.items()
        if k not in ("record", "finished", "artifact_id", "stage_seconds")
    }
  rounds = int(cfg.get("rounds", 1) or 1)
  if rounds > 1:
    results["rounds"] = []
    for r in range(1, rounds + 1):
      key = "student" if r == 1 else f"student_r{r}"
      sd = wd.done(round_stage("select", r)) or {}
      row = {
          "round": r,
          "teacher": "teacher" if r == 1 else ("student" if r == 2 else f"student_r{r - 1}"),
          "student_top1": results.get(key, {}).get("top1"),
          "dhat_label_precision": sd.get("label_precision"),
          "num_selected": sd.get("num_selected"),
      }
      results["rounds"].append(row)
  timings = {}
  for stage in ("weak_pretrain", "baseline", "teacher") + tuple(
      round_stage(b, r)
      for r in range(1, rounds + 1)
      for b in ("score", "select", "pretrain", "finetune")
  ):
    d = wd.done(stage)
    if d is not None:
      timings[stage] = d.get("stage_seconds")
  results["stage_seconds"] = timings

  figures = {}
  if sel is not None and len(sel.ids):
    names = data.class_names or tuple(str(c) for c in range(cfg.data.num_classes))
    # a class folder's name that is not UTF-8 (surrogate-escaped): its bytes as \xNN
    names = tuple(
        str(n).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for n in names
    )
    if is_video(data.spec):  # videos: strips of frames
      _video_figure(
          out_dir / "selected_images.png",
          sel,
          data.unlabelled,
          names,
          data.spec,
          cfg.report.figure_classes,
          cfg.report.figure_images,
      )
    else:
      _class_figure(
          out_dir / "selected_images.png",
          sel,
          data.unlabelled,
          names,
          data.spec,
          cfg.report.figure_classes,
          cfg.report.figure_images,
      )
    _histogram(out_dir / "class_histogram.png", sel, int(cfg.select.k), names)
    figures = {
        "selected_images": str(out_dir / "selected_images.png"),
        "class_histogram": str(out_dir / "class_histogram.png"),
    }
  results["figures"] = figures

  storage.write_json(out_dir / "results.json", results)
  md = [
      f"# bssl results: {results['name']} (seed {results['seed']})",
      "",
      "Top-1/top-5 on the test split (fractions shown as %).",
      "",
      results_table(results, keys),
      "",
  ]
  if results.get("teacher", {}).get("same_as") == "baseline":
    md += [
        "Self-training: the teacher is the baseline itself (`teacher.init_from='baseline'`).",
        "",
    ]
  if "gain_top1" in results:
    md += [f"Student − baseline, test top-1: {100 * results['gain_top1']:+.2f} points", ""]
  if "rounds" in results:
    md += [
        "## Rounds of self-training (each round's student is the next round's teacher)",
        "",
        "| round | teacher | student test top-1 | D̂ label precision | D̂ rows |",
        "|---|---|---|---|---|",
    ]
    for row in results["rounds"]:
      t1, pr = row["student_top1"], row["dhat_label_precision"]
      md.append(
          f"| {row['round']} | {row['teacher']} | "
          f"{'—' if t1 is None else f'{100 * t1:.2f}'} | "
          f"{'—' if pr is None else f'{100 * pr:.2f}%'} | {row['num_selected'] or '—'} |"
      )
    md.append("")
  if "transfer" in results:
    t = results["transfer"]
    md += [
        f"## Transfer to {t['target']} ({t['num_classes']} classes): target test top-1",
        "",
        "| model | fc-only | full fine-tuning |",
        "|---|---|---|",
    ]
    for key in ("baseline", "teacher", "student"):
      if key in t:
        cell = lambda m: (f"{100 * t[key][m]['top1']:.2f}" if m in t[key] else "—")
        md.append(
            f"| {key}{' (= ' + t[key]['same_as'] + ')' if 'same_as' in t[key] else ''}"
            f" | {cell('fc_only')} | {cell('full_ft')} |"
        )
    md.append("")
  if "selection" in results:
    md += [
        "## Selection (D̂, round 1)" if rounds > 1 else "## Selection (D̂)",
        "",
        selection_table(
            results["selection"],
            "videos" if is_video(data.spec) else "images",
            int(results.get("scoring", {}).get("num_bad_images") or 0),
        ),
        "",
    ]
  if figures:
    md += [
        "![selected images](selected_images.png)",
        "",
        "![images per class](class_histogram.png)",
        "",
    ]
  storage.write_text(out_dir / "results.md", "\n".join(md))
  print("\n".join(md), flush=True)
  return {"results": str(out_dir / "results.json")}
