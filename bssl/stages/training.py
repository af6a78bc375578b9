"""The training stages: baseline and teacher on D, the student's pre-training on D̂ and its
fine-tuning on D. Each trains through the backend, then measures the model on the
validation split (never the test split) for the record."""

from __future__ import annotations

import numpy as np

from bssl import selection
from bssl.data import sources, weak


def _init(scfg) -> tuple | None:
  if not scfg.init_from:
    return None
  return (
      ("stage", scfg.init_from)
      if scfg.init_from in ("baseline", "weak_pretrain")
      else ("folder", scfg.init_from)
  )


def _train(ctx, source, init) -> dict:
  info = ctx.backend.train(ctx, source, init)
  info["num_train_examples"] = len(source)
  if ctx.data.val is not None and ctx.stage != "weak_pretrain":
    info["val"] = ctx.backend.evaluate(ctx, ctx.stage, ctx.data.val)
    ctx.log(f"validation top-1 {info['val']['top1']:.4f} top-5 {info['val']['top5']:.4f}")
  return info


def baseline(ctx) -> dict:
  return _train(ctx, ctx.data.labelled, _init(ctx.cfg.baseline))


def teacher(ctx) -> dict:
  t = ctx.cfg.teacher
  if t.init_from == "baseline" and t.steps == 0:
    # Self-training at no cost: the teacher *is* the baseline; its artifact points there.
    b = ctx.done("baseline")
    ctx.log("the teacher is the baseline (teacher.init_from='baseline', steps=0)")
    return {
        "variables_from": "baseline",
        "steps": 0,
        "train_seconds": 0.0,
        "num_params": b.get("num_params"),
        "num_train_examples": len(ctx.data.labelled),
        **({"val": b["val"]} if "val" in b else {}),
    }
  return _train(ctx, ctx.data.labelled, _init(t))


def pseudo_labelled(ctx, select: str = "select") -> sources.PseudoLabelSource:
  ctx.opened.add(select)
  sel = selection.read_selection(ctx.wd.stage(select) / "dhat")
  return sources.PseudoLabelSource(
      ctx.data.unlabelled, np.asarray(sel.ids), np.asarray(sel.classes)
  )


def pretrain(ctx, select: str = "select") -> dict:
  """The student's pre-training on D̂ (of ``select``: a later round's selection)."""
  return _train(ctx, pseudo_labelled(ctx, select), _init(ctx.cfg.pretrain))


def finetune(ctx, pretrain: str = "pretrain") -> dict:
  return _train(ctx, ctx.data.labelled, ("stage", pretrain))


def weak_pretrain(ctx) -> dict:
  """The teacher's weakly supervised pre-training on tagged images (bssl/data/weak.py):
  softmax cross-entropy against each image's tags at 1/k each (``weak_pretrain.
  label_smoothing`` s mixes that distribution with the uniform one over the tags: (1-s)/k
  on each tag + s/num_tags everywhere, :func:`bssl.train.cross_entropy`), images resampled by tag
  frequency; the teacher stage then fine-tunes it on D with a new head."""
  w = weak.build(ctx.cfg, ctx.data)
  ctx.log(
      f"{w.num_images} tagged images, {w.num_tags} tags (resampling "
      f"{ctx.cfg.weak.resample}: {len(w.source)} draws); tags per image "
      f"{(w.source.tags >= 0).sum(1).mean():.2f} on average"
  )
  info = _train(ctx, w.source, _init(ctx.cfg.weak_pretrain))
  info.update(
      num_tags=w.num_tags, num_tagged_images=w.num_images, resample=str(ctx.cfg.weak.resample)
  )
  return info
