"""Images/s of the full jitted train step (``bssl.train.make_train_step``), per model and
convolution implementation.

Each case builds the model with ``bssl.models.create_model(..., conv_impl=...)``, SGD
(Nesterov 0.9, weight decay 5e-4, cosine schedule) as the demo trains it, one random
uint8 batch placed once, and times ``--repeats`` runs of ``--steps`` steps each after
one compile-and-warm-up step (the state is donated from step to step, as in ``fit``).
The figure is the median run; every run is printed too. XLA's compile time is printed
separately.

Cases (``--models``, comma-separated):
  small       resnet_small (16/32/64, one basic block per stage), 28x28x1, the demo's
              student and baseline; conv_impl 'xla' and 'im2col_grad' (``--impls``)
  small_deep  the same with depths (2, 2, 2), the teacher of the :compare preset
  resnet50    224x224x3, 1000 classes, float32 and bfloat16, ``--impls`` too
  data        the demo's grain input pipeline alone (pad-crop-flip of 28x28x1 uint8,
              batches of ``--batch``): is input a bottleneck?

Model FLOPs utilisation = 3 x XLA's forward-pass FLOPs per step / step time / peak;
pass ``--peak_tflops`` for the device (on CPU it prints n/a: no agreed peak).
``--mesh_shape`` is the config's field (``8``, or ``4,2`` for data x fsdp: the train state
sharded over fsdp); the default is one data axis over every device.

Side by side, each model case also times a *plain* step on the same model, batch (the
same uint8 array on the device, normalised in the step) and dtype: a jitted data-parallel
step as the flax ImageNet example writes one (:func:`plain_train_step`: flax's
``TrainState`` with the BatchNorm ``batch_stats``, ``optax.sgd`` with Nesterov momentum,
weight decay as an L2 term of the loss, the batch a ``NamedSharding`` over the mesh, the
state replicated and donated), with none of bssl's extras (label smoothing, gradient and
parameter norms, the fsdp layout). The plain and bssl runs alternate, and ``ratio`` is
plain step time / bssl step time: bssl's speed as a fraction of the plain step's
(1.0: no cost; the target is >= 0.95); ``cpu_ratio`` is the same in process CPU time,
which other processes on a shared machine inflate less than wall time, and
``--xla_cost`` adds XLA's own count (FLOPs, bytes accessed) of each compiled step, which
no load changes.

XLA:CPU allocates every executable's temporary buffer afresh for each call. With glibc's
defaults (what bssl runs with today) each large allocation is a new mmap whose pages
fault in on first touch: ~80-220 ms of kernel time per demo step, reported as
"kernel" below. ``--malloc tuned`` calls :func:`bssl.hostmem.tune_malloc` before JAX
starts (one malloc arena, no mmap, no trimming), so freed pages are reused, as
``bssl.main`` does; the default measures glibc's behaviour.

    python benchmarks/train_step.py                                   # everything
    python benchmarks/train_step.py --models small --steps 20         # the demo model
    python benchmarks/train_step.py --models small --malloc tuned     # page reuse
    python benchmarks/train_step.py --models resnet50 --steps 1 --repeats 3
    python benchmarks/train_step.py --models resnet50 --dtypes bfloat16 --mesh_shape 4,2

The last line printed is one JSON object with every figure; ``plain_step_s``,
``bssl_step_s`` and ``ratio`` at its top are the first model case's (the demo model with
the first ``--impls`` by default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from bssl.hostmem import tune_malloc  # noqa: E402  (imports nothing heavy)


def _fmt(x: float) -> str:
  return f"{x:.0f}" if x >= 100 else f"{x:.2g}" if x < 1 else f"{x:.1f}"


def _forward_flops(fn, *args) -> float:
  """XLA's FLOP count of ``fn(*args)``: the lowered program's analysis for this backend,
  else (jax 0.11 on GPU gives none) the same program lowered for the CPU, which counts
  the same convolutions and matmuls."""
  import jax

  def flops(lowered) -> float:
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    f = float(cost.get("flops", "nan")) if cost else float("nan")
    return f if math.isfinite(f) and f > 0 else float("nan")

  f = flops(jax.jit(fn).lower(*args))
  if math.isfinite(f):
    return f
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
  return flops(jax.jit(fn).trace(*abstract).lower(lowering_platforms=("cpu",)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
      "--models",
      default="small,small_deep,resnet50,data",
      help="comma-separated: small, small_deep, resnet50, data",
  )
  p.add_argument(
      "--impls", default="xla,im2col_grad", help="conv_impl values to compare (comma-separated)"
  )
  p.add_argument("--steps", type=int, default=20, help="train steps per timed run")
  p.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
  p.add_argument(
      "--batch",
      type=int,
      default=None,
      help="batch size (default: 128 for small models, 8 for resnet50 on CPU)",
  )
  p.add_argument("--dtypes", default="float32,bfloat16", help="resnet50 compute dtypes")
  p.add_argument(
      "--peak_tflops",
      type=float,
      default=None,
      help="device peak TFLOP/s for model FLOPs utilisation",
  )
  p.add_argument("--malloc", choices=("tuned", "default"), default="default")
  p.add_argument(
      "--xla_cost",
      action="store_true",
      help="also print XLA's FLOPs and bytes accessed of the bssl and plain steps "
      "(compiles each again)",
  )
  p.add_argument(
      "--mesh_shape",
      default="",
      help="the device mesh, as the config's mesh_shape: '8', or '4,2' for (data, fsdp); "
      "default: one data axis over every device",
  )
  a = p.parse_args(argv)
  if a.steps <= 0 or a.repeats <= 0:
    p.error(f"--steps and --repeats must be positive, got {a.steps} and {a.repeats}")
  bad = set(a.models.split(",")) - {"small", "small_deep", "resnet50", "data"}
  if bad:
    p.error(f"unknown --models {sorted(bad)}; accepted: small, small_deep, resnet50, data")
  try:
    a.mesh_shape = tuple(int(x) for x in a.mesh_shape.split(",") if x.strip())
  except ValueError:
    p.error(f"--mesh_shape must be integers separated by commas, got {a.mesh_shape!r}")
  return a


def plain_train_step(model, mesh, *, num_classes, mean, std, lr, momentum, weight_decay):
  """``(init(rng, image_shape) -> state, step(state, batch) -> (state, metrics))``: the
  plain jitted data-parallel train step of the flax ImageNet example, written with jit
  and a ``NamedSharding`` batch instead of pmap: flax's ``TrainState`` carrying the
  BatchNorm statistics, SGD with Nesterov momentum, weight decay as ``wd/2 |w|^2`` over
  the kernels in the loss, BatchNorm statistics of the global batch, the state replicated
  and donated. ``batch``: ``image`` uint8 [B, ...] (normalised in the step, as bssl's
  step does) and ``label`` int32 [B]."""
  from typing import Any

  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  class State(train_state.TrainState):
    batch_stats: Any

  repl = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(mesh.axis_names))
  schedule = optax.cosine_decay_schedule(lr, 10_000)
  tx = optax.sgd(learning_rate=schedule, momentum=momentum, nesterov=True)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def init(rng, image_shape):
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return State.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables["batch_stats"],
    )

  def step(state, batch):
    images = (batch["image"].astype(jnp.float32) - mean) / std

    def loss_fn(params):
      logits, new_model_state = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats},
          images,
          train=True,
          mutable=["batch_stats"],
      )
      one_hot = jax.nn.one_hot(batch["label"], num_classes)
      loss = jnp.mean(optax.softmax_cross_entropy(logits, one_hot))
      l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(params) if x.ndim > 1)
      return loss + weight_decay * 0.5 * l2, (new_model_state, logits)

    (loss, (new_model_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "learning_rate": schedule(state.step),
    }
    state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])
    return state, metrics

  init_jit = jax.jit(init, static_argnums=1, out_shardings=repl)
  step_jit = jax.jit(
      step,
      in_shardings=(repl, batch_sharding),
      out_shardings=(repl, repl),
      donate_argnums=0,
  )
  return init_jit, step_jit


def main(argv=None):
  args = parse_args(argv)
  malloc_tuned = tune_malloc() if args.malloc == "tuned" else False

  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from bssl import models, parallel, train

  mesh = parallel.make_mesh(args.mesh_shape or None)
  backend = jax.default_backend()
  mesh_desc = " x ".join(f"{n} {a}" for a, n in mesh.shape.items())
  print(
      f"[train_step] jax {jax.__version__} on {backend} ({jax.device_count()} device(s), "
      f"{os.cpu_count()} CPUs, mesh {mesh_desc}); malloc "
      f"{'tuned' if malloc_tuned else 'glibc default'}; {args.repeats} runs x {args.steps} "
      f"steps, median reported; the plain step's runs alternate with bssl's",
      flush=True,
  )
  results = {
      "backend": backend,
      "malloc_tuned": malloc_tuned,
      "steps": args.steps,
      "repeats": args.repeats,
      "mesh_shape": [int(n) for n in mesh.shape.values()],
      "mesh_axes": list(mesh.axis_names),
      "cases": {},
  }

  def bench_case(key, name, num_classes, image_shape, batch, dtype, impl, **model_kwargs):
    model = models.create_model(name, num_classes, dtype=dtype, conv_impl=impl, **model_kwargs)
    opt_cfg = ml_collections.ConfigDict(dict(momentum=0.9, nesterov=True, weight_decay=5e-4))
    schedule = train.make_schedule(ml_collections.ConfigDict(dict(schedule="cosine")), 10_000, 0.1)
    tx = train.make_optimizer(opt_cfg, schedule)
    state = train.init_state(model, tx, 0, image_shape, mesh)
    mean, std = (127.5,) * image_shape[-1], (64.0,) * image_shape[-1]
    step = train.make_train_step(
        model, tx, mesh, num_classes=num_classes, mean=mean, std=std, schedule=schedule
    )
    rng = np.random.RandomState(0)
    batch_np = {
        "image": rng.randint(0, 256, (batch, *image_shape)).astype(np.uint8),
        "label": rng.randint(0, num_classes, batch).astype(np.int32),
    }
    data = parallel.global_batch_from_local(mesh, batch_np)

    # Model FLOPs: XLA's count for one forward pass (train mode) of the batch, x3, on the
    # lowered (not compiled) program: GPU compiles turn convolutions into cuDNN calls
    # that the compiled cost analysis does not count.
    def fwd(params, batch_stats, x):
      return model.apply(
          {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
      )

    x = jnp.zeros((batch, *image_shape), jnp.float32)
    model_flops = 3 * _forward_flops(fwd, state.params, state.batch_stats, x)

    t0 = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0

    # The plain step (flax ImageNet example's way) on the same model, batch and dtype.
    plain_init, plain_step = plain_train_step(
        model,
        mesh,
        num_classes=num_classes,
        mean=mean,
        std=std,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
    )
    plain_state = plain_init(jax.random.key(0), tuple(image_shape))
    plain_state, plain_metrics = plain_step(plain_state, data)
    jax.block_until_ready(plain_metrics)

    def timed(fn, st):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        st, m = fn(st, data)
      jax.block_until_ready(m)
      return st, m, (time.perf_counter() - t0) / args.steps

    def cpu(ru):
      return ru.ru_utime + ru.ru_stime

    runs, plain_runs, cpu_s, sys_s, faults, plain_cpu_s = [], [], 0.0, 0.0, 0, 0.0
    for _ in range(args.repeats):
      ru0 = resource.getrusage(resource.RUSAGE_SELF)
      state, metrics, dt = timed(step, state)
      ru1 = resource.getrusage(resource.RUSAGE_SELF)
      runs.append(batch / dt)
      cpu_s += cpu(ru1) - cpu(ru0)
      sys_s += ru1.ru_stime - ru0.ru_stime
      faults += ru1.ru_minflt - ru0.ru_minflt
      plain_state, plain_metrics, dt = timed(plain_step, plain_state)
      plain_runs.append(dt)
      plain_cpu_s += cpu(resource.getrusage(resource.RUSAGE_SELF)) - cpu(ru1)
    if not np.isfinite(float(metrics["loss"])):
      raise FloatingPointError(f"{key}: non-finite loss {float(metrics['loss'])}")
    if not np.isfinite(float(plain_metrics["loss"])):
      raise FloatingPointError(f"{key}: plain step's loss {float(plain_metrics['loss'])}")
    n_steps = args.repeats * args.steps
    ips = float(np.median(runs))
    step_s = batch / ips
    plain_step_s = float(np.median(plain_runs))
    mfu = (model_flops / step_s / (args.peak_tflops * 1e12)) if args.peak_tflops else None
    rec = {
        "images_per_s": ips,
        "runs_images_per_s": runs,
        "step_ms": 1e3 * step_s,
        "batch": batch,
        "dtype": jnp.dtype(dtype).name,
        "conv_impl": impl,
        "compile_s": compile_s,
        "model_gflops_per_step": model_flops / 1e9,
        "mfu": mfu,
        "cpu_ms_per_step": 1e3 * cpu_s / n_steps,
        "sys_ms_per_step": 1e3 * sys_s / n_steps,
        "page_faults_per_step": faults / n_steps,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bssl_step_s": step_s,
        "plain_step_s": plain_step_s,
        "plain_runs_step_s": plain_runs,
        "ratio": plain_step_s / step_s,
        "plain_cpu_ms_per_step": 1e3 * plain_cpu_s / n_steps,
        # the same on a shared machine: CPU time, which other processes inflate less
        "cpu_ratio": plain_cpu_s / max(cpu_s, 1e-9),
    }
    if args.xla_cost:  # load-independent: XLA's own count of what each step does
      for name, fn, st in (("bssl", step, state), ("plain", plain_step, plain_state)):
        cost = fn.lower(st, data).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        rec[f"{name}_xla_gflops"] = float(cost.get("flops", float("nan"))) / 1e9
        rec[f"{name}_xla_mb_accessed"] = float(cost.get("bytes accessed", float("nan"))) / 1e6
    results["cases"][key] = rec
    if "ratio" not in results:  # the first model case's, at the top
      results.update(bssl_step_s=step_s, plain_step_s=plain_step_s, ratio=rec["ratio"])
    print(
        f"[train_step] {key:36s} {_fmt(ips):>8s} img/s  ({rec['step_ms']:.1f} ms/step; runs "
        f"{', '.join(_fmt(r) for r in runs)}; CPU {rec['cpu_ms_per_step']:.0f} ms/step of "
        f"which kernel {rec['sys_ms_per_step']:.0f}; MFU "
        f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'}; compile {compile_s:.1f} s)",
        flush=True,
    )
    print(
        f"[train_step] {key:36s} plain step {1e3 * plain_step_s:.1f} ms (runs "
        f"{', '.join(f'{1e3 * r:.1f}' for r in plain_runs)}); bssl/plain speed "
        f"{rec['ratio']:.3f} (plain step time / bssl step time; CPU time "
        f"{rec['cpu_ratio']:.3f})",
        flush=True,
    )
    if args.xla_cost:
      print(
          f"[train_step] {key:36s} XLA cost, bssl / plain: {rec['bssl_xla_gflops']:.3f} / "
          f"{rec['plain_xla_gflops']:.3f} GFLOP, {rec['bssl_xla_mb_accessed']:.1f} / "
          f"{rec['plain_xla_mb_accessed']:.1f} MB accessed per step",
          flush=True,
      )
    return rec

  impls = [s for s in args.impls.split(",") if s]
  wanted = args.models.split(",")
  for case, kwargs in (("small", {}), ("small_deep", {"depths": (2, 2, 2)})):
    if case in wanted:
      for impl in impls:
        bench_case(
            f"{case}/{impl}",
            "resnet_small",
            10,
            (28, 28, 1),
            args.batch or 128,
            jnp.float32,
            impl,
            **kwargs,
        )
  if "resnet50" in wanted:
    batch = args.batch or (8 if backend == "cpu" else 128)
    for dt in args.dtypes.split(","):
      for impl in impls:
        bench_case(
            f"resnet50/{dt}/{impl}", "resnet50", 1000, (224, 224, 3), batch, jnp.dtype(dt), impl
        )
  if "data" in wanted:
    results["cases"]["data"] = bench_data(args.batch or 128, args.repeats)

  # Speed-ups of each impl over 'xla' for the same case.
  for key, rec in results["cases"].items():
    parts = key.split("/")
    if len(parts) >= 2 and parts[-1] != "xla":
      ref = results["cases"].get("/".join(parts[:-1] + ["xla"]))
      if ref:
        rec["speedup_vs_xla"] = rec["images_per_s"] / ref["images_per_s"]
        print(f"[train_step] {key}: {rec['speedup_vs_xla']:.2f}x the 'xla' conv_impl")
  print(json.dumps(results))
  return results


def bench_data(batch: int, repeats: int, n_batches: int = 50) -> dict:
  """The demo's input pipeline (grain, pad-crop-flip, 1 read thread) on random 28x28x1."""
  import numpy as np

  from bssl.data import pipelines

  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (6000, 28, 28, 1)).astype(np.uint8)

  class Source:

    def __len__(self):
      return len(images)

    def __getitem__(self, i):
      return {"image": images[i], "label": np.int32(i % 10), "id": np.int64(i)}

  spec = pipelines.ImageSpec(size=28, channels=1, augment="pad_crop_flip", pad=2)
  it = iter(pipelines.train_dataset(Source(), spec, local_batch_size=batch, seed=0))
  next(it)
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(n_batches):
      next(it)
    runs.append(n_batches * batch / (time.perf_counter() - t0))
  ips = float(np.median(runs))
  print(
      f"[train_step] {'data (grain input pipeline)':36s} {_fmt(ips):>8s} img/s  (runs "
      f"{', '.join(_fmt(r) for r in runs)})",
      flush=True,
  )
  return {"images_per_s": ips, "runs_images_per_s": runs, "batch": batch}


if __name__ == "__main__":
  main()
