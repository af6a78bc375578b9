"""The same recipe in JAX and in PyTorch, side by side: a sweep over the backend axis.

The grid is the backends (``jax``, ``torch``: :func:`bssl.backends.create`) times the
seeds; each point is one engine run of the whole recipe (baseline, teacher, score, select,
pretrain, finetune, evaluate, report) in ``<workdir>/<backend>/seed_<s>``, on the same data
splits, the same batches (the same grain pipelines and seeds) and the same
hyperparameters: only the backend differs. Unlike a config sweep the points share no
stage (every stage depends on the backend), and the backends run as two lanes: by default
the PyTorch points in a second process beside the JAX ones (``parallel``). Each point
resumes where it stopped when the comparison is rerun. The report (``compare.json``,
``compare.md``) is :mod:`bssl.sweep.compare_report`'s.

Speed is not measured here: ``benchmarks/framework_speed.py`` times the same work in both
frameworks.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time

import jax
import ml_collections
from absl import logging

from bssl import config as config_lib
from bssl import engine, hostmem, selection
from bssl.sweep import compare_report

BACKENDS = tuple(compare_report.NAMES)  # the backend axis: ("jax", "torch")
STAGES = "baseline,teacher,score,select,pretrain,finetune,evaluate,report"


def _log(msg: str) -> None:
  print(f"[compare] {msg}", flush=True)


def _finite_or_none(obj):
  """NaN/inf (e.g. the standard deviation of one seed) -> None: compare.json stays JSON."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: _finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite_or_none(v) for v in obj]
  return obj


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(
        _finite_or_none(json.loads(json.dumps(obj, default=float))),
        f,
        indent=2,
        sort_keys=True,
        allow_nan=False,
    )
  os.replace(tmp, path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def point_dir(workdir: str, backend: str, seed: int) -> str:
  """The folder of the point (``backend``, ``seed``): ``<workdir>/<backend>/seed_<seed>``."""
  return os.path.join(workdir, backend, f"seed_{seed}")


def set_jax_cache(workdir: str) -> None:
  """Persistent compilation cache, also for spawned processes (they read the env)."""
  d = os.path.join(os.path.abspath(workdir), "jax_cache")
  os.makedirs(d, exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = d
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def run_point(cfg, workdir: str, backend: str, seed: int, threads: int | None = None) -> dict:
  """The whole recipe for one (backend, seed) point through the engine (it skips what is
  complete); returns the point's ``report/results.json``. ``threads``: the PyTorch
  backend's ``torch.set_num_threads``."""
  wd = point_dir(workdir, backend, seed)
  label = compare_report.NAMES[backend]
  c = compare_report.seed_config(cfg, seed)
  c.stages = STAGES
  t0 = time.time()
  _log(f"{label} seed {seed}: running the recipe in {wd}")
  options = {"threads": threads} if backend == "torch" else None
  engine.run_recipe(c, wd, backend=backend, backend_options=options)
  _log(f"{label} seed {seed}: done in {time.time() - t0:.0f}s")
  return _read_json(os.path.join(wd, "report", "results.json"))


def _torch_lane(cfg_dict: dict, workdir: str, seeds: list[int], threads: int | None) -> None:
  """Entry of the process that runs the PyTorch points beside the JAX ones."""
  hostmem.tune_malloc()  # what every bssl command does, in every process of the comparison
  logging.set_verbosity(logging.WARNING)
  cfg = ml_collections.ConfigDict(cfg_dict)
  t0 = time.time()
  for s in seeds:
    run_point(cfg, workdir, "torch", s, threads)
  _write_json(os.path.join(workdir, "torch", "lane.json"), {"seconds": time.time() - t0})


def check_backends(frameworks: list[str]) -> None:
  bad = [f for f in frameworks if f not in BACKENDS]
  if bad or not frameworks:
    raise config_lib.ConfigError(f"--frameworks: unknown {bad or frameworks}; accepted: jax, torch")


def compare(
    cfg,
    workdir: str,
    *,
    seeds: list[int],
    frameworks: list[str],
    parallel: bool = True,
    torch_threads: int = 1,
    jax_cache: bool = True,
    config_name: str = "",
) -> dict:
  """Runs every (backend, seed) point (``frameworks``: the backends), then writes
  ``compare.json`` and ``compare.md`` in ``workdir`` and returns the report. ``parallel``:
  the PyTorch points in a second process beside the JAX ones; ``torch_threads``: PyTorch's
  intra-op threads (0: its default); ``jax_cache``: a persistent XLA compilation cache in
  ``<workdir>/jax_cache`` (seeds after the first reuse the compiled steps)."""
  check_backends(frameworks)
  config_lib.validate(cfg)
  if "torch" in frameworks:
    from bssl.backends import torch as torch_backend  # PyTorch: heavy and optional

    torch_backend.check_config(cfg)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax_cache:
    set_jax_cache(workdir)
  _write_json(os.path.join(workdir, "config.json"), json.loads(config_lib.to_json(cfg)))
  t_all = time.time()
  timings: dict = {}
  results: dict = {fw: {} for fw in frameworks}
  side = None
  lane_parallel = parallel and "jax" in frameworks and "torch" in frameworks
  threads = torch_threads or None
  if lane_parallel:
    lane_json = os.path.join(workdir, "torch", "lane.json")
    if os.path.exists(lane_json):
      os.remove(lane_json)
    side = multiprocessing.get_context("spawn").Process(
        target=_torch_lane, args=(cfg.to_dict(), workdir, seeds, threads), name="bssl-torch"
    )
    side.start()
    _log(
        f"PyTorch seeds {seeds} running in a second process (pid {side.pid}, "
        f"{threads} thread(s)) beside the JAX seeds"
    )
  if "jax" in frameworks:
    t0 = time.time()
    try:
      for s in seeds:
        results["jax"][s] = run_point(cfg, workdir, "jax", s)
    except BaseException:
      if side is not None and side.is_alive():
        side.terminate()  # the PyTorch process this call started; a rerun resumes both
        side.join()
      raise
    timings["jax_lane"] = time.time() - t0
  if side is not None:
    side.join()
    if side.exitcode != 0:
      raise RuntimeError(
          f"the PyTorch process failed (exit code {side.exitcode}); rerun the "
          f"same command to resume, or use --noparallel to see the error here"
      )
    timings["torch_lane"] = _read_json(os.path.join(workdir, "torch", "lane.json"))["seconds"]
    for s in seeds:
      results["torch"][s] = _read_json(
          os.path.join(point_dir(workdir, "torch", s), "report", "results.json")
      )
  elif "torch" in frameworks:
    t0 = time.time()
    for s in seeds:
      results["torch"][s] = run_point(cfg, workdir, "torch", s, threads)
    timings["torch_lane"] = time.time() - t0
  timings["training_and_evaluation"] = time.time() - t_all
  timings["total"] = time.time() - t_all
  sels = {
      (fw, s): selection.read_selection(os.path.join(point_dir(workdir, fw, s), "select", "dhat"))
      for fw in frameworks
      for s in seeds
  }
  overlap = compare_report.dhat_overlaps(cfg, sels, seeds, frameworks)
  rep = compare_report.build_report(cfg, seeds, frameworks, results, overlap, timings, config_name)
  _write_json(os.path.join(workdir, "compare.json"), rep)
  md = compare_report.to_markdown(rep)
  with open(os.path.join(workdir, "compare.md"), "w") as f:
    f.write(md)
  _log(f"wrote {os.path.join(workdir, 'compare.json')} and compare.md in {timings['total']:.0f}s")
  print(md, flush=True)
  return rep
