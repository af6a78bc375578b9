"""The PyTorch backend (:class:`bssl.backends.base.Backend`): the recipe's training,
evaluation and scoring steps in PyTorch, for the side-by-side comparison with the JAX
implementation (``python -m bssl.compare``). Imported only when asked for
(:func:`bssl.backends.create`), since PyTorch is an optional dependency.

Everything that defines the experiment is shared with the JAX code rather than
re-implemented: the data splits (:func:`bssl.data.recipe.build_data`), the grain pipelines
(:mod:`bssl.data.pipelines`: the same seed gives the same numpy batches, augmentations
included), the stage seeds (``seed * 100 + stage``, :data:`bssl.backends.base.STAGE_SEED`), the
learning-rate values (:func:`bssl.train.make_schedule`, evaluated once per step), the
selection (:class:`bssl.selection.TopKPerClass`) and the model layout
(:func:`bssl.backends.torch_models.create_torch_model`, torchvision's names). What is PyTorch:
the model, the optimizer (``torch.optim.SGD``), the loss, the BatchNorm statistics, the
forward/backward passes.

The recipe, term by term as in :mod:`bssl.train`:

* SGD with momentum (optionally Nesterov); weight decay on conv and linear weights only
  (tensors with more than one dimension; not BatchNorm scales/biases nor biases), added
  to the gradient before the momentum, which is what both ``torch.optim.SGD`` and the
  optax chain ``add_decayed_weights -> sgd`` do.
* Learning rate of step ``i`` (0-based) = ``make_schedule(cfg, steps, base_lr)(i)`` (linear
  warm-up then cosine / step / constant), set on the optimizer before step ``i``.
* Cross-entropy with label smoothing ``a``: targets ``(1 - a) onehot + a / C``.
* BatchNorm: momentum 0.1 in PyTorch's convention (= Flax's 0.9), epsilon 1e-5, batch
  statistics over the whole batch (``bn_mode='per_device'`` is the same thing on one
  device). One known difference: PyTorch's running variance uses the unbiased batch
  variance, Flax's the biased one (a factor ``n / (n - 1)``, ``n`` = batch x H x W per
  channel: below 0.2% here); training-mode normalisation is identical.
* Initialisation with the same distributions as the Flax models: convolutions
  He-normal (fan-out), BatchNorm scale 1 / bias 0, the classifier LeCun-normal
  (truncated) with zero bias (``nn.Linear``'s default differs, so it is re-initialised).
  The random draws are PyTorch's own (``torch.manual_seed(stage seed)``).
* Inputs: uint8 NHWC batches from grain, normalised with the config's mean/std, fed as
  NCHW in ``channels_last`` memory format (a free view of NHWC, and faster on CPU).

:class:`TorchBackend` is the engine's backend for this lane: the stages, their
bookkeeping (done.json, fingerprints, refusal) and the report are the engine's own
(:mod:`bssl.engine`, :mod:`bssl.stages`); only how a stage trains, evaluates and scores
is PyTorch. Trained stages write ``<workdir>/<stage>/model.pt``.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bssl import config, progress, storage
from bssl import train as jax_train
from bssl.backends import base
from bssl.backends.base import stage_seed
from bssl.backends.torch_models import create_torch_model
from bssl.data import pipelines

# ----------------------------------------------------------------------------- model


def init_like_flax(model: nn.Module) -> nn.Module:
  """Re-initialises the classifier as Flax's ``nn.Dense`` default (LeCun-normal,
  truncated at 2 std, zero bias); convolutions and BatchNorms already match."""
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Linear):
        fan_in = m.weight.shape[1]
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # jax's truncated-normal scale
        nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
        if m.bias is not None:
          nn.init.zeros_(m.bias)
  return model


def make_model(
    scfg, num_classes: int, in_channels: int, seed: int | None = None, channels_last: bool = True
) -> nn.Module:
  """The PyTorch twin of ``bssl.backends.jax.make_model(scfg, num_classes)``."""
  if seed is not None:
    torch.manual_seed(seed)
  model = create_torch_model(
      scfg.model, num_classes, in_channels=in_channels, **dict(scfg.get("model_kwargs") or {})
  )
  init_like_flax(model)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  return model


def to_input(images: np.ndarray, mean, std, channels_last: bool = True) -> torch.Tensor:
  """uint8 [B,H,W,C] numpy -> normalised float32 [B,C,H,W] (channels_last strides)."""
  x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
  x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
  x = x.permute(0, 3, 1, 2)  # a view: NCHW shape, NHWC memory (= channels_last)
  return x if channels_last else x.contiguous()


# ----------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
  """Decay on weights with more than one dimension (conv kernels, the fc matrix), as
  ``bssl.train._decay_mask``; none on BatchNorm scales/biases or biases."""
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  return [
      {"params": decay, "weight_decay": float(weight_decay)},
      {"params": no_decay, "weight_decay": 0.0},
  ]


def make_optimizer(model: nn.Module, scfg) -> torch.optim.SGD:
  momentum = float(scfg.get("momentum", 0.9))
  return torch.optim.SGD(
      param_groups(model, scfg.get("weight_decay", 1e-4)),
      lr=0.0,
      momentum=momentum,
      nesterov=bool(scfg.get("nesterov", False)),
  )


def lr_values(scfg, total_steps: int, batch_size: int) -> np.ndarray:
  """The learning rate of every step, from the JAX code's own schedule (float32 values,
  as the JAX optimizer sees them)."""
  base_lr = jax_train.learning_rate(scfg, batch_size)
  schedule = jax_train.make_schedule(scfg, total_steps, base_lr)
  if total_steps == 0:
    return np.zeros(0, np.float64)
  vals = jax.jit(jax.vmap(schedule))(jnp.arange(total_steps, dtype=jnp.int32))
  return np.asarray(vals, np.float32).astype(np.float64)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
  return F.cross_entropy(logits, labels, label_smoothing=float(label_smoothing))


def grad_norm(model: nn.Module) -> float:
  grads = [p.grad for p in model.parameters() if p.grad is not None]
  if not grads:
    return 0.0
  return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    label_smoothing: float = 0.0,
    with_grad_norm: bool = True,
) -> dict:
  """One SGD step at learning rate ``lr``; returns loss, top-1 and the gradient norm
  (of the loss gradient, before weight decay, as bssl.train reports it)."""
  model.train()
  for g in opt.param_groups:
    g["lr"] = float(lr)
  opt.zero_grad(set_to_none=True)
  logits = model(images)
  loss = loss_fn(logits, labels, label_smoothing)
  loss.backward()
  gn = grad_norm(model) if with_grad_norm else float("nan")
  opt.step()
  with torch.no_grad():
    top1 = (logits.argmax(-1) == labels).float().mean()
  return {"loss": float(loss.detach()), "top1": float(top1), "grad_norm": gn, "lr": float(lr)}


# ----------------------------------------------------------------------------- loops


def _print(name: str) -> Callable[[str], None]:
  return lambda msg: print(f"[torch {name}] {msg}", flush=True)


def fit(
    *,
    name: str,
    model: nn.Module,
    scfg,
    source,
    spec: pipelines.ImageSpec,
    num_classes: int,
    mean,
    std,
    seed: int,
    num_threads: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict:
  """Trains ``model`` in place on the same batches as ``bssl.train.fit`` with the same
  ``seed`` would see (``pipelines.train_dataset``, one process)."""
  del num_classes
  log = log or _print(name)
  total = int(scfg.steps)
  gbs = int(scfg.batch_size)
  lrs = lr_values(scfg, total, gbs)
  opt = make_optimizer(model, scfg)
  smoothing = float(scfg.get("label_smoothing", 0.0))
  autocast = scfg.get("dtype", "float32") == "bfloat16"
  ds = pipelines.train_dataset(
      source, spec, local_batch_size=gbs, seed=seed, num_threads=num_threads
  )
  it = iter(ds)
  log_every = max(1, int(scfg.get("log_every", 50)))
  log(
      f"{total} steps, batch {gbs}, base lr {jax_train.learning_rate(scfg, gbs):g}, "
      f"{len(source)} examples, {torch.get_num_threads()} threads"
  )
  t_start = t_last = time.time()
  pending: list[dict] = []
  last: dict = {}
  for step in range(total):
    batch = next(it)
    x = to_input(batch["image"], mean, std)
    y = torch.from_numpy(np.asarray(batch["label"], np.int64))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      m = train_step(
          model,
          opt,
          x,
          y,
          lrs[step],
          smoothing,
          with_grad_norm=(step + 1) % log_every == 0 or step + 1 == total,
      )
    if not math.isfinite(m["loss"]):
      raise jax_train.NonFiniteLossError(
          f"[torch {name}] loss is {m['loss']} at step " f"{step + 1}; stopping"
      )
    pending.append(m)
    if (step + 1) % log_every == 0 or step + 1 == total:
      now = time.time()
      rate = len(pending) * gbs / max(now - t_last, 1e-9)
      last = {k: float(np.mean([p[k] for p in pending])) for k in ("loss", "top1", "lr")}
      last.update(grad_norm=m["grad_norm"], images_per_s=rate)
      eta = (total - step - 1) * gbs / max(rate, 1e-9)
      log(
          f"step {step + 1}/{total} loss {last['loss']:.4f} top1 {last['top1']:.3f} "
          f"lr {last['lr']:.4g} |g| {m['grad_norm']:.3g} {rate:.0f} img/s "
          f"eta {progress.format_duration(eta)}"
      )
      pending, t_last = [], now
  return {"steps": total, "train_seconds": time.time() - t_start, "last_train_metrics": last}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    source,
    spec: pipelines.ImageSpec,
    *,
    num_classes: int,
    mean,
    std,
    batch_size: int,
    num_threads: int = 1,
) -> dict:
  """top1/top5/loss over every example of ``source`` exactly once (same padded and
  masked batches as ``bssl.evaluation.evaluate``)."""
  model.eval()
  k5 = min(5, num_classes)
  c1 = c5 = loss_sum = n = 0.0
  for batch in pipelines.eval_dataset(
      source, spec, local_batch_size=batch_size, num_threads=num_threads
  ):
    mask = torch.from_numpy(np.asarray(batch["mask"], bool))
    if not bool(mask.any()):
      continue
    logits = model(to_input(batch["image"], mean, std)).float()[mask]
    labels = torch.from_numpy(np.asarray(batch["label"], np.int64))[mask]
    top5 = logits.topk(k5, dim=-1).indices
    c5 += float((top5 == labels[:, None]).any(-1).sum())
    c1 += float((top5[:, 0] == labels).sum())
    loss_sum += float(F.cross_entropy(logits, labels.clamp_min(0), reduction="sum"))
    n += float(mask.sum())
  if int(round(n)) != len(source):
    raise AssertionError(f"evaluation counted {n} examples, expected {len(source)}")
  return {"top1": c1 / n, "top5": c5 / n, "loss": loss_sum / n, "num_examples": int(n)}


# ----------------------------------------------------------------------------- the engine's backend


def check_config(cfg) -> None:
  """What the PyTorch lane cannot do, refused before any work."""
  if config.is_video(cfg):
    raise config.ConfigError(
        f"data.kind={cfg.data.kind!r}: the PyTorch lane trains image models; the video "
        f"recipe runs on the JAX backend (PyTorch interop for video: python -m bssl.convert "
        f"--model=r2plus1d_18, checked against a PyTorch twin in tests/unit/test_video.py)"
    )
  if "weak_pretrain" in config.parse_stages(cfg.stages):
    raise config.ConfigError(
        "stages: the PyTorch lane has no weak_pretrain stage (the "
        "semi-weak recipe runs on the JAX backend)"
    )
  for stage in config.TRAIN_SECTIONS:
    init = cfg[stage].get("init_from")
    if init is not None and not (stage == "teacher" and init == "baseline"):
      raise config.ConfigError(
          f"{stage}.init_from={init!r}: the PyTorch lane trains every stage itself; only the "
          f"teacher may start from its own baseline ('baseline'), not from a folder of JAX "
          f"variables"
      )


class TorchBackend(base.Backend):
  """The engine's PyTorch backend (one process, CPU): the same stages, data, batches and
  schedules as :class:`bssl.backends.jax.JaxBackend`; variables in ``<stage>/model.pt``.
  ``threads``: PyTorch's intra-op threads (``torch.set_num_threads``), when given."""

  name = "torch"

  def __init__(self, cfg, threads: int | None = None):
    check_config(cfg)
    if threads:
      torch.set_num_threads(int(threads))
    self.cfg = cfg
    self.norm = tuple(cfg.data.mean), tuple(cfg.data.std)

  def _model(self, stage: str, seed: int | None = None) -> nn.Module:
    return make_model(
        self.cfg[config.section_of(stage)],
        self.cfg.data.num_classes,
        self.cfg.data.channels,
        seed=seed,
    )

  def load(self, ctx, stage: str) -> nn.Module:
    model = self._model(stage)
    path = ctx.wd.stage(ctx.variables_stage(stage)) / "model.pt"
    with path.open("rb") as f:
      model.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
    return model

  def train(self, ctx, source, init: tuple | None) -> dict:
    cfg, stage = self.cfg, ctx.stage
    scfg = cfg[config.section_of(stage)].copy_and_resolve_references()
    scfg.steps = config.resolve_steps(scfg, len(source))
    seed = cfg.seed * 100 + stage_seed(stage)
    model = self._model(stage, seed=seed)
    if init is not None:
      model.load_state_dict(self.load(ctx, init[1]).state_dict())
    out = {"steps": 0, "train_seconds": 0.0}
    if scfg.steps:
      mean, std = self.norm
      out = fit(
          name=stage,
          model=model,
          scfg=scfg,
          source=source,
          spec=ctx.data.spec,
          num_classes=cfg.data.num_classes,
          mean=mean,
          std=std,
          seed=seed,
          num_threads=cfg.num_threads,
          log=_print(stage),
      )
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes(ctx.dir / "model.pt", buf.getvalue())
    out["num_params"] = sum(p.numel() for p in model.parameters())
    return out

  def evaluate(self, ctx, stage: str, source) -> dict:
    mean, std = self.norm
    return evaluate(
        self.load(ctx, stage),
        source,
        ctx.data.spec,
        num_classes=self.cfg.data.num_classes,
        mean=mean,
        std=std,
        batch_size=self.cfg.data.eval_batch_size,
        num_threads=self.cfg.num_threads,
    )

  def scorer(self, ctx, stage: str, top_p: int):
    return _TorchScorer(self.load(ctx, stage), top_p, *self.norm)

  def local_batch_size(self, global_batch_size: int) -> int:
    return global_batch_size


def top_log_odds(logits: torch.Tensor, p: int):
  """:func:`bssl.ranking.top_log_odds` in PyTorch, the same formula step for step (so
  ``python -m bssl.compare`` compares like with like): logits [B, C] -> (classes [B, P],
  log-odds ``z_c - logsumexp_{j != c} z_j`` [B, P], finite [B]), classes the ``p`` largest
  logits, best first. The argmax's sum over the other classes is taken directly, relative to
  the second largest logit (``S - 1`` would cancel once the margin passes ~17)."""
  z = logits.float()
  finite = torch.isfinite(z).all(-1)
  classes = z.topk(p, dim=-1).indices
  if z.shape[-1] == 1:
    return classes, torch.full(classes.shape, float("inf")), finite
  top2, idx2 = z.topk(2, dim=-1)
  m1, m2, i1 = top2[:, :1], top2[:, 1:], idx2[:, :1]
  s = torch.exp(z - m1).sum(-1, keepdim=True)
  iota = torch.arange(z.shape[-1]).expand_as(z)
  rest_top = torch.where(iota == i1, 0.0, torch.exp(z - m2)).sum(-1, keepdim=True)
  zc = z.gather(-1, classes)
  rest = torch.clamp(s - torch.exp(zc - m1), min=1.0)
  excl = torch.where(classes == i1, m2 + torch.log(rest_top), m1 + torch.log(rest))
  return classes, zc - excl, finite


class _TorchScorer:
  """A :class:`bssl.backends.base.Scorer`: top-P classes and their log-odds (the ranking
  score, :mod:`bssl.ranking`)."""

  def __init__(self, model: nn.Module, top_p: int, mean, std):
    self.model, self.top_p, self.mean, self.std = model.eval(), top_p, mean, std

  @torch.inference_mode()
  def dispatch(self, images: np.ndarray):
    logits = self.model(to_input(images, self.mean, self.std))
    c, s, finite = top_log_odds(logits, self.top_p)
    return c.numpy().astype(np.int32), s.numpy(), finite.numpy()

  def fetch(self, out):
    return out
