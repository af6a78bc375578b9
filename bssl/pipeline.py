"""The recipe's stages in order; each is skipped when its artifact is complete.

Work directory layout (each stage reads the artifacts of the stages before it)::

  config.json                 the resolved config
  splits.json                 which training images are D, validation and U (demo)
  baseline/ teacher/ pretrain/ finetune/
      checkpoints/ tb/ final/ (params + batch_stats) done.json (val metrics, timing)
  score/    process_<i>.state.npz (resumable), process_<i>.final.npz, done.json
  select/   dhat/ (ids.npy classes.npy scores.npy ranks.npy, stats), done.json
  evaluate/ done.json (test top-1/top-5 of every model)
  report/   results.json results.md selected_images.png class_histogram.png
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bssl import config_lib, jsonio, models, parallel, scoring, selection, train
from bssl.data import pipelines, sources


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
  labelled: Any          # D
  val: Any | None        # carved from the training data, for choosing hyperparameters
  test: Any              # never used to choose anything
  unlabelled: Any        # U (record ids = positions in U)
  unlabelled_true_labels: np.ndarray | None
  spec: pipelines.ImageSpec
  class_names: tuple
  splits: dict


def build_data(cfg) -> Data:
  """Opens the sources (cheap: no training) and fails clearly when data is missing."""
  d = cfg.data
  spec = pipelines.ImageSpec(size=d.image_size, channels=d.channels, augment=d.augment,
                             eval_transform=d.eval_transform, pad=d.get("pad", 4))
  rng = np.random.default_rng(cfg.seed)
  splits: dict = {}
  val = None
  if d.kind in ("fashion_mnist", "fake"):
    if d.kind == "fashion_mnist":
      train_all, test = sources.load_fashion_mnist(d.folder)
    else:
      shape = (d.image_size, d.image_size, d.channels)
      train_all = sources.fake_source(d.fake_train_size, shape, d.num_classes, seed=1)
      test = sources.fake_source(d.fake_test_size, shape, d.num_classes, seed=2)
    if d.get("subset"):
      train_all = train_all.subset(np.arange(min(d.subset, len(train_all))))
      test = test.subset(np.arange(min(max(d.subset // 4, 1), len(test))))
    if d.labelled_per_class:
      lab_idx = sources.class_balanced_indices(train_all.labels, d.labelled_per_class,
                                               d.num_classes, rng)
    else:
      lab_idx = np.arange(len(train_all))
    val_idx = np.zeros(0, np.int64)
    if d.val_per_class:
      val_idx = sources.class_balanced_indices(train_all.labels, d.val_per_class,
                                               d.num_classes, rng, exclude=lab_idx)
      val = train_all.subset(val_idx)
    labelled = train_all.subset(lab_idx)
    rest = np.setdiff1d(np.arange(len(train_all)), np.concatenate([lab_idx, val_idx]))
    splits = {"labelled": lab_idx.tolist(), "val": val_idx.tolist(),
              "unlabelled": "the other training images, in index order"}
    class_names = train_all.class_names
  else:  # tfds
    labelled = sources.TFDSSource(d.tfds_name, d.train_split, d.tfds_data_dir)
    test = sources.TFDSSource(d.tfds_name, d.test_split, d.tfds_data_dir)
    if d.get("val_split"):
      val = sources.TFDSSource(d.tfds_name, d.val_split, d.tfds_data_dir)
    class_names = labelled.class_names or tuple(str(c) for c in range(d.num_classes))
    rest = None

  u = cfg.unlabelled
  true_u = None
  if u.kind == "rest_of_train":
    unl = sources.SubsetView(train_all, rest, hide_labels=True, reindex=True)
    true_u = train_all.labels[rest]
  elif u.kind == "image_folder":
    unl = sources.ImageFileSource(u.path, channels=d.channels)
  elif u.kind == "tfds":
    base = sources.TFDSSource(u.tfds_name, u.split, u.get("tfds_data_dir"))
    unl = sources.SubsetView(base, np.arange(len(base)), hide_labels=True, reindex=True)
  else:  # fake
    shape = (d.image_size, d.image_size, d.channels)
    base = sources.fake_source(u.size, shape, d.num_classes, seed=3)
    unl = sources.SubsetView(base, np.arange(len(base)), hide_labels=True, reindex=True)
    true_u = base.labels
  if u.get("limit"):
    n = min(int(u.limit), len(unl))
    unl = sources.SubsetView(unl, np.arange(n), reindex=True)
    true_u = None if true_u is None else true_u[:n]
  return Data(labelled, val, test, unl, true_u, spec, tuple(class_names or ()), splits)


# ----------------------------------------------------------------------------- helpers


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def make_model(scfg, num_classes: int):
  return models.create_model(scfg.model, num_classes, dtype=_dtype(scfg.dtype),
                             **dict(scfg.get("model_kwargs") or {}))


def _write_json(path: str, obj) -> None:
  if parallel.is_main_process():
    jsonio.write_json(path, obj)


_read_json = jsonio.read_json


def _stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def _done_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "done.json")


def _stage_fingerprint(cfg, stage: str) -> dict:
  """The config that determines a stage's artifact (itself and what it depends on)."""
  teacher = (["baseline"] if cfg.teacher.get("init_from") == "baseline" else []) + ["teacher"]
  deps = {"baseline": ["baseline"], "teacher": teacher,
          "score": teacher + ["score", "unlabelled"],
          "select": teacher + ["unlabelled", "select"],
          "pretrain": teacher + ["unlabelled", "select", "pretrain"],
          "finetune": teacher + ["unlabelled", "select", "pretrain", "finetune"]}
  cosmetic = {"log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size"}
  strip = lambda d: {k: v for k, v in d.items() if k not in cosmetic}
  fp = {"seed": cfg.seed, "data": strip(cfg.data.to_dict())}
  for k in deps.get(stage, []):
    fp[k] = strip(cfg[k].to_dict())
  return json.loads(json.dumps(fp, default=str))


def _is_done(cfg, workdir: str, stage: str) -> bool:
  path = _done_path(workdir, stage)
  if not os.path.exists(path):
    return False
  done = _read_json(path)
  old = done.get("fingerprint")
  if old is not None and stage in ("baseline", "teacher", "score", "select", "pretrain",
                                   "finetune"):
    changed = _fingerprint_changes(old, _stage_fingerprint(cfg, stage))
    if changed:
      raise config_lib.ConfigError(
          f"stage {stage!r} in {workdir} was produced with a different config (changed: "
          f"{'; '.join(changed)}). Use a new --workdir, or delete "
          f"{_stage_dir(workdir, stage)} and the stages after it to recompute.")
  return True


_TRAIN_DEFAULTS = json.loads(json.dumps(config_lib.train_stage("").to_dict(), default=str))


def _fingerprint_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
  """``field: old -> new`` for every leaf that differs. A field missing from ``old`` (a
  run made before bssl had that field) counts as unchanged when ``new`` holds the
  default that such a run used."""
  out = []
  for k in sorted(set(old) | set(new)):
    name = f"{prefix}{k}"
    if isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
      out += _fingerprint_changes(old[k], new[k], name + ".")
    elif k not in old:
      if not (prefix and k in _TRAIN_DEFAULTS and new[k] == _TRAIN_DEFAULTS[k]):
        out.append(f"{name}: (absent) -> {new[k]!r}")
    elif old[k] != new.get(k, "(absent)"):
      out.append(f"{name}: {old[k]!r} -> {new.get(k, '(absent)')!r}")
  return out


def _require(workdir: str, stage: str, needed_by: str) -> None:
  if not os.path.exists(_done_path(workdir, stage)):
    raise FileNotFoundError(
        f"stage {needed_by!r} needs the output of stage {stage!r}, which is not complete in "
        f"{workdir}; include {stage!r} in --config.stages")


def _finish(cfg, workdir: str, stage: str, info: dict) -> None:
  parallel.sync(f"bssl_{stage}_before_done")
  info = dict(info, fingerprint=_stage_fingerprint(cfg, stage), finished=time.time())
  _write_json(_done_path(workdir, stage), info)
  parallel.sync(f"bssl_{stage}_done")


def _log(msg: str) -> None:
  if parallel.is_main_process():
    print(msg, flush=True)


# ----------------------------------------------------------------------------- stages


_STAGE_SEED = {"baseline": 1, "teacher": 2, "pretrain": 3, "finetune": 4}


def _load_stage_variables(workdir: str, stage: str, model, spec, mesh):
  shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, *train.spec_shape(spec))),
                                               train=False), jax.random.key(0))
  return train.load_variables(os.path.join(workdir, stage, "final"), mesh, dict(shapes))


def _train_stage(stage: str, cfg, data: Data, mesh, workdir: str, source,
                 init_variables=None, stop_after_steps=None) -> dict:
  scfg = cfg[stage]
  num_classes = cfg.data.num_classes
  model = make_model(scfg, num_classes)
  sdir = _stage_dir(workdir, stage)
  scfg = scfg.copy_and_resolve_references()
  scfg.steps = config_lib.resolve_steps(scfg, len(source))
  if init_variables is None and scfg.get("init_from") in config_lib.TRAIN_STAGES:
    _require(workdir, scfg.init_from, stage)
    init_variables = _load_stage_variables(workdir, scfg.init_from, model, data.spec, mesh)
  elif init_variables is None and scfg.get("init_from"):
    init_variables = train.load_variables(scfg.init_from)
  mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
  if scfg.steps == 0:  # a converted model used as is
    variables = init_variables
    out = {"steps": 0, "train_seconds": 0.0}
  else:
    out = train.fit(name=stage, model=model, cfg=scfg, source=source, spec=data.spec, mesh=mesh,
                    workdir=sdir, num_classes=num_classes, mean=mean, std=std,
                    init_variables=init_variables, seed=cfg.seed * 100 + _STAGE_SEED[stage],
                    num_threads=cfg.num_threads, stop_after_steps=stop_after_steps)
    if "interrupted_at" in out:
      return out
    variables = out.pop("variables")
  train.save_variables(os.path.join(sdir, "final"), variables)
  info = {k: v for k, v in out.items()}
  info["num_params"] = models.count_params(variables["params"])
  info["num_train_examples"] = len(source)
  if data.val is not None:
    ev = train.make_eval_step(model, mesh, num_classes=num_classes, mean=mean, std=std)
    info["val"] = train.evaluate(ev, variables, data.val, data.spec, mesh,
                                 global_batch_size=cfg.data.eval_batch_size,
                                 num_threads=cfg.num_threads)
    _log(f"[{stage}] validation top-1 {info['val']['top1']:.4f} top-5 {info['val']['top5']:.4f}")
  _finish(cfg, workdir, stage, info)
  return info


def stage_score(cfg, data: Data, mesh, workdir: str, stop_after_batches=None) -> dict:
  _require(workdir, "teacher", "score")
  tcfg = cfg.teacher
  model = make_model(tcfg, cfg.data.num_classes)
  variables = _load_stage_variables(workdir, "teacher", model, data.spec, mesh)
  sdir = _stage_dir(workdir, "score")
  out = scoring.score_shard(
      model=model, variables=variables, source=data.unlabelled, spec=data.spec, mesh=mesh,
      num_classes=cfg.data.num_classes, top_p=cfg.select.p, k=cfg.select.k,
      mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
      global_batch_size=cfg.score.batch_size, score_dir=sdir,
      checkpoint_every=cfg.score.checkpoint_every, num_threads=cfg.num_threads,
      stop_after_batches=stop_after_batches)
  if "interrupted_at_batch" in out:
    return out
  parallel.sync("bssl_score_shards")
  info = {"num_processes": jax.process_count()}
  if parallel.is_main_process():
    _, merged = scoring.merge_processes(sdir, jax.process_count())
    bad = merged["bad_ids"]
    names = [data.unlabelled.name_of(i) for i in bad] if hasattr(data.unlabelled, "name_of") \
        else [str(i) for i in bad]
    _write_json(os.path.join(sdir, "bad_images.json"), {"ids": bad, "files": names})
    info.update(num_scored=merged["num_scored"], num_bad_images=len(bad),
                num_unlabelled=len(data.unlabelled))
    if bad:
      _log(f"[score] skipped {len(bad)} undecodable or wrongly shaped images; listed in "
           f"{os.path.join(sdir, 'bad_images.json')}")
  _finish(cfg, workdir, "score", info)
  return info


def stage_select(cfg, data: Data, mesh, workdir: str) -> dict:
  _require(workdir, "score", "select")
  sdir = _stage_dir(workdir, "select")
  info: dict = {}
  if parallel.is_main_process():
    acc, merged = scoring.merge_processes(_stage_dir(workdir, "score"),
                                          _read_json(_done_path(workdir, "score"))["num_processes"])
    sel = acc.result()
    counts = sel.counts()
    short = [int(c) for c in np.flatnonzero(counts < cfg.select.k)]
    info = {"k": int(cfg.select.k), "p": int(cfg.select.p), "num_selected": int(len(sel.ids)),
            "num_unique_images": int(len(np.unique(sel.ids))),
            "num_scored": merged["num_scored"], "classes_short_of_k": short,
            "min_per_class": int(counts.min()), "max_per_class": int(counts.max())}
    if data.unlabelled_true_labels is not None and len(sel.ids):
      correct = data.unlabelled_true_labels[sel.ids] == sel.classes
      info["label_precision"] = float(correct.mean())
      # precision by rank bucket: how trustworthy the K-th image of a class is
      edges = np.unique(np.linspace(0, cfg.select.k, 9).astype(int))
      by_rank = []
      for lo, hi in zip(edges[:-1], edges[1:]):
        m = (sel.ranks >= lo) & (sel.ranks < hi)
        if m.any():
          by_rank.append({"ranks": [int(lo), int(hi)], "precision": float(correct[m].mean()),
                          "count": int(m.sum())})
      info["label_precision_by_rank"] = by_rank
    selection.write_selection(os.path.join(sdir, "dhat"), sel, extra_summary=info)
    _log(f"[select] D^ has {info['num_selected']} rows ({info['num_unique_images']} images), "
         f"{len(short)} classes short of K={cfg.select.k}"
         + (f", label precision {info['label_precision']:.4f}" if "label_precision" in info
            else ""))
  _finish(cfg, workdir, "select", info)
  return info


def pseudo_labelled_source(cfg, data: Data, workdir: str):
  _require(workdir, "select", "pretrain")
  sel = selection.read_selection(os.path.join(workdir, "select", "dhat"))
  return sources.PseudoLabelSource(data.unlabelled, np.asarray(sel.ids), np.asarray(sel.classes))


def with_training_facts(metrics: dict, cfg, stage: str, done: dict) -> dict:
  """A model's test metrics plus what its stage's ``done.json`` says of its training."""
  m = dict(metrics, model=cfg[stage].model, num_params=done.get("num_params"),
           train_steps=done.get("steps"), train_seconds=done.get("train_seconds"))
  if "val" in done:
    m["val_top1"] = done["val"]["top1"]
  return m


def stage_evaluate(cfg, data: Data, mesh, workdir: str) -> dict:
  results = {}
  pairs = (("baseline", "baseline"), ("teacher", "teacher"),
           ("student_pretrained", "pretrain"), ("student", "finetune"))
  for key, stage in pairs:
    if not os.path.exists(_done_path(workdir, stage)):
      _log(f"[evaluate] {stage} not trained in this work directory; skipping {key}")
      continue
    if key == "teacher" and "baseline" in results and config_lib.teacher_is_baseline(cfg):
      m = with_training_facts(dict(results["baseline"]), cfg, stage,
                              _read_json(_done_path(workdir, stage)))
      m["same_as"] = "baseline"
      results[key] = m  # the same variables: no need to evaluate them twice
      _log(f"[evaluate] teacher = baseline: test top-1 {m['top1']:.4f} top-5 {m['top5']:.4f}")
      continue
    model = make_model(cfg[stage], cfg.data.num_classes)
    variables = _load_stage_variables(workdir, stage, model, data.spec, mesh)
    ev = train.make_eval_step(model, mesh, num_classes=cfg.data.num_classes,
                              mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))
    m = train.evaluate(ev, variables, data.test, data.spec, mesh,
                       global_batch_size=cfg.data.eval_batch_size, num_threads=cfg.num_threads)
    m = with_training_facts(m, cfg, stage, _read_json(_done_path(workdir, stage)))
    results[key] = m
    _log(f"[evaluate] {key}: test top-1 {m['top1']:.4f} top-5 {m['top5']:.4f}")
  _finish(cfg, workdir, "evaluate", results)
  return results


# ----------------------------------------------------------------------------- driver


def _side_stage_main(cfg_dict: dict, workdir: str) -> None:
  """Entry of the side process that trains the baseline beside the teacher."""
  import ml_collections

  from bssl import hostmem
  hostmem.tune_malloc()
  try:  # Linux: get SIGTERM (checkpoint, exit) if the parent dies, instead of lingering
    import ctypes
    import signal
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
  cfg = ml_collections.ConfigDict(cfg_dict)
  run(cfg, workdir, side_process=True)


def _start_side_baseline(cfg, workdir: str):
  """The baseline and the teacher only need D: on one host with idle cores (XLA:CPU
  keeps ~1.2 of 2 cores busy) training them side by side finishes both sooner."""
  import multiprocessing
  c = cfg.to_dict()
  c["stages"] = "baseline"
  proc = multiprocessing.get_context("spawn").Process(
      target=_side_stage_main, args=(c, workdir), name="bssl-baseline", daemon=True)
  proc.start()
  _log(f"[baseline] training in a side process (pid {proc.pid}) beside the teacher")
  return proc


def _join_side(proc, workdir: str) -> None:
  if proc is None:
    return
  proc.join()
  if proc.exitcode != 0 or not os.path.exists(_done_path(workdir, "baseline")):
    raise RuntimeError(f"the baseline side process failed (exit code {proc.exitcode}); rerun "
                       f"the same command to resume it, or set --config.side_baseline=False")


def run(cfg, workdir: str, side_process: bool = False) -> dict:
  """Runs the configured stages; returns the report (or the last stage's info)."""
  from bssl import report
  config_lib.validate(cfg)
  stages = config_lib.parse_stages(cfg.stages)
  data = build_data(cfg)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if side_process:
    mesh = parallel.make_mesh(tuple(cfg.mesh_shape) or None)
    return _train_stage("baseline", cfg, data, mesh, workdir, data.labelled)
  if parallel.is_main_process():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
    _write_json(os.path.join(workdir, "splits.json"), data.splits)
  mesh = parallel.make_mesh(tuple(cfg.mesh_shape) or None)
  _log(f"bssl: {len(data.labelled)} labelled, {len(data.unlabelled)} unlabelled, "
       f"{len(data.test)} test images; {mesh.devices.size} devices on "
       f"{jax.process_count()} process(es); stages {', '.join(stages)}; workdir {workdir}")
  timings = {}
  last: Any = None
  side = None
  for stage in stages:
    if stage != "report" and stage != "evaluate" and _is_done(cfg, workdir, stage):
      _log(f"[{stage}] complete in {workdir}; skipping")
      continue
    if (stage == "baseline" and cfg.get("side_baseline") and jax.process_count() == 1
        and "teacher" in stages and not _is_done(cfg, workdir, "teacher")
        and cfg.teacher.get("init_from") != "baseline"):
      side = _start_side_baseline(cfg, workdir)
      continue
    if stage in ("evaluate", "report"):
      _join_side(side, workdir)
      side = None
    t0 = time.time()
    _log(f"[{stage}] starting")
    if stage in ("baseline", "teacher"):
      last = _train_stage(stage, cfg, data, mesh, workdir, data.labelled)
    elif stage == "score":
      last = stage_score(cfg, data, mesh, workdir)
    elif stage == "select":
      last = stage_select(cfg, data, mesh, workdir)
    elif stage == "pretrain":
      last = _train_stage("pretrain", cfg, data, mesh, workdir,
                          pseudo_labelled_source(cfg, data, workdir))
    elif stage == "finetune":
      _require(workdir, "pretrain", "finetune")
      model = make_model(cfg.finetune, cfg.data.num_classes)
      init = _load_stage_variables(workdir, "pretrain", model, data.spec, mesh)
      last = _train_stage("finetune", cfg, data, mesh, workdir, data.labelled,
                          init_variables=init)
    elif stage == "evaluate":
      last = stage_evaluate(cfg, data, mesh, workdir)
    elif stage == "report":
      last = report.write_report(cfg, data, workdir) if parallel.is_main_process() else None
      parallel.sync("bssl_report")
    timings[stage] = time.time() - t0
    _log(f"[{stage}] done in {timings[stage]:.1f}s")
  _join_side(side, workdir)
  return last
