"""The transfer stage (the paper's CUB-2011 table): each trained model (baseline, teacher,
student) on a target data set, fc-only (frozen features + L2 logistic regression, the
penalty chosen on a validation split of the target's train set) and full fine-tuning
(every layer, a new head). Test accuracy of the target's test split."""

from __future__ import annotations

from bssl.config import TRANSFER_MODELS
from bssl.data import targets

STAGE_OF = {"baseline": "baseline", "teacher": "teacher", "student": "finetune"}


def reads(cfg) -> tuple[str, ...]:
  return tuple(STAGE_OF[m] for m in str(cfg.transfer.models).split(",") if m in TRANSFER_MODELS)


def transfer(ctx) -> dict:
  t = ctx.cfg.transfer
  target = targets.build(ctx.cfg)
  modes = [m for m in str(t.modes).split(",") if m]
  ctx.log(
      f"target {target.name}: {len(target.train)} train, {len(target.val)} validation, "
      f"{len(target.test)} test images, {target.num_classes} classes; modes "
      f"{', '.join(modes)}"
  )
  out, measured = {"target": target.name, "num_classes": target.num_classes}, {}
  for key in str(t.models).split(","):
    stage = STAGE_OF[key]
    source = ctx.variables_stage(stage)
    if source in measured:  # the teacher that is the baseline
      out[key] = dict(out[measured[source]], same_as=measured[source])
      ctx.log(f"{key}: same variables as {measured[source]}")
      continue
    res = {}
    for mode in modes:
      res[mode] = ctx.backend.transfer(ctx, stage, key, mode, target)
      ctx.log(f"{key} {mode}: target test top-1 {res[mode]['top1']:.4f}")
    out[key] = res
    measured[source] = key
  return out
