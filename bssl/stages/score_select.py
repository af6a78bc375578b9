"""Score U with the teacher (every process its own chunks, resumable in images), then
select D̂: the exact per-class top-K of the merged parts, ranked by the teacher's log-odds
(ties by a hash of the image id seeded with the config's ``seed``; :mod:`bssl.scoring`)."""

from __future__ import annotations

import numpy as np

from bssl import config as config_lib
from bssl import parallel, scoring, selection, storage
from bssl.data import sources
from bssl.stages import dhat_dedup, eval_copies


def _searches_copies(cfg) -> bool:
  """The score stage keeps copies of evaluation images out of U (image configs)."""
  return cfg.score.eval_copies == "exclude" and not config_lib.is_video(cfg)


def score_methods(cfg) -> tuple[str, ...]:
  """The methods whose answers the score stage keeps (the stage table's ``methods``)."""
  return ("neardup",) if _searches_copies(cfg) else ()


def select_methods(cfg) -> tuple[str, ...]:
  """The methods whose answers the select stage keeps (the stage table's ``methods``)."""
  return ("neardup",) if dhat_dedup.enabled(cfg) else ()


def score(ctx, teacher: str = "teacher") -> dict:
  """Scores U with ``teacher``'s model (a later round: the previous round's student)."""
  cfg, unl = ctx.cfg, ctx.data.unlabelled
  n, pi, pc = len(unl), parallel.process_index(), parallel.process_count()
  parts = ctx.dir / "parts"
  k_dhat, p, ranked = config_lib.scoring_kp(cfg)
  # near-duplicates within U collapsed in D̂: a margin of candidates per class beyond K
  k = dhat_dedup.scoring_k(cfg, k_dhat)
  nc = int(cfg.data.num_classes)
  balanced = bool(cfg.select.balanced)
  seed = int(cfg.seed)  # orders exact ties (bssl.selection.tie_hash)
  scoring.check_parts(
      parts, num_images=n, num_classes=nc, k=k, p=p, ranked=ranked, balanced=balanced, seed=seed
  )
  chunk = int(cfg.score.checkpoint_every) * int(cfg.score.batch_size)
  gen, chunks = scoring.plan_chunks(parts, n, chunk)
  parallel.sync("bssl_score_plan")  # every process has listed the parts before any writes
  todo = sum(b - a for a, b in chunks)
  ctx.log(
      f"{n} images of U, {n - todo} scored by earlier runs; {todo} to score in "
      f"{len(chunks)} chunk(s) over {pc} process(es), batch {cfg.score.batch_size}, "
      f"top-{p} classes (generation {gen})"
      + (
          f"; top-{k} kept per class and rank (any select.k <= {k_dhat}, select.p <= {p})"
          if ranked
          else ""
      )
      + (
          f"; {k} candidates kept per class for {k_dhat} distinct images (near-duplicates "
          f"within U collapsed in select)"
          if k != k_dhat
          else ""
      )
      + ("" if balanced else f"; unbalanced: the global top {k * nc} (image, class) " f"pairs kept")
  )
  source = unl
  if _searches_copies(cfg):
    # copies of test / validation images never scored: they cannot enter D̂
    found = eval_copies.find(ctx, ctx.dir / "eval_copies")
    reasons = eval_copies.excluded(found)
    if reasons:
      source = eval_copies.Excluding(unl, reasons)
  if chunks:
    scorer = ctx.backend.scorer(ctx, teacher, p)
    scoring.score_process(
        scorer=scorer,
        source=source,
        spec=ctx.data.spec,
        parts_dir=parts,
        gen=gen,
        chunks=chunks,
        process_index=pi,
        process_count=pc,
        num_classes=nc,
        k=k,
        p=p,
        local_batch_size=ctx.backend.local_batch_size(int(cfg.score.batch_size)),
        num_threads=cfg.num_threads,
        num_workers=int(cfg.score.num_workers),
        in_flight=int(cfg.score.in_flight),
        ranked=ranked,
        balanced=balanced,
        seed=seed,
        log=ctx.log,
    )
  parallel.sync("bssl_score_parts")
  info = {"num_unlabelled": n, "num_processes": pc}
  if parallel.is_main_process():
    cov = scoring.coverage(parts, n)  # every image exactly once, or an error
    info.update(
        num_scored=cov["num_scored"], num_bad_images=cov["num_bad"], num_parts=cov["num_parts"]
    )
  return info


def select(ctx, score: str = "score") -> dict:
  if not parallel.is_main_process():
    return {}
  cfg, unl = ctx.cfg, ctx.data.unlabelled
  acc, merged = scoring.merge_parts(ctx.wd.stage(score) / "parts", len(unl))
  bad = merged["bad_ids"]
  found = eval_copies.read_done(
      ctx.wd.stage(score) / "eval_copies", ctx.wd.done(score).get("num_processes", 1)
  )
  copies_info = {}
  if found is not None:
    unl = eval_copies.Excluding(unl, eval_copies.excluded(found))
    keys, _ = selection.image_keys(unl.source, found["id"])
    storage.write_json(
        ctx.dir / "eval_copies.json",
        [
            {
                "id": int(i),
                "key": str(k),
                "split": eval_copies.SPLITS[int(s)],
                "matched_id": int(e),
                "similarity": round(float(v), 4),
                "removed": int(s) < 2,
            }
            for i, k, s, e, v in zip(
                found["id"], keys, found["split"], found["match"], found["similarity"]
            )
        ],
    )
    copies_info = {"eval_copies": eval_copies.summary(found)}
    ctx.log(
        f"near-duplicates of evaluation images kept out of D̂: "
        f"{copies_info['eval_copies']['num_removed']} "
        f"({copies_info['eval_copies']['removed_by_split']}); of D (left in U): "
        f"{copies_info['eval_copies']['num_copies_of_labelled']}; listed in "
        f"{ctx.dir / 'eval_copies.json'}"
    )
  names = [unl.name_of(i) for i in bad] if hasattr(unl, "name_of") else [str(i) for i in bad]
  reasons = (
      [unl.reason_of(i) for i in bad]
      if hasattr(unl, "reason_of")
      else ["cannot be made the model's input"] * len(bad)
  )
  storage.write_json(ctx.dir / "bad_images.json", {"ids": bad, "files": names, "reasons": reasons})
  if bad:
    ctx.log(
        f"{len(bad)} images were not scored (undecodable, exact duplicates of an "
        f"earlier image, placeholders, or copies of evaluation images); listed with "
        f"reasons in {ctx.dir / 'bad_images.json'}"
    )
  dedup_info = {}
  if dhat_dedup.enabled(cfg):  # near-duplicates within U collapsed: D̂ of distinct images
    sel, dedup_info = _collapsed(ctx, acc, int(cfg.select.k), int(cfg.select.p), unl)
  elif isinstance(acc, selection.GlobalTopK):  # unbalanced: K x C best pairs of any class
    sel = acc.result(int(cfg.select.k), int(cfg.select.p))
    ctx.log(
        f"unbalanced D^: the global top {int(cfg.select.k) * acc.num_classes} pairs of "
        f"ranks < {cfg.select.p}"
    )
  elif isinstance(acc, selection.RankedTopK):  # scored for a larger K: derived exactly
    sel = acc.result(int(cfg.select.k), int(cfg.select.p))
    ctx.log(
        f"D^ for K={cfg.select.k}, P={cfg.select.p} derived from the kept top-{acc.k} "
        f"per class of each of {acc.p} ranks"
    )
  else:
    sel = acc.result()
  sel = selection.with_probabilities(sel)  # scores: the probability; rank_scores: log-odds
  if len(sel.ids) == 0:
    raise sources.DataError(
        f"select: D̂ is empty: none of the {len(unl)} images of U could "
        f"be scored (see {ctx.dir / 'bad_images.json'})"
    )
  counts = sel.counts()
  short = [int(c) for c in np.flatnonzero(counts < cfg.select.k)]
  info = {
      "k": int(cfg.select.k),
      "p": int(cfg.select.p),
      "num_selected": int(len(sel.ids)),
      "num_unique_images": int(len(np.unique(sel.ids))),
      "num_scored": merged["num_scored"],
      "classes_short_of_k": short,
      "min_per_class": int(counts.min()),
      "max_per_class": int(counts.max()),
      **copies_info,
      **dedup_info,
  }
  truth = ctx.data.unlabelled_true_labels
  if truth is not None:
    correct = truth[sel.ids] == sel.classes
    info["label_precision"] = float(correct.mean())
    top = max(int(cfg.select.k), int(sel.ranks.max()) + 1)  # unbalanced: ranks pass K
    edges = np.unique(np.linspace(0, top, 9).astype(int))
    info["label_precision_by_rank"] = [
        {"ranks": [int(lo), int(hi)], "precision": float(correct[m].mean()), "count": int(m.sum())}
        for lo, hi in zip(edges[:-1], edges[1:])
        if (m := (sel.ranks >= lo) & (sel.ranks < hi)).any()
    ]
  selection.write_selection(ctx.dir / "dhat", sel, extra_summary=info)
  table = selection.write_table(ctx.dir / "dhat.parquet", sel, unl, ctx.data.class_names)
  ctx.log(f"D^ as a table (one row per selection: key, url, class, score, rank): {table}")
  ctx.log(
      f"D^ has {info['num_selected']} rows ({info['num_unique_images']} images), "
      f"{len(short)} classes short of K={cfg.select.k}"
      + (f", label precision {info['label_precision']:.4f}" if "label_precision" in info else "")
  )
  return info


def _collapsed(ctx, acc, k: int, p: int, unl) -> tuple[selection.Selection, dict]:
  """D̂ of ``k`` distinct images per class (:mod:`bssl.stages.dhat_dedup`): the exact top
  K' = ``candidates_per_class(k)`` candidates per class (ranks < ``p``), their
  near-duplicate families found and collapsed to the best-ranked member, the first ``k``
  kept; the dropped ones listed in ``near_duplicates.parquet``."""
  kc = selection.candidates_per_class(k)
  if acc.k < kc or (isinstance(acc, selection.TopKPerClass) and acc.k != kc):
    raise scoring.IncompleteScoringError(
        f"the score stage kept {acc.k} candidates per class, a D̂ of {k} distinct images "
        f"needs {kc} (select.near_duplicates=collapse); delete {ctx.wd.stage('score')} to "
        f"rescore"
    )
  balanced = not isinstance(acc, selection.GlobalTopK)
  cands = acc.result() if isinstance(acc, selection.TopKPerClass) else acc.result(kc, p)
  ctx.log(
      f"near-duplicates within U: {len(cands)} candidates (the top {kc} per class"
      + ("" if balanced else f", the global top {kc * acc.num_classes} pairs")
      + f" of ranks < {p}) read back and matched, class by class, for a D^ of K={k} "
      f"distinct images per class"
  )
  pairs, sims = dhat_dedup.find(ctx, cands, ctx.dir / "near_duplicates")
  col = selection.collapse_near_duplicates(cands, pairs, k, balanced=balanced, seed=acc.seed)
  table = dhat_dedup.write_table(
      ctx.dir / "near_duplicates.parquet", col, cands, sims, unl, ctx.data.class_names
  )
  info = dhat_dedup.summary(col, cands, kc, len(pairs))
  ctx.log(
      f"near-duplicates within U collapsed in D^: {info['num_dropped']} candidates left out "
      f"(a better-ranked member of their family selected; {info['num_families_collapsed']} "
      f"families), {len(info['classes_short'])} classes short of K for it; listed in {table}"
  )
  return col.selection, {"near_duplicates": info}
