"""Test top-1/top-5 of every model trained in the work directory; a model whose variables
are another's (the teacher that is the baseline) is measured once and marked so."""
from __future__ import annotations

from bssl.config import round_stage, section_of

MODELS = (("baseline", "baseline"), ("teacher", "teacher"),
          ("student_pretrained", "pretrain"), ("student", "finetune"))
MODEL_STAGES = tuple(stage for _, stage in MODELS)


def models(cfg) -> list[tuple[str, str]]:
  """(result key, stage) of every model of ``cfg``: round r > 1 adds
  ``student_r<r>_pretrained`` and ``student_r<r>``."""
  out = list(MODELS)
  for r in range(2, int(cfg.get("rounds", 1) or 1) + 1):
    out += [(f"student_r{r}_pretrained", round_stage("pretrain", r)),
            (f"student_r{r}", round_stage("finetune", r))]
  return out


def model_stages(cfg) -> list[str]:
  return [stage for _, stage in models(cfg)]


def with_training_facts(metrics: dict, cfg, stage: str, done: dict) -> dict:
  """A model's test metrics plus what its stage's ``done.json`` says of its training."""
  m = dict(metrics, model=cfg[section_of(stage)].model, num_params=done.get("num_params"),
           train_steps=done.get("steps"), train_seconds=done.get("train_seconds"))
  if "val" in done:
    m["val_top1"] = done["val"]["top1"]
  return m


def evaluate(ctx) -> dict:
  results, measured = {}, {}
  for key, stage in models(ctx.cfg):
    done = ctx.wd.done(stage)
    if done is None:
      ctx.log(f"{stage} not trained in this work directory; skipping {key}")
      continue
    source = ctx.variables_stage(stage)
    if source in measured:
      m = dict(results[measured[source]], same_as=measured[source])
    else:
      m = ctx.backend.evaluate(ctx, stage, ctx.data.test)
      measured[source] = key
    results[key] = with_training_facts(
        {k: v for k, v in m.items() if k in ("top1", "top5", "loss", "num_examples", "same_as")},
        ctx.cfg, stage, done)
    ctx.log(f"{key}: test top-1 {m['top1']:.4f} top-5 {m['top5']:.4f}"
            + (f" (same variables as {m['same_as']})" if "same_as" in m else ""))
  return results
