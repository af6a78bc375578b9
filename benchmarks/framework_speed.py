"""Images/s of the same work in JAX and in PyTorch on this machine (the speed half of the
JAX-vs-PyTorch comparison; ``bssl-compare`` measures the results half).

Two measurements, each framework doing exactly what the recipe does with it:

* **train step** of the student (the config's ``baseline`` section: the student's
  architecture, optimizer, schedule and label smoothing), batch ``--batch``: uint8 images
  normalized, forward, backward, SGD update (JAX: ``bssl.train.make_train_step``, jitted,
  its gradient norm computed in the step; PyTorch: ``bssl.backends.torch.train_step`` as
  its ``fit`` runs it, without the gradient norm between log lines);
* **scoring** with the teacher (the config's ``teacher`` section), batch
  ``--score_batch`` (default: the config's ``score.batch_size``): uint8 images normalized,
  forward, then the **log-odds top-P** of the score stage (the ranking score
  ``z_c - logsumexp_{j != c} z_j`` of the P = ``select.p`` best classes, and the finite
  flags), results copied to the host: the score stage's own scorers in both frameworks
  (``bssl.backends.jax.JaxScorer`` and the PyTorch backend's scorer).

Fixed random uint8 batches, random initial weights (speed does not depend on them). Each
(threads, framework) runs in a fresh process (so that the thread settings take effect
before the framework starts, and neither framework's threads compete with the other's),
one after the other, with the host allocator tuned as every bssl command tunes it
(``bssl.hostmem``). ``--warmup`` untimed steps first (compilation, caches), then
``--repeats`` windows of ``--steps`` train steps (scoring: as many batches as make the same
number of images); the median window is reported. ``--threads``: ``all`` (XLA's default,
``torch.set_num_threads(cpu count)``) and/or ``1`` (one intra-op thread each).

    python benchmarks/framework_speed.py --config=configs/demo.py:compare
    python benchmarks/framework_speed.py --config=demo:tiny --batch=32 --steps=2 \\
        --warmup=1 --repeats=1 --threads=all

Needs PyTorch (``requirements-torch.txt``). The last line printed is one JSON object with
every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from bssl.hostmem import tune_malloc  # noqa: E402  (imports nothing heavy)

JAX_ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
NAMES = {"jax": "JAX", "torch": "PyTorch"}
WHAT = {
    "train": "forward + backward + SGD update",
    "score": "forward + log-odds top-P (the score stage's ranking score), results on the host",
}


def load_config(arg: str):
  """``path/to/config.py[:preset]``, or a packaged config by name (``demo:tiny``)."""
  path, _, preset = arg.partition(":")
  if not os.path.isfile(path):
    name = os.path.basename(path)
    name = name if name.endswith(".py") else name + ".py"
    path = os.path.join(_ROOT, "bssl", "configs", name)
  spec = importlib.util.spec_from_file_location("_bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def _timer(steps: int, warmup: int, repeats: int, batch: int):
  def timed(fn, n_images: int) -> dict:
    # Every window processes about steps x batch images, for scoring as for training.
    n = steps if n_images == batch else max(1, round(steps * batch / n_images))
    t0 = time.time()
    for _ in range(warmup):
      fn()
    first = time.time() - t0
    rates = []
    for _ in range(repeats):
      t0 = time.time()
      for _ in range(n):
        fn()
      rates.append(n * n_images / (time.time() - t0))
    return {
        "images_per_s": float(statistics.median(rates)),
        "windows": [float(r) for r in rates],
        "steps_per_window": n,
        "warmup_seconds": first,
    }

  return timed


def measure(framework: str, threads: str, opts: dict) -> dict:
  """One framework, one thread setting, in this (fresh) process."""
  tune_malloc()  # before the framework starts its threads, as every bssl command
  import numpy as np

  cfg = load_config(opts["config"])
  d = cfg.data
  shape = (d.image_size, d.image_size, d.channels)
  nc, mean, std = d.num_classes, tuple(d.mean), tuple(d.std)
  b = int(opts["batch"])
  sb = int(opts["score_batch"]) or int(cfg.score.batch_size)
  top_p = int(cfg.select.p)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (b, *shape), dtype=np.uint8)
  labels = rng.integers(0, nc, b).astype(np.int32)
  simages = rng.integers(0, 256, (sb, *shape), dtype=np.uint8)
  scfg = cfg.baseline.copy_and_resolve_references()  # the student (baseline = student arch)
  scfg.batch_size = b
  total = int(scfg.steps) if scfg.get("steps") else 1000
  tcfg = cfg.teacher
  timed = _timer(int(opts["steps"]), int(opts["warmup"]), int(opts["repeats"]), b)
  out: dict = {"framework": framework, "threads_setting": threads}

  if framework == "jax":
    import jax

    from bssl import parallel, train
    from bssl.backends import jax as jax_backend

    mesh = parallel.make_mesh(tuple(cfg.mesh_shape) or None)
    schedule = train.make_schedule(scfg, total, train.learning_rate(scfg, b))
    tx = train.make_optimizer(scfg, schedule)
    model = jax_backend.make_model(scfg, nc)
    state = train.init_state(model, tx, 0, shape, mesh)
    step = train.make_train_step(
        model,
        tx,
        mesh,
        num_classes=nc,
        mean=mean,
        std=std,
        schedule=schedule,
        bn_mode=scfg.get("bn_mode", "sync"),
        label_smoothing=scfg.get("label_smoothing", 0.0),
    )
    box = {"state": state}

    def train_once():
      batch = parallel.global_batch_from_local(mesh, {"image": images, "label": labels})
      box["state"], _ = step(box["state"], batch)
      jax.block_until_ready(box["state"].params)

    out["train"] = timed(train_once, b)
    tmodel = jax_backend.make_model(tcfg, nc)
    tvars = jax.jit(
        lambda r: tmodel.init(r, np.zeros((1, *shape), np.float32), train=False),
        out_shardings=parallel.replicated(mesh),
    )(jax.random.key(0, impl="rbg"))
    scorer = jax_backend.JaxScorer(tmodel, tvars, top_p, mean, std)
    out["num_threads"] = (
        "1 (XLA intra-op)" if threads == "1" else f"XLA default ({os.cpu_count()} cores)"
    )
    out["version"] = jax.__version__
  else:
    import torch

    from bssl.backends import torch as torch_backend

    torch.set_num_threads(1 if threads == "1" else (os.cpu_count() or 1))
    model = torch_backend.make_model(scfg, nc, d.channels, seed=0)
    opt = torch_backend.make_optimizer(model, scfg)
    lrs = torch_backend.lr_values(scfg, total, b)
    y = torch.from_numpy(labels.astype(np.int64))
    counter = {"i": 0}

    def train_once():
      x = torch_backend.to_input(images, mean, std)
      torch_backend.train_step(
          model,
          opt,
          x,
          y,
          lrs[counter["i"] % total],
          scfg.get("label_smoothing", 0.0),
          with_grad_norm=False,
      )
      counter["i"] += 1

    out["train"] = timed(train_once, b)
    tmodel = torch_backend.make_model(tcfg, nc, d.channels, seed=0)
    scorer = torch_backend._TorchScorer(tmodel, top_p, mean, std)  # the score stage's
    out["num_threads"] = torch.get_num_threads()
    out["version"] = torch.__version__

  def score_once():
    scorer.fetch(scorer.dispatch(simages))  # (classes, log-odds, finite) as numpy

  out["score"] = timed(score_once, sb)
  out.update(
      train_model=f"{scfg.model} {dict(scfg.model_kwargs or {})}",
      train_batch=b,
      score_model=f"{tcfg.model} {dict(tcfg.model_kwargs or {})}",
      score_batch=sb,
      top_p=top_p,
  )
  return out


def run(opts: dict, frameworks: list[str], thread_settings: list[str]) -> dict:
  """One fresh process per (threads, framework), one after the other."""
  results: dict = {}
  for threads in thread_settings:
    for fw in frameworks:
      env = dict(os.environ)
      if fw == "jax" and threads == "1":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + JAX_ONE_THREAD_FLAGS).strip()
      r = subprocess.run(
          [
              sys.executable,
              os.path.abspath(__file__),
              "--_measure",
              json.dumps([fw, threads, opts]),
          ],
          env=env,
          capture_output=True,
          text=True,
      )
      if r.returncode != 0:
        sys.exit(
            f"the {fw} speed benchmark ({threads} threads) failed (exit code {r.returncode}):\n"
            + r.stderr[-3000:]
        )
      res = json.loads(r.stdout.strip().splitlines()[-1])
      print(
          f"{NAMES[fw]} threads={threads}: train {res['train']['images_per_s']:.0f} img/s, "
          f"score {res['score']['images_per_s']:.0f} img/s",
          flush=True,
      )
      results.setdefault(threads, {})[fw] = res
  return results


def report(results: dict) -> str:
  """The table, and what was timed."""
  any_r = next(iter(next(iter(results.values())).values()))
  lines = [
      f"Images/s (median of {len(any_r['train']['windows'])} timed windows after warm-up), "
      f"each framework alone in a fresh process, {os.cpu_count()} CPU cores.",
      f"Train step: {any_r['train_model']} (the student), batch {any_r['train_batch']}, "
      f"{WHAT['train']}.",
      f"Scoring: {any_r['score_model']} (the teacher), batch {any_r['score_batch']}, "
      f"{WHAT['score']}, P = {any_r['top_p']}.",
      "",
      "| threads | framework | train step img/s | scoring img/s |",
      "|---|---|---|---|",
  ]
  for per in results.values():
    for fw, r in per.items():
      lines.append(
          f"| {r['num_threads']} | {NAMES[fw]} {r['version']} | "
          f"{r['train']['images_per_s']:.0f} | {r['score']['images_per_s']:.0f} |"
      )
  return "\n".join(lines)


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["--_measure"]:  # a worker process: one measurement, JSON on stdout
    fw, threads, opts = json.loads(argv[1])
    print(json.dumps(measure(fw, threads, opts)))
    return
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/demo.py:compare", help="config[:preset]")
  p.add_argument("--frameworks", default="jax,torch", help="comma-separated: jax, torch")
  p.add_argument("--threads", default="all,1", help="thread settings: all and/or 1")
  p.add_argument("--batch", type=int, default=128, help="train-step batch")
  p.add_argument("--score_batch", type=int, default=0, help="0: the config's score.batch_size")
  p.add_argument("--steps", type=int, default=10, help="timed train steps per window")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  p.add_argument("--repeats", type=int, default=3, help="windows; the median is reported")
  a = p.parse_args(argv)
  frameworks = [f for f in a.frameworks.split(",") if f]
  thread_settings = [t for t in a.threads.split(",") if t]
  if not frameworks or any(f not in NAMES for f in frameworks):
    p.error(f"--frameworks: give jax, torch or both, not {a.frameworks!r}")
  if not thread_settings or any(t not in ("all", "1") for t in thread_settings):
    p.error(f"--threads: give all, 1 or both, not {a.threads!r}")
  opts = dict(
      config=a.config,
      batch=a.batch,
      score_batch=a.score_batch,
      steps=a.steps,
      warmup=a.warmup,
      repeats=a.repeats,
  )
  t0 = time.time()
  results = run(opts, frameworks, thread_settings)
  print()
  print(report(results))
  print(
      json.dumps(
          {
              "config": a.config,
              "what": WHAT,
              "cpu_count": os.cpu_count(),
              "seconds": time.time() - t0,
              "results": results,
          }
      )
  )


if __name__ == "__main__":
  main()
