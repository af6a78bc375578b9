"""Training: optimizer and schedule, the train state, jitted train/eval steps over a
device mesh, and the fit loop (progress lines, TensorBoard, checkpoints with the data
iterator, NaN stop, SIGTERM save, exact resume).

Sections follow the order things happen in :func:`fit`.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from bssl import parallel, prefetch, progress, storage
from bssl.config.names import BN_MODES, SCHEDULES
from bssl.data import pipelines
from bssl.data import video as video_lib


class NonFiniteLossError(FloatingPointError):
  """Loss became NaN/inf; the last good checkpoint is kept."""


class Preempted(RuntimeError):
  """SIGTERM received; a checkpoint was saved, rerun the same command to resume."""


# ----------------------------------------------------------------------------- optimizer


def learning_rate(cfg, global_batch_size: int) -> float:
  """The configured base LR, or the linear scaling rule 0.1 x batch / 256."""
  return float(cfg.lr) if cfg.get("lr") is not None else 0.1 * global_batch_size / 256


def make_schedule(cfg, total_steps: int, base_lr: float) -> optax.Schedule:
  """Linear warm-up from ``base_lr / warmup`` to ``base_lr``, then ``cfg.schedule``. The
  warm-up is ``cfg.warmup_steps`` when set (0 included: no warm-up, whatever
  ``warmup_fraction`` says), else ``round(warmup_fraction x total_steps)``; at most
  ``total_steps - 1``."""
  steps = cfg.get("warmup_steps")
  warmup = (
      int(steps) if steps is not None else int(round(cfg.get("warmup_fraction", 0.0) * total_steps))
  )
  warmup = min(warmup, max(total_steps - 1, 0))
  rest = max(total_steps - warmup, 1)
  kind = cfg.get("schedule", "cosine")
  if kind == "cosine":
    main = optax.cosine_decay_schedule(base_lr, rest)
  elif kind == "step":
    bounds = {
        int(round(f * rest)): cfg.get("step_decay", 0.1)
        for f in cfg.get("step_boundaries", (1 / 3, 2 / 3, 8 / 9))
    }
    main = optax.piecewise_constant_schedule(base_lr, bounds)
  elif kind == "constant":
    main = optax.constant_schedule(base_lr)
  else:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(base_lr / max(warmup, 1), base_lr, warmup), main], [warmup]
  )


def _decay_mask(params):
  """Weight decay on kernels only: not on BatchNorm scales/biases nor on biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum; decay added to the gradient before momentum, as in PyTorch."""
  return optax.chain(
      optax.add_decayed_weights(cfg.get("weight_decay", 1e-4), mask=_decay_mask),
      optax.sgd(schedule, momentum=cfg.get("momentum", 0.9), nesterov=cfg.get("nesterov", False)),
  )


# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 [B,H,W,C] -> float32 normalised images."""
  x = images.astype(jnp.float32)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _adopt(tx):
  """``variables -> TrainState`` with a fresh optimizer state."""

  def adopt(variables):
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )

  return adopt


def _init(model, image_shape, rng) -> dict:
  v = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return {"params": v["params"], "batch_stats": v["batch_stats"]}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_on(model, image_shape, mesh, rng) -> dict:
  """``model``'s variables, born in the train state's layout on ``mesh``; one compile per
  (model, input, mesh) in a process (the stages of a recipe share it: threefry's
  initialisers are slow to compile on XLA:CPU)."""
  v = _init(model, image_shape, rng)
  return jax.lax.with_sharding_constraint(v, parallel.state_sharding(mesh, v))


def init_state(model, tx, seed: int, image_shape, mesh, variables=None) -> TrainState:
  """The train state, made on the devices in its layout (:func:`bssl.parallel.state_sharding`:
  replicated, or sharded over the mesh's ``fsdp`` axis): shapes from ``jax.eval_shape``,
  jitted initialisations whose outputs are born sharded, nothing through the host.

  ``variables`` (arrays on the devices: a restored checkpoint, :func:`bssl.backends.jax.new_head`)
  are adopted as they are, re-laid out on the devices if needed. Initialisation uses jax's
  threefry keys (partitionable, :mod:`bssl.parallel`): the same random bits from a seed
  on any backend and any mesh, so the same initial parameters on any mesh.
  """
  image_shape = tuple(int(d) for d in image_shape)
  if variables is None:
    variables = _init_on(model, image_shape, mesh, jax.random.key(seed))
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  adopt = _adopt(tx)
  shardings = parallel.state_sharding(mesh, jax.eval_shape(adopt, variables))
  return jax.jit(adopt, out_shardings=shardings)(variables)


def abstract_state(model, tx, image_shape, mesh) -> TrainState:
  """Shapes and shardings of a train state, for restoring without allocating twice."""
  shapes = jax.eval_shape(
      lambda r: _adopt(tx)(_init(model, tuple(image_shape), r)), jax.random.key(0)
  )
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes,
      parallel.state_sharding(mesh, shapes),
  )


# ----------------------------------------------------------------------------- steps


def tag_targets(tags, num_classes):
  """Weak labels as a distribution: ``tags`` int [B, T] (padded with -1) -> [B, C], each
  image's k distinct tags 1/k each (Mahajan et al. 2018); an image without tags gets an
  all-zero row (no loss)."""
  multi_hot = jnp.max(jax.nn.one_hot(tags, num_classes), axis=1)  # -1 -> all zeros
  k = jnp.sum(multi_hot, axis=-1, keepdims=True)
  return multi_hot / jnp.maximum(k, 1.0)


def cross_entropy(logits, labels, num_classes, smoothing):
  """Softmax cross-entropy [B] against class ids [B] or, for weak labels, tag ids [B, T].

  Label smoothing ``s`` mixes the target with the uniform distribution: ``(1 - s) t +
  s / C``, where ``t`` is the one-hot class or, for weak labels, the image's normalised
  tag distribution (1/k on each of its k tags); an image without tags keeps its all-zero
  target (no loss)."""
  if labels.ndim == 2:
    targets = tag_targets(labels, num_classes)
    if smoothing:
      has_tags = jnp.sum(targets, axis=-1, keepdims=True)  # 1, or 0 for no tags
      targets = (1.0 - smoothing) * targets + has_tags * (smoothing / num_classes)
    return optax.softmax_cross_entropy(logits, targets)
  onehot = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    onehot = optax.smooth_labels(onehot, smoothing)
  return optax.softmax_cross_entropy(logits, onehot)


def _top1(logits, labels):
  """Fraction of images whose top class is their label (weak labels: one of their tags)."""
  pred = jnp.argmax(logits, -1)
  if labels.ndim == 2:
    return jnp.mean(jnp.any(pred[:, None] == labels, axis=1))
  return jnp.mean(pred == labels)


def make_train_step(
    model,
    tx,
    mesh,
    *,
    num_classes: int,
    mean,
    std,
    schedule,
    bn_mode: str = "sync",
    label_smoothing: float = 0.0,
) -> Callable:
  """``step(state, batch) -> (state, metrics)``, jitted over ``mesh``.

  ``batch``: ``image`` uint8 [B,H,W,C] and ``label`` int32 [B], sharded on the batch dim.
  bn_mode ``sync``: BatchNorm statistics over the global batch (plain jit).
  bn_mode ``per_device``: statistics over each device's shard (``jax.shard_map``), as
  in the paper; running statistics are averaged over devices after each step.

  On a mesh with an ``fsdp`` axis the state is sharded over it
  (:func:`bssl.parallel.state_sharding`, ZeRO-3): the step gathers the weights where the
  model uses them (a sharding constraint to replicated, outside any shard_map), and the
  gradients and the new state are constrained back to the sharded layout (XLA reduces
  and scatters them). On a one-axis mesh every constraint is "replicated": the step of
  before. Either way each device sees its own slice of the batch, so the two meshes
  compute the same training.
  """
  if bn_mode not in BN_MODES:
    raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
  axes = tuple(mesh.axis_names)
  if bn_mode == "per_device" and getattr(model, "conv_impl", "xla") != "xla":
    # bssl/models/conv.py's custom VJP does not carry shard_map's varying-axis types yet:
    # per-device BatchNorm trains with XLA's convolutions (whatever the backend)
    model = model.clone(conv_impl="xla")

  def forward(params, batch_stats, images, labels):
    x = normalize(images, mean, std)
    logits, new_vars = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = cross_entropy(logits, labels, num_classes, label_smoothing).mean()
    top1 = _top1(logits, labels)
    return loss, (top1, new_vars["batch_stats"])

  if bn_mode == "sync":

    def loss_grads(params, batch_stats, images, labels):
      (loss, (top1, bs)), grads = jax.value_and_grad(forward, has_aux=True)(
          params, batch_stats, images, labels
      )
      return loss, top1, bs, grads

  else:

    def local(params, batch_stats, images, labels):
      def f(p):
        loss, (top1, bs) = forward(p, batch_stats, images, labels)
        return jax.lax.pmean(loss, axes), (top1, bs)

      # With check_vma, the gradient w.r.t. the replicated params is already summed over
      # the data axis: differentiating the pmean-ed loss gives the global-mean gradient.
      (loss, (top1, bs)), grads = jax.value_and_grad(f, has_aux=True)(params)
      return loss, jax.lax.pmean(top1, axes), jax.lax.pmean(bs, axes), grads

    loss_grads = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), P(axes), P(axes)), out_specs=(P(), P(), P(), P())
    )

  repl = parallel.replicated(mesh)

  def laid_out(tree):
    return jax.lax.with_sharding_constraint(tree, parallel.state_sharding(mesh, tree))

  def train_step(state: TrainState, batch):
    # the weights where they are used: gathered over fsdp (a no-op when replicated)
    params, batch_stats = jax.lax.with_sharding_constraint((state.params, state.batch_stats), repl)
    loss, top1, bs, grads = loss_grads(params, batch_stats, batch["image"], batch["label"])
    grads = laid_out(grads)  # reduce-scattered over fsdp
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "top1": top1,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "lr": schedule(state.step),
    }
    new = TrainState(step=state.step + 1, params=params, batch_stats=bs, opt_state=opt_state)
    return laid_out(new), metrics

  # the state keeps its layout from step to step (donated: updated in place)
  return jax.jit(train_step, donate_argnums=(0,), out_shardings=(None, repl))


# ----------------------------------------------------------------------------- variables on disk


def save_variables(directory, variables) -> None:
  """Writes {'params','batch_stats'} as an orbax checkpoint (the format bssl.convert writes);
  ``directory`` may be local or ``gs://``."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(
      storage.path(directory),
      {"params": variables["params"], "batch_stats": variables["batch_stats"]},
      force=True,
  )
  ckptr.wait_until_finished()


def load_variables(directory, mesh=None, target=None, sharded: bool = False) -> dict:
  """Reads {'params','batch_stats'} written by :func:`save_variables` or bssl.convert.

  With ``target`` (shapes, e.g. ``jax.eval_shape`` of the model's init) the arrays are
  read once, straight into their place on ``mesh`` whatever the device count they were
  saved from: replicated, or with ``sharded`` the train state's layout
  (:func:`bssl.parallel.state_sharding`: each device reads its fsdp shard); a shape or
  structure that does not match the model is a clear error, not a late crash.
  """
  directory = storage.path(directory)
  if not directory.exists():
    raise FileNotFoundError(f"no variables checkpoint at {directory}")
  ckptr = ocp.StandardCheckpointer()
  if target is None:
    return ckptr.restore(directory)
  target = {"params": target["params"], "batch_stats": target["batch_stats"]}
  if mesh is None:
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), target)
  else:
    repl = parallel.replicated(mesh)
    shardings = (
        parallel.state_sharding(mesh, target) if sharded else jax.tree.map(lambda _: repl, target)
    )
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings
    )
  try:
    return ckptr.restore(directory, abstract)
  except (ValueError, KeyError, TypeError) as e:
    raise VariablesMismatchError(
        f"the variables in {directory} do not fit the model ({type(e).__name__}: "
        f"{str(e)[:400]}); check the stage's model/model_kwargs and data.num_classes"
    ) from None


class VariablesMismatchError(ValueError):
  """A folder of variables was saved from another architecture."""


# ----------------------------------------------------------------------------- progress


class _Writer:
  """Progress lines on stdout and TensorBoard events (process 0 only).

  Events are written to a local folder; for a remote work directory (``gs://``) that
  folder is temporary and its files are uploaded into ``logdir`` on :meth:`close`
  (each run of a stage adds its own event file, as TensorBoard expects)."""

  def __init__(self, name: str, logdir):
    self.name = name
    self.main = parallel.is_main_process()
    self.tb = None
    self.remote = None
    if self.main and logdir is not None:
      local = os.fspath(logdir)
      if storage.is_remote(logdir):
        self.remote, local = logdir, tempfile.mkdtemp(prefix="bssl_tb_")
      try:
        from tensorboardX import SummaryWriter  # imports PyTorch when it is installed

        self.tb = SummaryWriter(local)
        self.local = local
      except Exception as e:
        print(f"[{name}] TensorBoard disabled: {e}", flush=True)

  def scalars(self, step: int, values: dict) -> None:
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(k, float(v), step)

  def print(self, msg: str) -> None:
    if self.main:
      print(f"[{self.name}] {msg}", flush=True)

  def close(self):
    if self.tb is None:
      return
    self.tb.flush()
    self.tb.close()
    if self.remote is not None:
      for fname in os.listdir(self.local):
        storage.write_bytes(self.remote / fname, open(os.path.join(self.local, fname), "rb").read())
      shutil.rmtree(self.local, ignore_errors=True)


class _SigtermFlag:
  """Turns SIGTERM (the preemption notice) into a flag the loop polls."""

  def __init__(self):
    self.set = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.set = True

  def __exit__(self, exc_type, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      if self.set and exc_type is None:
        # it came after the loop's last poll (during the final save): delivered again to
        # whoever handled it before, rather than swallowed (the run would go on to the
        # next stage). The final checkpoint is whole, so a rerun resumes at the end.
        signal.raise_signal(signal.SIGTERM)


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


# ----------------------------------------------------------------------------- fit


def fit(
    *,
    name: str,
    model,
    cfg,
    source,
    spec: pipelines.ImageSpec,
    mesh,
    workdir,
    num_classes: int,
    mean,
    std,
    init_variables=None,
    seed: int = 0,
    num_threads: int = 1,
    stop_after_steps: int | None = None,
    num_workers: int = 0,
) -> dict:
  """Trains ``model`` on ``source`` for ``cfg.steps`` steps and returns its variables.

  Checkpoints (the train state) go to ``workdir/checkpoints`` (local or ``gs://``) every
  ``cfg.checkpoint_every`` steps and at the end; an existing checkpoint is resumed at its
  step, on any device or process count: the input position is a function of the step
  (global batch ``k`` is the same images whatever the number of hosts), so the data
  iterator needs no state of its own. ``stop_after_steps`` (tests) simulates a crash
  after that many steps of this call, without a final save.
  """
  workdir = storage.path(workdir)
  total = int(cfg.steps)
  gbs = int(cfg.batch_size)
  lbs = parallel.local_batch_size(gbs, mesh)
  base_lr = learning_rate(cfg, gbs)
  schedule = make_schedule(cfg, total, base_lr)
  tx = make_optimizer(cfg, schedule)
  writer = _Writer(name, workdir / "tb")

  # State: restore the latest checkpoint or initialise.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(cfg.get("keep_checkpoints", 2)), enable_async_checkpointing=True, create=True
  )
  ckpt_dir = workdir / "checkpoints"
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state",), options=options)
  latest = mngr.latest_step()
  if latest is not None:
    target = abstract_state(model, tx, spec_shape(spec), mesh)
    state = mngr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))[
        "state"
    ]
    writer.print(f"resumed from checkpoint at step {latest}")
  else:
    state = init_state(model, tx, seed, spec_shape(spec), mesh, init_variables)
  start = int(jax.device_get(state.step))

  # Input, from the global batch of step `start` on (the stream is endless: the batches
  # of the steps left are read, no more).
  stream = pipelines.train_dataset(
      source,
      spec,
      local_batch_size=lbs,
      seed=seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_threads=num_threads,
      start_batch=start,
      num_workers=num_workers,
  )

  train_step = make_train_step(
      model,
      tx,
      mesh,
      num_classes=num_classes,
      mean=mean,
      std=std,
      schedule=schedule,
      bn_mode=cfg.get("bn_mode", "sync"),
      label_smoothing=cfg.get("label_smoothing", 0.0),
  )
  writer.print(
      f"{total} steps, global batch {gbs}, base lr {base_lr:g}, "
      f"{len(source)} examples, {mesh.devices.size} devices, starting at step {start}"
  )

  def save(step: int):
    """Saves ``step`` unless it is saved already (a SIGTERM on a checkpoint step)."""
    if step in mngr.all_steps():
      return
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

  log_every = max(1, int(cfg.get("log_every", 50)))
  ckpt_every = int(cfg.get("checkpoint_every", 0) or 0)
  pending: list[dict] = []
  t_last, step_last = time.time(), start
  t_start = time.time()
  last_metrics: dict = {}

  def flush(step: int):
    """Fetches pending metrics; raises on NaN/inf before anything is saved."""
    nonlocal pending, t_last, step_last, last_metrics
    if not pending:
      return
    vals = jax.device_get(pending)
    pending = []
    losses = np.array([v["loss"] for v in vals])
    if not np.all(np.isfinite(losses)):
      bad = step - len(vals) + int(np.flatnonzero(~np.isfinite(losses))[0]) + 1
      mngr.wait_until_finished()  # the last good checkpoint must be complete on disk
      raise NonFiniteLossError(
          f"[{name}] loss is {losses[~np.isfinite(losses)][0]} at step {bad}; stopping. "
          f"The last good checkpoint (step {mngr.latest_step()}) is kept in {ckpt_dir}."
      )
    mean_vals = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
    now = time.time()
    rate = (step - step_last) * gbs / max(now - t_last, 1e-9)
    mean_vals["images_per_s"] = rate
    eta = (total - step) * gbs / rate if rate > 0 else float("inf")
    writer.scalars(step, {f"train/{k}": v for k, v in mean_vals.items()})
    writer.print(
        f"step {step}/{total} ({100 * step / total:.0f}%) loss {mean_vals['loss']:.4f} "
        f"top1 {mean_vals['top1']:.3f} lr {mean_vals['lr']:.4g} "
        f"|g| {mean_vals['grad_norm']:.3g} {rate:.0f} img/s eta {progress.format_duration(eta)}"
    )
    last_metrics = mean_vals
    t_last, step_last = now, step

  # Each global batch is put on the devices by a thread while the step before it runs
  # (bssl.prefetch); a step's inputs are all on the devices already: no implicit copy.
  batches = prefetch.global_batches(
      itertools.islice(stream, max(total - start, 0)), mesh, ("image", "label")
  )
  with _SigtermFlag() as sigterm, batches:
    step = start
    try:
      while step < total:
        _, batch = next(batches)
        with prefetch.no_implicit_transfers():
          state, metrics = train_step(state, batch)
        del batch
        pending.append(metrics)
        step += 1
        if stop_after_steps is not None and step - start >= stop_after_steps:
          flush(step)
          mngr.wait_until_finished()
          return {"interrupted_at": step}
        if step % log_every == 0 or step == total:
          flush(step)
        if ckpt_every and step % ckpt_every == 0 and step < total:
          flush(step)
          save(step)
        poll = jax.process_count() == 1 or step % log_every == 0
        if poll and _any_process(sigterm.set):
          flush(step)
          save(step)
          mngr.wait_until_finished()
          writer.print(
              f"SIGTERM: saved checkpoint at step {step}; rerun the same command " f"to resume"
          )
          raise Preempted(f"{name} preempted at step {step}")
      flush(step)
      save(total)
      mngr.wait_until_finished()
    finally:
      writer.close()
  elapsed = time.time() - t_start
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return {
      "variables": variables,
      "steps": total,
      "train_seconds": elapsed,
      "last_train_metrics": last_metrics,
  }


def spec_shape(spec) -> tuple[int, ...]:
  """One model input: an image (H, W, C) or, for a video spec, a clip (T, H, W, C)."""
  if video_lib.is_video(spec):
    return tuple(spec.clip_shape)
  return (spec.size, spec.size, spec.channels)
