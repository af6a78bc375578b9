"""Test top-1/top-5 of every model trained in the work directory; a model whose variables
are another's (the teacher that is the baseline) is measured once and marked so."""

from __future__ import annotations

from bssl import deps
from bssl.config import EVALUATED_MODELS, round_stage, section_of

MODELS = EVALUATED_MODELS
MODEL_STAGES = tuple(stage for _, stage in MODELS)


def models(cfg) -> list[tuple[str, str]]:
  """(result key, stage) of every model of ``cfg``: round r > 1 adds
  ``student_r<r>_pretrained`` and ``student_r<r>``."""
  out = list(MODELS)
  for r in range(2, int(cfg.get("rounds", 1) or 1) + 1):
    out += [
        (f"student_r{r}_pretrained", round_stage("pretrain", r)),
        (f"student_r{r}", round_stage("finetune", r)),
    ]
  return out


def model_stages(cfg) -> list[str]:
  return [stage for _, stage in models(cfg)]


def with_training_facts(metrics: dict, cfg, stage: str, done: dict) -> dict:
  """A model's test metrics plus what its stage's ``done.json`` says of its training."""
  m = dict(
      metrics,
      model=cfg[section_of(stage)].model,
      num_params=done.get("num_params"),
      train_steps=done.get("steps"),
      train_seconds=done.get("train_seconds"),
  )
  if "val" in done:
    m["val_top1"] = done["val"]["top1"]
  return m


def evaluate(ctx) -> dict:
  """Every trained model on the test split. Each result names the model artifact it
  measured (``artifact_id``) and keeps the record of what measuring it read: a rerun
  measures again only the models that were replaced or whose measurement would differ."""
  prev = ctx.wd.done("evaluate") or {}
  results, measured = {}, {}
  for key, stage in models(ctx.cfg):
    done = ctx.wd.done(stage)
    if done is None:
      ctx.log(f"{stage} not trained in this work directory; skipping {key}")
      continue
    source = ctx.variables_stage(stage)
    aid = done["artifact_id"]
    old = prev.get(key) or {}
    if source in measured:
      m = dict(results[measured[source]], same_as=measured[source])
    elif (
        old.get("artifact_id") == aid
        and old.get("record")
        and not deps.check_record(old["record"], ctx.cfg, ctx.data, {stage: aid}, ctx.backend.name)
    ):
      m = {k: v for k, v in old.items() if k != "same_as"}
      measured[source] = key
      ctx.log(f"{key}: measured before (artifact {aid}); kept")
    else:
      rec = deps.Recorder()
      with deps.recording(rec):
        m = ctx.backend.evaluate(ctx, stage, ctx.data.test)
      m = dict(
          m,
          record=dict(
              rec.to_dict(),
              version=deps.RECORD_VERSION,
              inputs={stage: aid},
              backend=ctx.backend.name,
          ),
      )
      measured[source] = key
    results[key] = with_training_facts(
        {
            k: v
            for k, v in m.items()
            if k in ("top1", "top5", "loss", "num_examples", "same_as", "record")
        },
        ctx.cfg,
        stage,
        done,
    )
    results[key]["artifact_id"] = aid
    ctx.log(
        f"{key}: test top-1 {m['top1']:.4f} top-5 {m['top5']:.4f}"
        + (f" (same variables as {m['same_as']})" if "same_as" in m else "")
    )
  return results


def current(wd, cfg, key: str, result: dict) -> bool:
  """Whether an evaluation ``result`` of model ``key`` measured the model now in ``wd``."""
  stage = dict(models(cfg)).get(key)
  done = wd.done(stage) if stage else None
  return done is not None and result.get("artifact_id") == done.get("artifact_id")
