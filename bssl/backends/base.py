"""What a backend is: the contract between the stages and a framework.

The stages (:mod:`bssl.stages`) are written once; how a stage trains, evaluates, scores and
transfers is the backend's. A backend is built once per run from the config it reads
(``Backend(cfg, **options)``; the engine passes a :class:`bssl.deps.Tracked` view, so every
field the backend reads while a stage runs enters that stage's record) and is never changed
afterwards. Its ``name`` is recorded with every stage (``started.json``, ``done.json``): a
work directory made by one backend is refused by another.

Every method receives the stage's :class:`bssl.stages.base.Context` (``ctx``: the config,
the work directory, the data, the stage being made), so a backend holds no run state of its
own beyond what its constructor derives from the config (a mesh, thread counts).

Backends: :mod:`bssl.backends.jax` (Flax over the device mesh, every process) and
:mod:`bssl.backends.torch` (PyTorch, one process, CPU; imported only when asked for, since
PyTorch is an optional dependency).
"""

from __future__ import annotations

import abc
from typing import Any, Protocol

import numpy as np

from bssl import config

# What every backend shares: each stage's seed is ``cfg.seed * 100 + stage_seed(stage)``, so
# the two backends train a stage from the same seed (their own random draws from it).
STAGE_SEED = {"baseline": 1, "teacher": 2, "pretrain": 3, "finetune": 4, "weak_pretrain": 5}


def stage_seed(stage: str) -> int:
  """The seed offset of a stage; a later round's stages get their own."""
  return STAGE_SEED[config.section_of(stage)] + 10 * (config.round_of(stage) - 1)


class Scorer(Protocol):
  """A backend's scoring step on this process's devices, what :func:`bssl.scoring.score_process`
  drives: ``dispatch`` starts a batch (uint8 [B,H,W,C], or videos' clips [B,N,T,H,W,C]) and
  returns a handle; ``fetch`` returns (classes int32 [B,P], scores f32 [B,P], finite bool
  [B]) as numpy: each image's P most probable classes, best first, with their log-odds
  (:func:`bssl.ranking.top_log_odds`), and whether its logits are all finite."""

  def dispatch(self, images: np.ndarray) -> Any:
    ...

  # optional: ``put(images)`` starts the host->device copy (called from a feeder thread,
  # ahead of ``dispatch``, which then receives what ``put`` returned)

  def fetch(self, handle: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ...


class Backend(abc.ABC):
  """How the stages train, evaluate, score and transfer in one framework.

  Subclasses set ``name`` (recorded with every stage) and take the config in their
  constructor, checking there whatever they cannot do (refused before any work)."""

  name: str

  @abc.abstractmethod
  def __init__(self, cfg, **options):
    """``cfg``: the run's config (a :class:`bssl.deps.Tracked` view from the engine);
    ``options``: the backend's own settings that are not config fields (e.g. threads)."""

  @abc.abstractmethod
  def train(self, ctx, source, init: tuple | None) -> dict:
    """Trains stage ``ctx.stage`` on ``source`` from scratch (``init`` None) or from the
    variables of ``('stage', name)`` / ``('folder', path)``; writes the trained variables
    into ``ctx.dir``; returns the stage's info for done.json (``steps``,
    ``train_seconds``, ``num_params``, ...)."""

  @abc.abstractmethod
  def evaluate(self, ctx, stage: str, source) -> dict:
    """``stage``'s model on every example of ``source`` exactly once: ``top1``, ``top5``,
    ``loss``, ``num_examples``."""

  @abc.abstractmethod
  def scorer(self, ctx, stage: str, top_p: int) -> Scorer:
    """``stage``'s model as a :class:`Scorer` of the top ``top_p`` classes."""

  @abc.abstractmethod
  def local_batch_size(self, global_batch_size: int) -> int:
    """This process's share of a global batch."""

  def transfer(self, ctx, stage: str, key: str, mode: str, target) -> dict:
    """``stage``'s model on a transfer ``target`` (``mode``: ``fc_only`` or ``full_ft``;
    :mod:`bssl.transfer`). Optional: a backend without it refuses the transfer stage."""
    raise NotImplementedError(f"the {self.name} backend has no transfer stage")
