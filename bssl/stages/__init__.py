"""The recipe as a table: each stage, the stages whose outputs it reads, and the function
that makes it. What a stage's result depends on in the config and in input files is not
declared here: :mod:`bssl.engine` records it while the stage runs (:mod:`bssl.deps`).
Adding a stage is adding one entry.
"""

from __future__ import annotations

import dataclasses
import functools

from bssl.config import ROUND_STAGES, round_stage
from bssl.stages import evaluate, report, score_select, training, transfer
from bssl.stages.base import Stage


def _teacher_reads(cfg) -> tuple[str, ...]:
  init = cfg.teacher.init_from
  return (init,) if init in ("baseline", "weak_pretrain") else ()


TABLE: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("weak_pretrain", training.weak_pretrain),
        Stage("baseline", training.baseline),
        Stage("teacher", training.teacher, reads=_teacher_reads),
        Stage(
            "score",
            score_select.score,
            reads=lambda cfg: ("teacher",),
            methods=score_select.score_methods,
        ),
        Stage(
            "select",
            score_select.select,
            reads=lambda cfg: ("score",),
            methods=score_select.select_methods,
        ),
        Stage("pretrain", training.pretrain, reads=lambda cfg: ("select",)),
        Stage("finetune", training.finetune, reads=lambda cfg: ("pretrain",)),
        Stage("transfer", transfer.transfer, reads=transfer.reads),
        Stage(
            "evaluate", evaluate.evaluate, fingerprinted=False, optional_reads=evaluate.MODEL_STAGES
        ),
        Stage(
            "report",
            report.report,
            fingerprinted=False,
            optional_reads=("score", "select", "evaluate", "transfer"),
        ),
    )
}


def _round(r: int) -> tuple[Stage, ...]:
  """Round ``r`` > 1 of self-training: round r-1's student is the teacher."""
  n = lambda base, rr=r: round_stage(base, rr)
  return (
      Stage(
          n("score"),
          functools.partial(score_select.score, teacher=n("finetune", r - 1)),
          reads=lambda cfg: (n("finetune", r - 1),),
          methods=score_select.score_methods,
      ),
      Stage(
          n("select"),
          functools.partial(score_select.select, score=n("score")),
          reads=lambda cfg: (n("score"),),
          methods=score_select.select_methods,
      ),
      Stage(
          n("pretrain"),
          functools.partial(training.pretrain, select=n("select")),
          reads=lambda cfg: (n("select"),),
      ),
      Stage(
          n("finetune"),
          functools.partial(training.finetune, pretrain=n("pretrain")),
          reads=lambda cfg: (n("pretrain"),),
      ),
  )


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
      st = dataclasses.replace(
          st,
          optional_reads=st.optional_reads
          + tuple(round_stage(b, r) for r in range(2, rounds + 1) for b in ("score", "select")),
      )
    out[name] = st
  return out


def expand(requested: tuple[str, ...], cfg) -> tuple[str, ...]:
  """Requested stage names (``--config.stages``, round 1's names) with their later rounds."""
  rounds = int(cfg.get("rounds", 1) or 1)
  out = list(requested)
  if "report" in out and "evaluate" not in out:
    # the report shows only current evaluations: evaluate measures what was replaced (and
    # keeps the rest)
    out.insert(out.index("report"), "evaluate")
  for r in range(2, rounds + 1):
    out += [round_stage(b, r) for b in ROUND_STAGES if b in requested]
  return tuple(out)
