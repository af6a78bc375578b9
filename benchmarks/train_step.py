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

The last line printed is one JSON object with every figure.
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
  a = p.parse_args(argv)
  if a.steps <= 0 or a.repeats <= 0:
    p.error(f"--steps and --repeats must be positive, got {a.steps} and {a.repeats}")
  bad = set(a.models.split(",")) - {"small", "small_deep", "resnet50", "data"}
  if bad:
    p.error(f"unknown --models {sorted(bad)}; accepted: small, small_deep, resnet50, data")
  return a


def main(argv=None):
  args = parse_args(argv)
  malloc_tuned = tune_malloc() if args.malloc == "tuned" else False

  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from bssl import models, parallel, train

  mesh = parallel.make_mesh()
  backend = jax.default_backend()
  print(
      f"[train_step] jax {jax.__version__} on {backend} ({jax.device_count()} device(s), "
      f"{os.cpu_count()} CPUs); malloc {'tuned' if malloc_tuned else 'glibc default'}; "
      f"{args.repeats} runs x {args.steps} steps, median reported",
      flush=True,
  )
  results = {
      "backend": backend,
      "malloc_tuned": malloc_tuned,
      "steps": args.steps,
      "repeats": args.repeats,
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
    runs = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, data)
      jax.block_until_ready(metrics)
      runs.append(args.steps * batch / (time.perf_counter() - t0))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if not np.isfinite(float(metrics["loss"])):
      raise FloatingPointError(f"{key}: non-finite loss {float(metrics['loss'])}")
    n_steps = args.repeats * args.steps
    ips = float(np.median(runs))
    step_s = batch / ips
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
        "cpu_ms_per_step": 1e3
        * ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime))
        / n_steps,
        "sys_ms_per_step": 1e3 * (ru1.ru_stime - ru0.ru_stime) / n_steps,
        "page_faults_per_step": (ru1.ru_minflt - ru0.ru_minflt) / n_steps,
        "max_rss_mb": ru1.ru_maxrss / 1024,
    }
    results["cases"][key] = rec
    print(
        f"[train_step] {key:36s} {_fmt(ips):>8s} img/s  ({rec['step_ms']:.1f} ms/step; runs "
        f"{', '.join(_fmt(r) for r in runs)}; CPU {rec['cpu_ms_per_step']:.0f} ms/step of "
        f"which kernel {rec['sys_ms_per_step']:.0f}; MFU "
        f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'}; compile {compile_s:.1f} s)",
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
