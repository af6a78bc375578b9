"""What every stage is made of: its entry in the table (:class:`Stage`) and what its
function receives (:class:`Context`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from bssl import parallel
from bssl import workdir as workdir_lib
from bssl.data import weak


@dataclasses.dataclass(frozen=True)
class Stage:
  """One entry of the recipe's table."""

  name: str
  run: Callable[[Context], dict]  # makes the artifact; returns info for done.json
  reads: Callable[[Any], tuple[str, ...]] = lambda cfg: ()  # stages it needs, complete
  optional_reads: tuple[str, ...] = ()  # stages it uses when present (evaluate, report)
  fingerprinted: bool = True  # False: cheap, rerun every time (evaluate, report)
  # methods whose answers the stage keeps, with this config (bssl.deps.register_method):
  # noted in its record when it starts; a record made by another version, or by a bssl that
  # did not note them, no longer holds
  methods: Callable[[Any], tuple[str, ...]] = lambda cfg: ()


@dataclasses.dataclass
class Context:
  """What a stage function gets: the config, the work directory, the data, the backend."""

  cfg: Any
  wd: workdir_lib.Workdir
  data: Any
  backend: Any
  stage: str = ""
  # the stages whose outputs this stage opened (checked against the table's reads)
  opened: set = dataclasses.field(default_factory=set)

  @property
  def dir(self):
    return self.wd.stage(self.stage)

  def log(self, msg: str) -> None:
    if parallel.is_main_process():
      print(f"[{self.stage}] {msg}", flush=True)

  def done(self, stage: str) -> dict:
    self.opened.add(stage)
    d = self.wd.done(stage)
    if d is None:
      raise RuntimeError(f"stage {stage!r} is not complete in {self.wd}")
    return d

  def num_classes(self, stage: str) -> int:
    """Outputs of ``stage``'s model: the weak vocabulary for weak_pretrain, else classes."""
    if stage == "weak_pretrain":
      if stage != self.stage:
        self.opened.add(stage)
      done = self.wd.done(stage)  # once trained, its done.json says (no rebuild of the tags)
      if done is not None and "num_tags" in done:
        return int(done["num_tags"])
      return weak.num_tags(self.cfg, self.data)
    return int(self.cfg.data.num_classes)

  def variables_stage(self, stage: str) -> str:
    """The stage whose ``final/`` holds ``stage``'s variables (a teacher that is the
    baseline points at the baseline's)."""
    if stage == self.stage:  # the stage being made: its own final/
      return stage
    done = self.done(stage)  # an alias's target is an input of the alias: not opened here
    while (src := done.get("variables_from")) is not None:
      stage, done = src, self.wd.done(src) or {}
    return stage
