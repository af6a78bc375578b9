"""The recipe's training, evaluation and scoring steps in PyTorch, for the side-by-side
comparison with the JAX implementation (``python -m bssl.compare``).

Everything that defines the experiment is shared with the JAX code rather than
re-implemented: the data splits (:func:`bssl.pipeline.build_data`), the grain pipelines
(:mod:`bssl.data.pipelines`: the same seed gives the same numpy batches, augmentations
included), the stage seeds (``seed * 100 + stage``, as in :mod:`bssl.pipeline`), the
learning-rate values (:func:`bssl.train.make_schedule`, evaluated once per step), the
selection (:class:`bssl.selection.TopKPerClass`) and the model layout
(:func:`bssl.torch_models.create_torch_model`, torchvision's names). What is PyTorch:
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

Each stage of :func:`run` writes ``<workdir>/<stage>/done.json`` (plus ``model.pt`` for
trained stages, ``select/dhat`` for the selection), so an interrupted comparison
resumes at the first incomplete stage; ``<workdir>/results.json`` has the shape of the
JAX pipeline's ``report/results.json`` (keys baseline, teacher, student_pretrained,
student, selection).
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bssl import config_lib, jsonio, selection
from bssl import train as jax_train
from bssl.data import pipelines, sources
from bssl.torch_models import create_torch_model

STAGE_SEED = {"baseline": 1, "teacher": 2, "pretrain": 3, "finetune": 4}  # as bssl.pipeline
EVAL_KEYS = (("baseline", "baseline"), ("teacher", "teacher"),
             ("student_pretrained", "pretrain"), ("student", "finetune"))


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


def make_model(scfg, num_classes: int, in_channels: int, seed: int | None = None,
               channels_last: bool = True) -> nn.Module:
  """The PyTorch twin of ``bssl.pipeline.make_model(scfg, num_classes)``."""
  if seed is not None:
    torch.manual_seed(seed)
  model = create_torch_model(scfg.model, num_classes, in_channels=in_channels,
                             **dict(scfg.get("model_kwargs") or {}))
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
  return [{"params": decay, "weight_decay": float(weight_decay)},
          {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, scfg) -> torch.optim.SGD:
  momentum = float(scfg.get("momentum", 0.9))
  return torch.optim.SGD(param_groups(model, scfg.get("weight_decay", 1e-4)), lr=0.0,
                         momentum=momentum, nesterov=bool(scfg.get("nesterov", False)))


def lr_values(scfg, total_steps: int, batch_size: int) -> np.ndarray:
  """The learning rate of every step, from the JAX code's own schedule (float32 values,
  as the JAX optimizer sees them)."""
  import jax
  import jax.numpy as jnp
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
  return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                     for g in grads])))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, lr: float, label_smoothing: float = 0.0,
               with_grad_norm: bool = True) -> dict:
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


def fit(*, name: str, model: nn.Module, scfg, source, spec: pipelines.ImageSpec,
        num_classes: int, mean, std, seed: int, num_threads: int = 1,
        log: Callable[[str], None] | None = None) -> dict:
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
  ds = pipelines.train_dataset(source, spec, local_batch_size=gbs, seed=seed,
                               num_threads=num_threads)
  it = iter(ds)
  log_every = max(1, int(scfg.get("log_every", 50)))
  log(f"{total} steps, batch {gbs}, base lr {jax_train.learning_rate(scfg, gbs):g}, "
      f"{len(source)} examples, {torch.get_num_threads()} threads")
  t_start = t_last = time.time()
  pending: list[dict] = []
  last: dict = {}
  for step in range(total):
    batch = next(it)
    x = to_input(batch["image"], mean, std)
    y = torch.from_numpy(np.asarray(batch["label"], np.int64))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      m = train_step(model, opt, x, y, lrs[step], smoothing,
                     with_grad_norm=(step + 1) % log_every == 0 or step + 1 == total)
    if not math.isfinite(m["loss"]):
      raise jax_train.NonFiniteLossError(f"[torch {name}] loss is {m['loss']} at step "
                                         f"{step + 1}; stopping")
    pending.append(m)
    if (step + 1) % log_every == 0 or step + 1 == total:
      now = time.time()
      rate = len(pending) * gbs / max(now - t_last, 1e-9)
      last = {k: float(np.mean([p[k] for p in pending])) for k in ("loss", "top1", "lr")}
      last.update(grad_norm=m["grad_norm"], images_per_s=rate)
      eta = (total - step - 1) * gbs / max(rate, 1e-9)
      log(f"step {step + 1}/{total} loss {last['loss']:.4f} top1 {last['top1']:.3f} "
          f"lr {last['lr']:.4g} |g| {m['grad_norm']:.3g} {rate:.0f} img/s eta {eta:.0f}s")
      pending, t_last = [], now
  return {"steps": total, "train_seconds": time.time() - t_start, "last_train_metrics": last}


@torch.inference_mode()
def evaluate(model: nn.Module, source, spec: pipelines.ImageSpec, *, num_classes: int,
             mean, std, batch_size: int, num_threads: int = 1) -> dict:
  """top1/top5/loss over every example of ``source`` exactly once (same padded and
  masked batches as ``bssl.train.evaluate``)."""
  model.eval()
  k5 = min(5, num_classes)
  c1 = c5 = loss_sum = n = 0.0
  for batch in pipelines.eval_dataset(source, spec, local_batch_size=batch_size,
                                      num_threads=num_threads):
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


@torch.inference_mode()
def score(model: nn.Module, source, spec: pipelines.ImageSpec, *, num_classes: int,
          top_p: int, k: int, mean, std, batch_size: int, num_threads: int = 1,
          log: Callable[[str], None] | None = None) -> tuple[selection.TopKPerClass, dict]:
  """Softmax top-P of every image of U into a per-class top-K accumulator (what
  ``bssl.scoring.score_shard`` does on one process)."""
  model.eval()
  log = log or _print("score")
  acc = selection.TopKPerClass(num_classes, k)
  scored, bad = 0, []
  t0 = time.time()
  for batch in pipelines.eval_dataset(source, spec, local_batch_size=batch_size,
                                      num_threads=num_threads):
    ids, mask = np.asarray(batch["id"]), np.asarray(batch["mask"], bool)
    bad.extend(int(i) for i in ids[(~np.asarray(batch["valid"], bool)) & (ids >= 0)])
    if not mask.any():
      continue
    logits = model(to_input(batch["image"], mean, std)).float()
    finite = torch.isfinite(logits).all(-1).numpy()
    if np.any(mask & ~finite):
      raise FloatingPointError(f"[torch score] NaN/inf logits for image ids "
                               f"{ids[mask & ~finite][:20].tolist()}")
    probs = torch.softmax(logits, dim=-1)
    s, c = probs.topk(top_p, dim=-1)
    s, c = s.numpy()[mask], c.numpy().astype(np.int32)[mask]
    acc.update(np.repeat(ids[mask], top_p), c.reshape(-1), s.reshape(-1))
    scored += int(mask.sum())
  secs = time.time() - t0
  log(f"scored {scored} images in {secs:.1f}s ({scored / max(secs, 1e-9):.0f} img/s)")
  return acc, {"num_scored": scored, "bad_ids": bad, "seconds": secs}


# ----------------------------------------------------------------------------- the recipe


_write_json, _read_json = jsonio.write_json, jsonio.read_json


def _done(cfg, workdir: str, stage: str) -> dict | None:
  """The stage's done.json if complete with the same config; refuses a changed one (the
  JAX pipeline's rule: the fingerprint of the stage and of the stages it depends on)."""
  from bssl import pipeline
  path = os.path.join(workdir, stage, "done.json")
  if not os.path.exists(path):
    return None
  done = _read_json(path)
  changed = pipeline._fingerprint_changes(  # noqa: SLF001
      done.get("fingerprint") or {}, pipeline._stage_fingerprint(cfg, stage))  # noqa: SLF001
  if changed:
    raise config_lib.ConfigError(
        f"torch stage {stage!r} in {workdir} was produced with a different config "
        f"(changed: {'; '.join(changed)}); use a new --workdir or delete "
        f"{os.path.join(workdir, stage)} and the stages after it")
  return done


def _finish(cfg, workdir: str, stage: str, info: dict) -> dict:
  from bssl import pipeline
  info = dict(info, fingerprint=pipeline._stage_fingerprint(cfg, stage),  # noqa: SLF001
              finished=time.time())
  _write_json(os.path.join(workdir, stage, "done.json"), info)
  return info


def _model_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "model.pt")


def _load_stage_model(cfg, workdir: str, stage: str) -> nn.Module:
  model = make_model(cfg[stage], cfg.data.num_classes, cfg.data.channels)
  model.load_state_dict(torch.load(_model_path(workdir, stage), map_location="cpu",
                                   weights_only=True))
  return model


def check_config(cfg) -> None:
  """What the PyTorch lane cannot do, refused before any work."""
  for stage in config_lib.TRAIN_STAGES:
    init = cfg[stage].get("init_from")
    if init is not None and not (stage == "teacher" and init == "baseline"):
      raise config_lib.ConfigError(
          f"{stage}.init_from={init!r}: the PyTorch lane trains every stage itself; only the "
          f"teacher may start from its own baseline ('baseline'), not from a folder of JAX "
          f"variables")


def run(cfg, workdir: str, *, threads: int | None = None,
        log: Callable[[str], None] = lambda m: print(m, flush=True)) -> dict:
  """baseline, teacher, score + select, pretrain, finetune, evaluate: the whole recipe in
  PyTorch on the data of ``bssl.pipeline.build_data(cfg)``. Returns (and writes to
  ``<workdir>/results.json``) the test metrics of every model and the selection's
  statistics, in the layout of the JAX report."""
  from bssl import pipeline
  config_lib.validate(cfg)
  check_config(cfg)
  if threads:
    torch.set_num_threads(int(threads))
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  data = pipeline.build_data(cfg)
  nc, ch = cfg.data.num_classes, cfg.data.channels
  mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
  nt = cfg.num_threads
  log(f"[torch] seed {cfg.seed}: {len(data.labelled)} labelled, {len(data.unlabelled)} "
      f"unlabelled, {len(data.test)} test images; {torch.get_num_threads()} threads; "
      f"workdir {workdir}")
  timings = {}

  def train_stage(stage: str, source, init_from: str | None = None) -> None:
    if _done(cfg, workdir, stage) is not None:
      log(f"[torch {stage}] complete; skipping")
      return
    t0 = time.time()
    scfg = cfg[stage].copy_and_resolve_references()
    scfg.steps = config_lib.resolve_steps(scfg, len(source))
    model = make_model(scfg, nc, ch, seed=cfg.seed * 100 + STAGE_SEED[stage])
    if init_from is not None:
      model.load_state_dict(torch.load(_model_path(workdir, init_from), map_location="cpu",
                                       weights_only=True))
    if scfg.steps == 0:  # e.g. the teacher is the baseline itself (self-training)
      out = {"steps": 0, "train_seconds": 0.0}
    else:
      out = fit(name=stage, model=model, scfg=scfg, source=source, spec=data.spec,
                num_classes=nc, mean=mean, std=std, seed=cfg.seed * 100 + STAGE_SEED[stage],
                num_threads=nt, log=_print(stage))
    os.makedirs(os.path.join(workdir, stage), exist_ok=True)
    torch.save(model.state_dict(), _model_path(workdir, stage))
    info = dict(out, num_params=sum(p.numel() for p in model.parameters()),
                num_train_examples=len(source))
    if data.val is not None:
      info["val"] = evaluate(model, data.val, data.spec, num_classes=nc, mean=mean, std=std,
                             batch_size=cfg.data.eval_batch_size, num_threads=nt)
      log(f"[torch {stage}] validation top-1 {info['val']['top1']:.4f} "
          f"top-5 {info['val']['top5']:.4f}")
    _finish(cfg, workdir, stage, info)
    timings[stage] = time.time() - t0

  train_stage("baseline", data.labelled)
  train_stage("teacher", data.labelled, init_from=cfg.teacher.get("init_from"))

  # score + select
  if _done(cfg, workdir, "select") is None:
    t0 = time.time()
    teacher = _load_stage_model(cfg, workdir, "teacher")
    acc, stats = score(teacher, data.unlabelled, data.spec, num_classes=nc, top_p=cfg.select.p,
                       k=cfg.select.k, mean=mean, std=std, batch_size=cfg.score.batch_size,
                       num_threads=nt, log=_print("score"))
    sel = acc.result()
    counts = sel.counts()
    info = {"k": int(cfg.select.k), "p": int(cfg.select.p), "num_selected": int(len(sel.ids)),
            "num_unique_images": int(len(np.unique(sel.ids))),
            "num_scored": stats["num_scored"], "num_bad_images": len(stats["bad_ids"]),
            "classes_short_of_k": [int(c) for c in np.flatnonzero(counts < cfg.select.k)],
            "min_per_class": int(counts.min()), "max_per_class": int(counts.max()),
            "score_seconds": stats["seconds"]}
    if data.unlabelled_true_labels is not None and len(sel.ids):
      info["label_precision"] = float(np.mean(data.unlabelled_true_labels[sel.ids]
                                              == sel.classes))
    dhat = os.path.join(workdir, "select", "dhat")
    if os.path.exists(dhat):  # a half-finished earlier attempt
      import shutil
      shutil.rmtree(dhat)
    selection.write_selection(dhat, sel, extra_summary=info)
    _finish(cfg, workdir, "select", info)
    timings["select"] = time.time() - t0
    log(f"[torch select] D^ has {info['num_selected']} rows"
        + (f", label precision {info['label_precision']:.4f}" if "label_precision" in info
           else ""))
  else:
    log("[torch select] complete; skipping")

  sel = selection.read_selection(os.path.join(workdir, "select", "dhat"))
  dhat_source = sources.PseudoLabelSource(data.unlabelled, np.asarray(sel.ids),
                                          np.asarray(sel.classes))
  train_stage("pretrain", dhat_source)
  train_stage("finetune", data.labelled, init_from="pretrain")

  # evaluate on the test split (kept from an earlier call when nothing was retrained)
  res_path = os.path.join(workdir, "results.json")
  if not timings and os.path.exists(res_path):
    log("[torch evaluate] complete; skipping")
    return _read_json(res_path)
  results: dict = {"name": cfg.get("name", ""), "seed": int(cfg.seed), "framework": "torch"}
  for key, stage in EVAL_KEYS:
    model = _load_stage_model(cfg, workdir, stage)
    m = evaluate(model, data.test, data.spec, num_classes=nc, mean=mean, std=std,
                 batch_size=cfg.data.eval_batch_size, num_threads=nt)
    m = pipeline.with_training_facts(m, cfg, stage,
                                     _read_json(os.path.join(workdir, stage, "done.json")))
    results[key] = m
    log(f"[torch evaluate] {key}: test top-1 {m['top1']:.4f} top-5 {m['top5']:.4f}")
  sel_done = _read_json(os.path.join(workdir, "select", "done.json"))
  results["selection"] = {k: v for k, v in sel_done.items()
                          if k not in ("fingerprint", "finished")}
  results["gain_top1"] = results["student"]["top1"] - results["baseline"]["top1"]
  results["train_seconds"] = {s: _read_json(os.path.join(workdir, s, "done.json"))
                              .get("train_seconds") for s in STAGE_SEED}
  results["stage_seconds_this_call"] = timings
  _write_json(res_path, results)
  return results
