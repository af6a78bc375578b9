"""The JAX backend (:class:`bssl.backends.base.Backend`): how a stage trains, evaluates,
scores and transfers with Flax models over the device mesh (every process). The PyTorch
backend (:mod:`bssl.backends.torch`) offers the same methods, so :mod:`bssl.stages` is
written once for both.

Variables of a stage live in ``<workdir>/<stage>/final`` (orbax: params + batch_stats)
and are restored onto the current mesh whatever the device count they were saved on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bssl import config, deps, evaluation, models, parallel, prefetch, ranking, train
from bssl import transfer as transfer_lib
from bssl.backends import base
from bssl.backends.base import stage_seed
from bssl.train import normalize


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def make_model(scfg, num_classes: int):
  return models.create_model(
      scfg.model, num_classes, dtype=_dtype(scfg.dtype), **dict(scfg.get("model_kwargs") or {})
  )


def new_head(variables, model, spec, *, seed: int, mesh=None, log=print, reset=()) -> dict:
  """``variables`` with every leaf whose shape differs from ``model``'s (the classifier
  head of another label space), and every leaf under the top-level params ``reset``
  (e.g. ``("fc",)``: a new head even for as many classes), taken from a fresh
  initialisation of ``model`` (the values its full initialisation from ``seed`` has).

  On the devices: the shapes come from ``jax.eval_shape``; one jitted initialisation
  returns only the replaced leaves (XLA drops the rest of the init), laid out as the
  train state is on ``mesh`` (:func:`bssl.parallel.state_sharding`); the other leaves
  are ``variables``' own arrays, untouched."""
  shapes = variable_shapes(model, spec)
  old = {k: variables[k] for k in shapes}
  replaced: list[str] = []

  def pick(path, a, b):
    keys = [str(getattr(k, "key", k)) for k in path]
    if a.shape == b.shape and not (keys[0] == "params" and keys[1] in reset):
      return False
    replaced.append("/".join(keys))
    return True

  fresh_mask = jax.tree_util.tree_map_with_path(pick, old, shapes)
  mask = jax.tree.leaves(fresh_mask)

  def init_replaced(rng):
    x = jnp.zeros((1, *train.spec_shape(spec)))
    fresh = jax.tree.leaves(model.init(rng, x, train=False))
    return [f for f, m in zip(fresh, mask) if m]

  wanted = [s for s, m in zip(jax.tree.leaves(shapes), mask) if m]
  out_shardings = parallel.state_sharding(mesh, wanted) if mesh is not None else None
  it = iter(jax.jit(init_replaced, out_shardings=out_shardings)(jax.random.key(seed)))
  leaves = [next(it) if m else a for a, m in zip(jax.tree.leaves(old), mask)]
  log(f"new classifier head: {', '.join(replaced) or 'nothing to replace'} initialised afresh")
  return jax.tree.unflatten(jax.tree.structure(old), leaves)


def variable_shapes(model, spec) -> dict:
  return dict(
      jax.eval_shape(
          lambda r: model.init(r, jnp.zeros((1, *train.spec_shape(spec))), train=False),
          jax.random.key(0),
      )
  )


class JaxBackend(base.Backend):
  """Flax models on a mesh over every device of every process (``mesh_shape``); variables
  in ``<stage>/final`` (orbax)."""

  name = "jax"

  def __init__(self, cfg):
    self.cfg = cfg
    self.mesh = parallel.make_mesh(tuple(cfg.mesh_shape) or None)

  @property
  def norm(self):
    return tuple(self.cfg.data.mean), tuple(self.cfg.data.std)

  def load(self, ctx, stage: str, model, sharded: bool = False):
    """The variables of ``stage`` (following a teacher that is the baseline), replicated
    on the mesh or, ``sharded``, in the train state's layout (to train from them)."""
    return train.load_variables(
        ctx.wd.stage(ctx.variables_stage(stage)) / "final",
        self.mesh,
        variable_shapes(model, ctx.data.spec),
        sharded=sharded,
    )

  def load_folder(self, ctx, folder: str, model):
    """A folder of variables to train from: read once into the train state's layout."""
    deps.note_input(f"{config.section_of(ctx.stage)}.init_from", "checkpoint", folder)
    return train.load_variables(
        folder, self.mesh, variable_shapes(model, ctx.data.spec), sharded=True
    )

  def train(self, ctx, source, init: tuple | None) -> dict:
    """Trains stage ``ctx.stage`` on ``source``; ``init`` is None, ('stage', name) or
    ('folder', path). Writes ``final/``; returns the stage's info."""
    cfg = ctx.cfg
    scfg = cfg[config.section_of(ctx.stage)].copy_and_resolve_references()
    seed = cfg.seed * 100 + stage_seed(ctx.stage)
    scfg.steps = config.resolve_steps(scfg, len(source))
    num_classes = ctx.num_classes(ctx.stage)
    model = make_model(scfg, num_classes)
    variables = None
    if init is not None:
      kind, where = init
      source_classes = ctx.num_classes(where) if kind == "stage" else num_classes
      if source_classes != num_classes:
        # another label space (weak tags -> classes): its body, a new classifier head
        variables = new_head(
            self.load(ctx, where, make_model(scfg, source_classes), sharded=True),
            model,
            ctx.data.spec,
            seed=seed,
            mesh=self.mesh,
            log=ctx.log,
        )
      elif kind == "stage":
        variables = self.load(ctx, where, model, sharded=True)
      else:
        variables = self.load_folder(ctx, where, model)
    mean, std = self.norm
    if scfg.steps == 0:  # variables used as they are
      out = {"steps": 0, "train_seconds": 0.0}
    else:
      out = train.fit(
          name=ctx.stage,
          model=model,
          cfg=scfg,
          source=source,
          spec=ctx.data.spec,
          mesh=self.mesh,
          workdir=ctx.dir,
          num_classes=num_classes,
          mean=mean,
          std=std,
          init_variables=variables,
          seed=seed,
          num_threads=cfg.num_threads,
          num_workers=int(cfg.num_workers),
      )
      variables = out.pop("variables")
    train.save_variables(ctx.dir / "final", variables)
    out["num_params"] = models.count_params(variables["params"])
    return out

  def evaluate(self, ctx, stage: str, source) -> dict:
    cfg = ctx.cfg
    model = make_model(cfg[config.section_of(stage)], cfg.data.num_classes)
    mean, std = self.norm
    ev = evaluation.make_eval_step(
        model, self.mesh, num_classes=cfg.data.num_classes, mean=mean, std=std
    )
    return evaluation.evaluate(
        ev,
        self.load(ctx, stage, model),
        source,
        ctx.data.spec,
        self.mesh,
        global_batch_size=cfg.data.eval_batch_size,
        num_threads=cfg.num_threads,
    )

  def scorer(self, ctx, stage: str, top_p: int):
    model = make_model(ctx.cfg[config.section_of(stage)], ctx.cfg.data.num_classes)
    return JaxScorer(model, self.load(ctx, stage, model), top_p, *self.norm)

  def transfer(self, ctx, stage: str, key: str, mode: str, target) -> dict:
    """``stage``'s model on ``target``: fc_only or full_ft (see bssl/transfer.py)."""
    cfg = ctx.cfg
    scfg = cfg[config.section_of(stage)]
    model = make_model(scfg, cfg.data.num_classes)
    variables = self.load(ctx, stage, model)
    mean, std = self.norm
    if mode == "fc_only":
      xy = [
          transfer_lib.features(model, variables, s, ctx.data.spec, mean, std)
          for s in (target.train, target.val, target.test)
      ]
      return transfer_lib.fc_only(*xy, target.num_classes)
    t = cfg.transfer
    # fine-tuning's optimiser settings (momentum, weight decay, ...) with transfer's length,
    # rate and batch: only the finetune.* fields fit reads enter the record
    ft = deps.derive(
        cfg.finetune,
        model=scfg.model,
        model_kwargs=dict(scfg.model_kwargs or {}),
        steps=int(t.ft_steps),
        epochs=None,
        lr=float(t.ft_lr),
        batch_size=int(t.ft_batch_size),
        schedule="cosine",
        warmup_fraction=0.0,
        warmup_steps=0,
        init_from=None,
    )
    tmodel = make_model(ft, target.num_classes)
    seed = cfg.seed * 100 + 50 + sorted(("baseline", "teacher", "student")).index(key)
    init = new_head(
        variables, tmodel, ctx.data.spec, seed=seed, mesh=self.mesh, log=ctx.log, reset=("fc",)
    )
    out = train.fit(
        name=f"transfer/{key}",
        model=tmodel,
        cfg=ft,
        source=target.train,
        spec=ctx.data.spec,
        mesh=self.mesh,
        workdir=ctx.dir / key / "full_ft",
        num_classes=target.num_classes,
        mean=mean,
        std=std,
        init_variables=init,
        seed=seed,
        num_threads=cfg.num_threads,
        num_workers=int(cfg.num_workers),
    )
    ev = evaluation.make_eval_step(
        tmodel, self.mesh, num_classes=target.num_classes, mean=mean, std=std
    )
    kw = dict(global_batch_size=cfg.data.eval_batch_size, num_threads=cfg.num_threads)
    test = evaluation.evaluate(ev, out["variables"], target.test, ctx.data.spec, self.mesh, **kw)
    val = evaluation.evaluate(ev, out["variables"], target.val, ctx.data.spec, self.mesh, **kw)
    return {
        "top1": test["top1"],
        "top5": test["top5"],
        "val_top1": val["top1"],
        "steps": int(t.ft_steps),
        "train_seconds": out.get("train_seconds"),
    }

  def local_batch_size(self, global_batch_size: int) -> int:
    return global_batch_size // jax.process_count()


class JaxScorer:
  """A :class:`bssl.backends.base.Scorer`: top-P classes and their log-odds
  (:func:`bssl.ranking.top_log_odds`: the ranking score, which does not saturate like the
  float32 softmax) on this process's own devices (a local mesh: scoring needs no
  collective, so processes never wait for each other)."""

  def __init__(self, model, variables, top_p: int, mean, std):
    local = parallel.local_mesh()
    self.in_sharding = NamedSharding(local, P(parallel.DATA_AXIS))
    repl = NamedSharding(local, P())
    # restored replicated on the global mesh: take this process's copy
    self.variables = parallel.local_copy(variables, repl)

    def score_step(variables, images):
      def apply(x):
        return model.apply(variables, normalize(x, mean, std), train=False)

      if ranking.is_clip_batch(images):  # videos: the mean of the N clips' softmax
        return ranking.video_top_log_odds(ranking.clip_logits(apply, images), top_p)
      return ranking.top_log_odds(apply(images), top_p)

    # (the uint8 batch is not donated: no output has its shape and dtype, so XLA could
    # not reuse it; it is freed when the step is done, the prefetcher keeping no copy)
    self.step = jax.jit(score_step, out_shardings=(self.in_sharding,) * 3)

  def put(self, images):
    """Starts the host->device copy of a batch (from the prefetch thread, bssl.prefetch)."""
    return jax.device_put(images, self.in_sharding)

  def dispatch(self, images):
    """Starts the step on a batch: put by :meth:`put` already, or a host array (copied
    here, explicitly); no other copy (bssl.prefetch.no_implicit_transfers)."""
    if not isinstance(images, jax.Array):
      images = self.put(images)
    with prefetch.no_implicit_transfers():
      return self.step(self.variables, images)

  def fetch(self, out):
    """The step's three outputs on the host: one wait for all of them."""
    return tuple(np.asarray(x) for x in jax.device_get(out))
