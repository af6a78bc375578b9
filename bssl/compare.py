"""The same recipe in JAX and in PyTorch, side by side, over several seeds.

    python -m bssl.compare --config=configs/demo.py:compare --workdir=runs/compare
    python -m bssl.compare --config=configs/demo.py:tiny --workdir=/tmp/c --seeds=0,1

For every seed, the JAX pipeline (:func:`bssl.pipeline.run`, all stages) runs in
``<workdir>/jax/seed_<s>`` and its PyTorch twin (:func:`bssl.torch_train.run`) in
``<workdir>/torch/seed_<s>``, on the same data splits, the same batches (the same grain
pipelines and seeds) and the same hyperparameters. By default the PyTorch seeds run in a
second process beside the JAX ones (``--parallel``; each lane resumes where it stopped
when the command is rerun). Then a speed benchmark measures, framework by framework in
fresh processes on this machine, train-step images/s (the student, ``--speed_batch``
images) and scoring images/s (the teacher, the config's scoring batch), and the results
go to ``<workdir>/compare.json`` and ``<workdir>/compare.md``:

* per stage (baseline, teacher, pre-trained student, fine-tuned student: test top-1 and
  top-5; D̂'s label precision; the student's gain over the baseline): the mean ± sample
  standard deviation over seeds of each framework, the difference (PyTorch − JAX) and
  whether the two agree within seed noise. The rule: **agree when |mean difference| ≤
  2 × the standard error of that difference**, ``sqrt(s_jax²/n_jax + s_torch²/n_torch)``
  (seeds are independent replicates; n ≥ 2 per framework is needed);
* the overlap of the two teachers' D̂ for each seed: the Jaccard index of the sets of
  (image id, class) rows; for reference, the same index between two seeds of one
  framework (computed on the images the two seeds' U have in common) says how much D̂
  moves with the seed alone;
* the speeds, with the number of threads each framework used.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags, logging

STAGE_KEYS = ("baseline", "teacher", "student_pretrained", "student")
FRAMEWORK_NAMES = {"jax": "JAX", "torch": "PyTorch"}
JAX_ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


# ----------------------------------------------------------------------------- flags


F: dict = {}  # the command-line flags, defined only when run as a program


def define_flags() -> None:
  from bssl import main as bssl_main  # --config and --workdir, the same flags as bssl.main

  F["config"], F["workdir"] = bssl_main._CONFIG, bssl_main._WORKDIR
  F["seeds"] = flags.DEFINE_list(
      "seeds", ["0", "1", "2"], "Seeds (each: data split, initialisation, batches)."
  )
  F["frameworks"] = flags.DEFINE_list(
      "frameworks", ["jax", "torch"], "Frameworks to run: jax, torch."
  )
  F["parallel"] = flags.DEFINE_bool(
      "parallel", True, "Run the PyTorch seeds in a second process beside the JAX ones."
  )
  F["torch_threads"] = flags.DEFINE_integer(
      "torch_threads",
      1,
      "torch.set_num_threads for the PyTorch recipe (0: PyTorch's default, "
      "one per core; on a shared CPU its OpenMP threads slow down badly under contention).",
  )
  F["speed"] = flags.DEFINE_bool("speed", True, "Run the speed benchmark.")
  F["speed_batch"] = flags.DEFINE_integer("speed_batch", 128, "Train-step batch of the benchmark.")
  F["speed_score_batch"] = flags.DEFINE_integer(
      "speed_score_batch", 0, "Scoring batch of the benchmark; 0: the config's score.batch_size."
  )
  F["speed_steps"] = flags.DEFINE_integer(
      "speed_steps",
      10,
      "Timed train steps per measurement window (scoring: as many batches "
      "as make the same number of images).",
  )
  F["speed_warmup"] = flags.DEFINE_integer(
      "speed_warmup", 3, "Untimed steps first (compilation, caches)."
  )
  F["speed_repeats"] = flags.DEFINE_integer(
      "speed_repeats", 3, "Measurement windows; the median is reported."
  )
  F["speed_threads"] = flags.DEFINE_list(
      "speed_threads",
      ["all", "1"],
      "Thread settings to benchmark: 'all' (every core: XLA's "
      "default, torch.set_num_threads(cpu count)) and/or '1' (one intra-op thread each).",
  )
  F["jax_cache"] = flags.DEFINE_bool(
      "jax_cache",
      True,
      "Persistent XLA compilation cache in <workdir>/jax_cache (seeds after "
      "the first reuse the compiled steps).",
  )


# ----------------------------------------------------------------------------- helpers


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


def seed_config(cfg, seed: int):
  import ml_collections

  c = ml_collections.ConfigDict(cfg.to_dict())
  c.seed = int(seed)
  return c


def jax_dir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, "jax", f"seed_{seed}")


def torch_dir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, "torch", f"seed_{seed}")


def set_jax_cache(workdir: str) -> None:
  """Persistent compilation cache, also for spawned processes (they read the env)."""
  d = os.path.join(os.path.abspath(workdir), "jax_cache")
  os.makedirs(d, exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = d
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  import jax

  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# ----------------------------------------------------------------------------- the two lanes


def _run_seed(cfg, wd: str, seed: int, backend=None, label: str = "JAX") -> dict:
  """The whole recipe for one seed through the engine (it skips what is complete)."""
  from bssl import engine

  c = seed_config(cfg, seed)
  c.stages = "baseline,teacher,score,select,pretrain,finetune,evaluate,report"
  t0 = time.time()
  _log(f"{label} seed {seed}: running the recipe in {wd}")
  engine.run_recipe(c, wd, backend=backend(c) if backend else None)
  _log(f"{label} seed {seed}: done in {time.time() - t0:.0f}s")
  return _read_json(os.path.join(wd, "report", "results.json"))


def run_jax_seed(cfg, workdir: str, seed: int) -> dict:
  return _run_seed(cfg, jax_dir(workdir, seed), seed)


def run_torch_seed(cfg, workdir: str, seed: int, threads: int | None) -> dict:
  from bssl import torch_train

  return _run_seed(
      cfg,
      torch_dir(workdir, seed),
      seed,
      label="PyTorch",
      backend=lambda c: torch_train.TorchBackend(c, threads),
  )


def _torch_lane(cfg_dict: dict, workdir: str, seeds: list[int], threads: int | None) -> None:
  """Entry of the process that runs the PyTorch seeds beside the JAX ones."""
  from bssl import hostmem

  hostmem.tune_malloc()  # what bssl.main does, in every process of the comparison
  import ml_collections

  logging.set_verbosity(logging.WARNING)
  cfg = ml_collections.ConfigDict(cfg_dict)
  t0 = time.time()
  for s in seeds:
    run_torch_seed(cfg, workdir, s, threads)
  _write_json(os.path.join(workdir, "torch", "lane.json"), {"seconds": time.time() - t0})


# ----------------------------------------------------------------------------- speed


def _speed_worker(framework: str, threads: str, cfg_dict: dict, opts: dict, out_path: str) -> None:
  """Runs in a fresh process (so that the thread settings take effect before the
  framework starts): the train step of the student and the scoring step of the teacher
  on fixed random uint8 batches, timed after warm-up."""
  from bssl import hostmem

  hostmem.tune_malloc()  # what bssl.main does, in every process of the comparison
  import ml_collections
  import numpy as np

  logging.set_verbosity(logging.WARNING)
  cfg = ml_collections.ConfigDict(cfg_dict)
  d = cfg.data
  shape = (d.image_size, d.image_size, d.channels)
  nc, mean, std = d.num_classes, tuple(d.mean), tuple(d.std)
  b, sb = int(opts["batch"]), int(opts["score_batch"])
  steps, warmup, repeats = int(opts["steps"]), int(opts["warmup"]), int(opts["repeats"])
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (b, *shape), dtype=np.uint8)
  labels = rng.integers(0, nc, b).astype(np.int32)
  simages = rng.integers(0, 256, (sb, *shape), dtype=np.uint8)
  scfg = cfg.baseline.copy_and_resolve_references()  # the student (baseline = student arch)
  scfg.batch_size = b
  total = int(scfg.steps) if scfg.get("steps") else 1000
  tcfg = cfg.teacher
  out: dict = {"framework": framework, "threads_setting": threads}

  def timed(fn, n_images: int) -> dict:
    # Every window processes about steps x batch images, for scoring as for training.
    n = steps if n_images == b else max(1, round(steps * b / n_images))
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
        "images_per_s": float(np.median(rates)),
        "windows": [float(r) for r in rates],
        "steps_per_window": n,
        "warmup_seconds": first,
    }

  if framework == "jax":
    import jax

    from bssl import backend, parallel, train

    mesh = parallel.make_mesh(tuple(cfg.mesh_shape) or None)
    schedule = train.make_schedule(scfg, total, train.learning_rate(scfg, b))
    tx = train.make_optimizer(scfg, schedule)
    model = backend.make_model(scfg, nc)
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
    tmodel = backend.make_model(tcfg, nc)
    tvars = jax.jit(
        lambda r: tmodel.init(r, np.zeros((1, *shape), np.float32), train=False),
        out_shardings=parallel.replicated(mesh),
    )(jax.random.key(0, impl="rbg"))
    scorer = backend.JaxScorer(tmodel, tvars, int(cfg.select.p), mean, std)

    def score_once():
      scorer.fetch(scorer.dispatch(simages))

    out["score"] = timed(score_once, sb)
    out["num_threads"] = (
        "1 (XLA intra-op)" if threads == "1" else f"XLA default ({os.cpu_count()} cores)"
    )
    out["version"] = jax.__version__
  else:
    import torch

    from bssl import torch_train

    torch.set_num_threads(1 if threads == "1" else (os.cpu_count() or 1))
    model = torch_train.make_model(scfg, nc, d.channels, seed=0)
    opt = torch_train.make_optimizer(model, scfg)
    lrs = torch_train.lr_values(scfg, total, b)
    y = torch.from_numpy(labels.astype(np.int64))
    counter = {"i": 0}

    def train_once():
      x = torch_train.to_input(images, mean, std)
      torch_train.train_step(
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
    tmodel = torch_train.make_model(tcfg, nc, d.channels, seed=0).eval()

    @torch.inference_mode()
    def score_once():
      logits = tmodel(torch_train.to_input(simages, mean, std)).float()
      s, c = torch.softmax(logits, -1).topk(int(cfg.select.p), dim=-1)
      s.numpy(), c.numpy()

    out["score"] = timed(score_once, sb)
    out["num_threads"] = torch.get_num_threads()
    out["version"] = torch.__version__
  out.update(
      train_model=f"{scfg.model} {dict(scfg.model_kwargs or {})}",
      train_batch=b,
      score_model=f"{tcfg.model} {dict(tcfg.model_kwargs or {})}",
      score_batch=sb,
  )
  _write_json(out_path, out)


def run_speed(
    cfg, workdir: str, frameworks: list[str], thread_settings: list[str], opts: dict
) -> dict:
  """One fresh process per (threads, framework), one after the other."""
  import multiprocessing

  ctx = multiprocessing.get_context("spawn")
  results: dict = {}
  for threads in thread_settings:
    for fw in frameworks:
      path = os.path.join(workdir, "speed", f"{fw}_threads_{threads}.json")
      if os.path.exists(path):
        os.remove(path)
      old = os.environ.get("XLA_FLAGS")
      if fw == "jax" and threads == "1":
        os.environ["XLA_FLAGS"] = ((old or "") + " " + JAX_ONE_THREAD_FLAGS).strip()
      try:
        p = ctx.Process(
            target=_speed_worker,
            args=(fw, threads, cfg.to_dict(), opts, path),
            name=f"bssl-speed-{fw}-{threads}",
        )
        p.start()
      finally:
        if old is None:
          os.environ.pop("XLA_FLAGS", None)
        else:
          os.environ["XLA_FLAGS"] = old
      p.join()
      if p.exitcode != 0 or not os.path.exists(path):
        raise RuntimeError(
            f"the {fw} speed benchmark ({threads} threads) failed " f"(exit code {p.exitcode})"
        )
      r = _read_json(path)
      _log(
          f"speed {FRAMEWORK_NAMES[fw]} threads={threads}: train "
          f"{r['train']['images_per_s']:.0f} img/s, score {r['score']['images_per_s']:.0f} img/s"
      )
      results.setdefault(threads, {})[fw] = r
  return results


# ----------------------------------------------------------------------------- statistics


def summarize(values: list[float]) -> dict:
  import numpy as np

  v = np.asarray(values, np.float64)
  n = len(v)
  return {
      "mean": float(v.mean()) if n else float("nan"),
      "std": float(v.std(ddof=1)) if n > 1 else float("nan"),
      "n": n,
      "values": [float(x) for x in v],
  }


def agreement(a: dict, b: dict) -> dict:
  """b − a, its standard error from the two seed spreads, and the 2-SE verdict. Also, when
  both have the same seeds, the paired view (same seed = same D and same batches): the
  mean and standard error of the per-seed differences."""
  import numpy as np

  diff = b["mean"] - a["mean"]
  out: dict = {"diff": diff, "se": float("nan"), "agree": None}
  if a["n"] >= 2 and b["n"] >= 2:
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    out.update(se=se, agree=bool(abs(diff) <= 2 * se))
  if a["n"] == b["n"] >= 2:
    d = np.asarray(b["values"]) - np.asarray(a["values"])
    out["paired"] = {
        "mean_diff": float(d.mean()),
        "se": float(d.std(ddof=1) / math.sqrt(len(d))),
        "per_seed_diff": [float(x) for x in d],
    }
  return out


def _pairs(sel, num_classes: int, id_map=None):
  import numpy as np

  ids = np.asarray(sel.ids, np.int64)
  if id_map is not None:
    ids = id_map[ids]
  return ids * num_classes + np.asarray(sel.classes, np.int64)


def jaccard(a, b) -> dict:
  import numpy as np

  inter = len(np.intersect1d(a, b))
  union = len(np.union1d(a, b))
  return {
      "jaccard": inter / union if union else 1.0,
      "intersection": inter,
      "union": union,
      "rows_a": int(len(a)),
      "rows_b": int(len(b)),
  }


def _u_to_train_index(cfg):
  """U's ids -> indices into the training split (``rest_of_train`` only), so that the D̂ of
  two seeds (different D, hence different U) can be compared image by image. U is the
  training images outside D and the validation split, in index order (cut to its first
  ``limit``): its first len(U) members are all below len(D) + len(val) + len(U)."""
  import numpy as np

  from bssl.data import recipe

  if cfg.unlabelled.kind != "rest_of_train":
    return None
  data = recipe.build_data(cfg)
  taken = np.concatenate(
      [np.asarray(data.splits["labelled"], np.int64), np.asarray(data.splits["val"], np.int64)]
  )
  n = len(taken) + len(data.unlabelled)
  return np.setdiff1d(np.arange(n), taken)[: len(data.unlabelled)]


def dhat_overlaps(cfg, workdir: str, seeds: list[int], frameworks: list[str]) -> dict:
  import numpy as np

  from bssl import selection

  nc = cfg.data.num_classes
  sels = {}
  for fw in frameworks:
    for s in seeds:
      base = jax_dir(workdir, s) if fw == "jax" else torch_dir(workdir, s)
      sels[fw, s] = selection.read_selection(os.path.join(base, "select", "dhat"))
  out: dict = {"per_seed": {}}
  if set(frameworks) >= {"jax", "torch"}:
    for s in seeds:
      out["per_seed"][str(s)] = jaccard(_pairs(sels["jax", s], nc), _pairs(sels["torch", s], nc))
    out["jax_vs_torch"] = summarize([v["jaccard"] for v in out["per_seed"].values()])
  # Reference: two seeds of the same framework, on the images both seeds' U contain.
  maps = {s: _u_to_train_index(seed_config(cfg, s)) for s in seeds}
  if len(seeds) >= 2 and all(m is not None for m in maps.values()):
    ref: dict = {}
    for fw in frameworks:
      vals = []
      for i, s in enumerate(seeds):
        for t in seeds[i + 1 :]:
          common = np.intersect1d(maps[s], maps[t])
          pa = _pairs(sels[fw, s], nc, maps[s])
          pb = _pairs(sels[fw, t], nc, maps[t])
          pa = pa[np.isin(pa // nc, common)]
          pb = pb[np.isin(pb // nc, common)]
          vals.append(jaccard(pa, pb)["jaccard"])
      ref[fw] = summarize(vals)
    out["between_seeds_same_framework"] = ref
  return out


def build_report(
    cfg,
    workdir: str,
    seeds: list[int],
    frameworks: list[str],
    results: dict,
    speed: dict | None,
    timings: dict,
    config_name: str,
) -> dict:
  metrics: dict = {}
  rows = [(k, m) for k in STAGE_KEYS for m in ("top1", "top5")]
  for key, m in rows + [("dhat_label_precision", None), ("gain_top1", None)]:
    name = key if m is None else f"{key}_{m}"
    entry: dict = {}
    for fw in frameworks:
      vals = []
      for s in seeds:
        r = results[fw][s]
        if key == "dhat_label_precision":
          v = r.get("selection", {}).get("label_precision")
        elif key == "gain_top1":
          v = r["student"]["top1"] - r["baseline"]["top1"]
        else:
          v = r[key][m]
        if v is not None:
          vals.append(float(v))
      entry[fw] = summarize(vals)
    if set(frameworks) >= {"jax", "torch"}:
      entry.update(agreement(entry["jax"], entry["torch"]))
    metrics[name] = entry
  report = {
      "config": config_name,
      "seeds": seeds,
      "frameworks": frameworks,
      "rule": "agree: |mean(torch) - mean(jax)| <= 2 * sqrt(s_jax^2/n_jax + s_torch^2/n_torch)"
      " (s: sample std over seeds; n: seeds)",
      "metrics": metrics,
      "dhat_overlap": dhat_overlaps(cfg, workdir, seeds, frameworks),
      "speed": speed,
      "wall_seconds": timings,
      "per_seed": {fw: {str(s): results[fw][s] for s in seeds} for fw in frameworks},
      "schedule": {
          st: {
              "steps": cfg[st].get("steps"),
              "batch_size": cfg[st].batch_size,
              "lr": cfg[st].get("lr"),
          }
          for st in ("baseline", "teacher", "pretrain", "finetune")
      },
      "select": {"k": int(cfg.select.k), "p": int(cfg.select.p)},
  }
  stage_agree = [metrics[f"{k}_{m}"].get("agree") for k, m in rows]
  report["all_stages_agree"] = None if any(a is None for a in stage_agree) else all(stage_agree)
  return report


# ----------------------------------------------------------------------------- markdown


def _pct(s: dict) -> str:
  if not s or not s.get("n"):
    return "—"
  if s["n"] < 2:
    return f"{100 * s['mean']:.2f}"
  return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def to_markdown(rep: dict) -> str:
  fws = rep["frameworks"]
  both = set(fws) >= {"jax", "torch"}
  seeds = ", ".join(str(s) for s in rep["seeds"])
  lines = [
      f"# JAX vs PyTorch: the same recipe ({rep['config']}, seeds {seeds})",
      "",
      "Test top-1 / top-5 (%), mean ± standard deviation over seeds. Both frameworks read "
      "the same data splits and the same batches (the same grain pipelines and seeds) "
      "with the same hyperparameters. Δ = PyTorch − JAX (points); "
      "agree: |Δ| ≤ 2 × SE(Δ), SE(Δ) = √(s²_JAX/n + s²_PyTorch/n).",
      "",
  ]
  head = "| stage | metric | " + " | ".join(FRAMEWORK_NAMES[f] for f in fws)
  if both:
    head += " | Δ | 2 × SE | agree"
  lines += [head + " |", "|" + "---|" * (2 + len(fws) + (3 if both else 0))]
  names = [(f"{k}_{m}", k, f"top-{m[-1]}") for k in STAGE_KEYS for m in ("top1", "top5")]
  names += [
      ("dhat_label_precision", "D̂", "label precision"),
      ("gain_top1", "student − baseline", "top-1 gain"),
  ]
  for name, stage, metric in names:
    e = rep["metrics"][name]
    row = f"| {stage} | {metric} | " + " | ".join(_pct(e[f]) for f in fws)
    if both:
      agree = {True: "yes", False: "**no**", None: "n/a"}[e.get("agree")]
      se2 = "—" if not math.isfinite(e["se"]) else f"{200 * e['se']:.2f}"
      row += f" | {100 * e['diff']:+.2f} | {se2} | {agree}"
    lines.append(row + " |")
  if both:
    verdict = {
        True: "all four models agree within seed noise on top-1 and top-5",
        False: "at least one model does NOT agree within seed noise",
        None: "n/a",
    }
    lines += ["", f"Verdict: {verdict[rep['all_stages_agree']]}."]
  ov = rep["dhat_overlap"]
  if ov.get("per_seed"):
    lines += [
        "",
        "## Overlap of the two teachers' D̂",
        "",
        "Jaccard index of the (image id, class) rows of D̂ selected by the JAX teacher "
        "and by the PyTorch teacher of the same seed (same D, same U).",
        "",
        "| seed | JAX rows | PyTorch rows | common | Jaccard |",
        "|---|---|---|---|---|",
    ]
    for s, v in ov["per_seed"].items():
      lines.append(
          f"| {s} | {v['rows_a']:,} | {v['rows_b']:,} | {v['intersection']:,} | "
          f"{v['jaccard']:.3f} |"
      )
    j = ov["jax_vs_torch"]
    lines.append(
        f"| mean | | | | {j['mean']:.3f}" + (f" ± {j['std']:.3f}" if j["n"] > 1 else "") + " |"
    )
  ref = ov.get("between_seeds_same_framework")
  if ref:
    lines += [
        "",
        "For reference, the same index between teachers of two different seeds of one "
        "framework (on the images the two seeds' U share): "
        + "; ".join(f"{FRAMEWORK_NAMES[f]} {v['mean']:.3f}" for f, v in ref.items())
        + ".",
    ]
  sp = rep.get("speed")
  if sp:
    any_r = next(iter(next(iter(sp.values())).values()))
    lines += [
        "",
        "## Speed on this machine",
        "",
        f"Images/s (median of {len(any_r['train']['windows'])} timed windows after "
        f"warm-up), each framework alone in a fresh process. Train step: "
        f"{any_r['train_model']} (the student), batch {any_r['train_batch']}, forward + "
        f"backward + SGD update. Scoring: {any_r['score_model']} (the teacher), batch "
        f"{any_r['score_batch']}, forward + softmax + top-P, results on the host. "
        f"{os.cpu_count()} CPU cores.",
        "",
        "| threads | framework | train step img/s | scoring img/s |",
        "|---|---|---|---|",
    ]
    for _threads, per in sp.items():
      for fw, r in per.items():
        lines.append(
            f"| {r['num_threads']} | {FRAMEWORK_NAMES[fw]} {r['version']} | "
            f"{r['train']['images_per_s']:.0f} | {r['score']['images_per_s']:.0f} |"
        )
  t = rep.get("wall_seconds") or {}
  if t:
    lines += [
        "",
        "Wall time: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in t.items() if v is not None)
        + ".",
    ]
  sched = rep.get("schedule") or {}
  if sched:
    lines += [
        "",
        "Schedule: "
        + ", ".join(f"{k} {v['steps']} steps × {v['batch_size']}" for k, v in sched.items())
        + f"; K = {rep['select']['k']}, P = {rep['select']['p']}.",
    ]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def compare(
    cfg,
    workdir: str,
    *,
    seeds: list[int],
    frameworks: list[str],
    parallel: bool = True,
    torch_threads: int = 1,
    speed: bool = True,
    speed_opts: dict | None = None,
    speed_threads: list[str] | None = None,
    jax_cache: bool = True,
    config_name: str = "",
) -> dict:
  from bssl import config as config_lib

  bad = [f for f in frameworks if f not in FRAMEWORK_NAMES]
  if bad or not frameworks:
    raise config_lib.ConfigError(f"--frameworks: unknown {bad or frameworks}; accepted: jax, torch")
  config_lib.validate(cfg)
  if "torch" in frameworks:
    from bssl import torch_train

    torch_train.check_config(cfg)
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
    import multiprocessing

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
        results["jax"][s] = run_jax_seed(cfg, workdir, s)
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
          os.path.join(torch_dir(workdir, s), "report", "results.json")
      )
  elif "torch" in frameworks:
    t0 = time.time()
    for s in seeds:
      results["torch"][s] = run_torch_seed(cfg, workdir, s, threads)
    timings["torch_lane"] = time.time() - t0
  timings["training_and_evaluation"] = time.time() - t_all
  speed_res = None
  if speed:
    t0 = time.time()
    opts = dict(batch=128, score_batch=int(cfg.score.batch_size), steps=10, warmup=3, repeats=3)
    opts.update({k: v for k, v in (speed_opts or {}).items() if v})
    speed_res = run_speed(cfg, workdir, frameworks, speed_threads or ["all", "1"], opts)
    timings["speed_benchmark"] = time.time() - t0
  timings["total"] = time.time() - t_all
  rep = build_report(cfg, workdir, seeds, frameworks, results, speed_res, timings, config_name)
  _write_json(os.path.join(workdir, "compare.json"), rep)
  md = to_markdown(rep)
  with open(os.path.join(workdir, "compare.md"), "w") as f:
    f.write(md)
  _log(f"wrote {os.path.join(workdir, 'compare.json')} and compare.md in {timings['total']:.0f}s")
  print(md, flush=True)
  return rep


def main(argv):
  from bssl import main as bssl_main

  fail = bssl_main.fail
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  bssl_main.config_and_workdir("--workdir is required (the comparison's folder)")
  v = {k: f.value for k, f in F.items()}
  logging.set_verbosity(logging.WARNING)  # orbax's per-checkpoint INFO lines
  try:
    seeds = [int(s) for s in v["seeds"]]
  except ValueError:
    fail(f"--seeds must be integers, got {','.join(v['seeds'])}")
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    fail(f"--seeds must be distinct non-negative integers, got {','.join(v['seeds'])}")
  bad = [fw for fw in v["frameworks"] if fw not in FRAMEWORK_NAMES]
  if bad or not v["frameworks"]:
    fail(f"--frameworks: {','.join(bad) or '(none)'} not accepted; give jax, torch or both")
  config_name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  speed_opts = dict(
      batch=v["speed_batch"],
      score_batch=v["speed_score_batch"],
      steps=v["speed_steps"],
      warmup=v["speed_warmup"],
      repeats=v["speed_repeats"],
  )
  try:
    compare(
        v["config"],
        v["workdir"],
        seeds=seeds,
        frameworks=list(v["frameworks"]),
        parallel=v["parallel"],
        torch_threads=v["torch_threads"],
        speed=v["speed"],
        speed_opts=speed_opts,
        speed_threads=list(v["speed_threads"]),
        jax_cache=v["jax_cache"],
        config_name=config_name,
    )
  except bssl_main.user_errors() as e:  # one line, exit 2
    fail(str(e))


def run():
  """The ``bssl-compare`` console command (= ``python -m bssl.compare``)."""
  from bssl import main as bssl_main  # (tunes malloc before JAX starts, as bssl.main)

  define_flags()
  app.run(main, flags_parser=bssl_main.parse_flags)


if __name__ == "__main__":
  run()
