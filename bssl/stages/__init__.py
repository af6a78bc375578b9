"""The recipe as a table: each stage, the config its artifact depends on, the stages it
reads, and the function that makes it. :mod:`bssl.engine` derives skip / resume /
refuse-on-change from this table; adding a stage is adding one entry.
"""
from __future__ import annotations

import dataclasses
import functools

from bssl.config import ROUND_STAGES, round_stage, score_sections
from bssl.stages import evaluate, report, score_select, training, transfer
from bssl.stages.base import Stage


def _teacher_reads(cfg) -> tuple[str, ...]:
  init = cfg.teacher.init_from
  return (init,) if init in ("baseline", "weak_pretrain") else ()


TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("weak_pretrain", training.weak_pretrain, sections=("weak", "weak_pretrain")),
    Stage("baseline", training.baseline, sections=("baseline",)),
    Stage("teacher", training.teacher, sections=("teacher",), reads=_teacher_reads),
    Stage("score", score_select.score, sections=score_sections,
          reads=lambda cfg: ("teacher",)),
    Stage("select", score_select.select, sections=("unlabelled", "select"),
          reads=lambda cfg: ("score",)),
    Stage("pretrain", training.pretrain, sections=("unlabelled", "pretrain"),
          reads=lambda cfg: ("select",)),
    Stage("finetune", training.finetune, sections=("finetune",),
          reads=lambda cfg: ("pretrain",)),
    Stage("transfer", transfer.transfer, sections=("transfer",), reads=transfer.reads),
    Stage("evaluate", evaluate.evaluate, fingerprinted=False,
          optional_reads=evaluate.MODEL_STAGES),
    Stage("report", report.report, fingerprinted=False,
          optional_reads=("score", "select", "evaluate", "transfer")),
)}


def _round(r: int) -> tuple[Stage, ...]:
  """Round ``r`` > 1 of self-training: round r-1's student is the teacher."""
  n = lambda base, rr=r: round_stage(base, rr)  # noqa: E731
  return (
      Stage(n("score"), functools.partial(score_select.score, teacher=n("finetune", r - 1)),
            sections=TABLE["score"].sections, reads=lambda cfg: (n("finetune", r - 1),)),
      Stage(n("select"), functools.partial(score_select.select, score=n("score")),
            sections=TABLE["select"].sections, reads=lambda cfg: (n("score"),)),
      Stage(n("pretrain"), functools.partial(training.pretrain, select=n("select")),
            sections=TABLE["pretrain"].sections, reads=lambda cfg: (n("select"),)),
      Stage(n("finetune"), functools.partial(training.finetune, pretrain=n("pretrain")),
            sections=TABLE["finetune"].sections, reads=lambda cfg: (n("pretrain"),)))


def table(cfg) -> dict[str, Stage]:
  """The stage table of ``cfg``: :data:`TABLE`, with the stages of rounds 2..``rounds``
  after round 1's fine-tuning (evaluate and report read every round's models)."""
  rounds = int(cfg.get("rounds", 1) or 1)
  if rounds == 1:
    return TABLE
  out = {}
  for name, st in TABLE.items():
    if name == "transfer":
      for r in range(2, rounds + 1):
        out.update({s.name: s for s in _round(r)})
      out[name] = st
      continue
    if name == "evaluate":
      st = dataclasses.replace(st, optional_reads=tuple(evaluate.model_stages(cfg)))
    elif name == "report":
      st = dataclasses.replace(st, optional_reads=st.optional_reads + tuple(
          round_stage(b, r) for r in range(2, rounds + 1) for b in ("score", "select")))
    out[name] = st
  return out


def expand(requested: tuple[str, ...], cfg) -> tuple[str, ...]:
  """Requested stage names (``--config.stages``, round 1's names) with their later rounds."""
  rounds = int(cfg.get("rounds", 1) or 1)
  out = list(requested)
  for r in range(2, rounds + 1):
    out += [round_stage(b, r) for b in ROUND_STAGES if b in requested]
  return tuple(out)
