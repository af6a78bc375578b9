"""The recipe as a table: each stage, the config its artifact depends on, the stages it
reads, and the function that makes it. :mod:`bssl.engine` derives skip / resume /
refuse-on-change from this table; adding a stage is adding one entry.
"""
from __future__ import annotations

from bssl.stages import evaluate, report, score_select, training
from bssl.stages.base import Stage


def _teacher_reads(cfg) -> tuple[str, ...]:
  init = cfg.teacher.init_from
  return (init,) if init in ("baseline", "weak_pretrain") else ()


TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("weak_pretrain", training.weak_pretrain, sections=("weak", "weak_pretrain")),
    Stage("baseline", training.baseline, sections=("baseline",)),
    Stage("teacher", training.teacher, sections=("teacher",), reads=_teacher_reads),
    Stage("score", score_select.score, sections=("unlabelled", "select.k", "select.p"),
          reads=lambda cfg: ("teacher",)),
    Stage("select", score_select.select, sections=("unlabelled", "select"),
          reads=lambda cfg: ("score",)),
    Stage("pretrain", training.pretrain, sections=("unlabelled", "pretrain"),
          reads=lambda cfg: ("select",)),
    Stage("finetune", training.finetune, sections=("finetune",),
          reads=lambda cfg: ("pretrain",)),
    Stage("evaluate", evaluate.evaluate, fingerprinted=False,
          optional_reads=evaluate.MODEL_STAGES),
    Stage("report", report.report, fingerprinted=False,
          optional_reads=("score", "select", "evaluate")),
)}
