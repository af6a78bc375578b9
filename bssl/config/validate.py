"""The cross-field checks: a config is refused before any expensive work when a field has a
value the schema (:mod:`bssl.config.fields`) does not accept, when fields disagree (video data
with an image model, a teacher started from a baseline of another architecture, select.k above
what scoring kept, ...), or when a global batch does not split over the devices. Each error
names the field, the bad value and what is accepted.

The architecture checks ask the model registry (:mod:`bssl.models`, a leaf that imports
nothing of bssl): this module, unlike the rest of the package, imports ``bssl.models``, and so
does ``bssl.config`` (the package exports :func:`validate`). Modules that must not reach the
models (``bssl/data/``, ``bssl/deps.py``) import the submodule they need
(:mod:`bssl.config.names`, :mod:`bssl.config.fields`) instead of the package.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import ml_collections

from bssl import models, storage
from bssl.config.base import get, is_video, parse_stages, same_architecture
from bssl.config.fields import ConfigError, Field, all_fields
from bssl.config.names import (
    ALL_STAGES,
    IMAGE_ONLY_UNLABELLED,
    TRAIN_SECTIONS,
    VIDEO_AUGMENTATIONS,
    VIDEO_DATA_KINDS,
)
from bssl.models.video import SMALL_VIDEO_DEFAULTS


def _leaf_names(cfg, prefix: str = "") -> list[str]:
  out = []
  for k in cfg.keys():
    v = cfg[k]
    if isinstance(v, ml_collections.ConfigDict) and k != "model_kwargs":
      out += _leaf_names(v, f"{prefix}{k}.")
    else:  # model_kwargs is one field (a dict), not a section
      out.append(f"{prefix}{k}")
  return out


def _has(cfg, name: str) -> bool:
  node = cfg
  for part in name.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


_TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "True or False",
    tuple: "a tuple, e.g. '(1, 2)'",
    dict: "a dict, e.g. \"{'widths': (16, 32)}\"",
}


def check_field(f: Field, v) -> None:
  """Raises ConfigError when ``v`` is not a value the field ``f`` accepts (type, element
  types, a finite number, choices, minimum, its own check)."""
  if v is None:
    if f.optional:
      return
    raise ConfigError(f"{f.name} must be set ({f.doc}), got None")
  ok_types = f.type if isinstance(f.type, tuple) else (f.type,)
  if f.type is float and isinstance(v, int) and not isinstance(v, bool):
    v = float(v)
  want = _TYPE_WORDS.get(f.type, getattr(f.type, "__name__", str(f.type)))
  if f.type is tuple and isinstance(v, (list, tuple)):
    pass
  elif f.type is dict and isinstance(v, (dict, ml_collections.ConfigDict)):
    pass
  elif isinstance(v, bool) and bool not in ok_types:
    raise ConfigError(f"{f.name} must be {want}, got {v!r}")
  elif not isinstance(v, ok_types):
    raise ConfigError(f"{f.name} must be {want}, got {v!r}")
  if isinstance(v, float) and not math.isfinite(v):
    raise ConfigError(f"{f.name} must be a finite number, got {v!r}")
  if f.choices and v not in f.choices:
    shown = (
        " or ".join(repr(c) for c in f.choices)
        if len(f.choices) <= 2
        else "one of " + ", ".join(repr(c) for c in f.choices)
    )
    raise ConfigError(f"{f.name} must be {shown}, got {v!r}")
  if f.minimum is not None and v < f.minimum:
    what = "a positive integer" if f.type is int and f.minimum == 1 else f">= {f.minimum}"
    raise ConfigError(f"{f.name} must be {what}, got {v!r}")
  if f.check is not None:
    try:
      msg = f.check(v)
    except (TypeError, ValueError, AttributeError) as e:  # a value the check cannot read
      msg = f"has a value of the wrong kind: {v!r} ({e}); accepted: {f.doc}"
    if msg:
      raise ConfigError(f"{f.name} {msg}")


def validate(
    cfg: ml_collections.ConfigDict, *, num_devices: int | None = None, num_processes: int = 1
) -> None:
  """Raises ConfigError on the first bad field. Cheap: touches no data and no device.

  With ``num_devices`` (all hosts) the batch sizes are checked against the mesh too.
  """
  schema = {f.name: f for f in all_fields()}
  unknown = sorted(n for n in _leaf_names(cfg) if n not in schema)
  if unknown:
    raise ConfigError(
        f"unknown config field(s) {unknown}; every field is listed in "
        f"docs/config.md (e.g. {', '.join(sorted(schema)[:3])}, ...)"
    )
  missing = sorted(n for n in schema if not _has(cfg, n))
  if missing:
    raise ConfigError(
        f"config lacks field(s) {missing}: build recipe configs from " f"bssl.config.base()"
    )
  for name, f in schema.items():
    check_field(f, get(cfg, name))
  parse_stages(cfg.stages)

  d = cfg.data
  for f in ("mean", "std"):
    if len(tuple(d[f])) not in (1, d.channels):
      raise ConfigError(
          f"data.{f} must have 1 or data.channels={d.channels} entries, " f"got {tuple(d[f])}"
      )
  if any(s <= 0 for s in d.std):
    raise ConfigError(f"data.std must be positive, got {tuple(d.std)}")
  if d.kind == "image_folder":
    for f in ("train_dir", "test_dir"):
      if not d.get(f):
        raise ConfigError(
            f"data.kind='image_folder' needs data.{f} (a folder with one "
            f"subfolder of images per class), got None"
        )
  u = cfg.unlabelled
  _check_video(cfg)
  if u.kind == "rest_of_train" and d.kind == "tfds":
    raise ConfigError(
        "unlabelled.kind='rest_of_train' needs data.kind 'fashion_mnist', "
        "'image_folder' or 'fake'; with TFDS data use 'image_folder' or 'tfds'"
    )
  if u.kind == "image_folder" and not u.get("path"):
    raise ConfigError(
        "unlabelled.path must name a folder of images or a file list when "
        "unlabelled.kind='image_folder', got None"
    )
  if u.kind == "shards" and not u.get("path"):
    raise ConfigError(
        "unlabelled.path must name the output folder of `python -m "
        "bssl.ingest` when unlabelled.kind='shards', got None (ingest U once: "
        "python -m bssl.ingest --input=<folder or file list> --out=<dir or "
        "gs://...>, then --config.unlabelled.path=<that dir>)"
    )
  if (
      "weak_pretrain" in parse_stages(cfg.stages)
      and cfg.weak.kind == "tags_file"
      and not (cfg.weak.get("path") and cfg.weak.get("tags_file"))
  ):
    raise ConfigError(
        "weak.kind='tags_file' needs weak.path (the tagged images: an "
        "ingest's --out, or a folder / file list) and weak.tags_file (one line "
        "of tag names per image id); see docs/semiweak.md"
    )
  if (
      "weak_pretrain" in parse_stages(cfg.stages)
      and cfg.weak.kind == "captions"
      and not cfg.weak.get("path")
  ):
    raise ConfigError(
        "weak.kind='captions' needs weak.path: the --out of `python -m "
        "bssl.ingest` run on WebDataset tar shards (their .txt or json "
        "captions are the tags); see docs/webdataset.md"
    )
  if u.kind == "tfds" and not (u.get("tfds_name") and u.get("split")):
    raise ConfigError("unlabelled.kind='tfds' needs unlabelled.tfds_name and " "unlabelled.split")

  stages = set(parse_stages(cfg.stages))
  for name in TRAIN_SECTIONS:
    s = cfg[name]
    if name == "weak_pretrain" and "weak_pretrain" not in stages:
      continue
    _check_model_kwargs(name, s.model, dict(s.model_kwargs or {}))
    try:
      models.arch_config(s.model, **dict(s.model_kwargs or {}))
    except (ValueError, TypeError) as e:
      kw = _plain(s.model_kwargs)
      raise ConfigError(
          f"{name}.model: {e}" + (f" ({name}.model_kwargs={kw})" if kw else "")
      ) from None
    if s.init_from in TRAIN_SECTIONS or s.init_from in ALL_STAGES:
      if not (name == "teacher" and s.init_from in ("baseline", "weak_pretrain")):
        raise ConfigError(
            f"{name}.init_from={s.init_from!r}: only the teacher may start from "
            f"another stage, and only from 'baseline' or 'weak_pretrain'; "
            f"otherwise give a folder of variables"
        )
      if s.init_from == "weak_pretrain":
        if not same_architecture(s, cfg.weak_pretrain):
          raise ConfigError(
              f"teacher.init_from='weak_pretrain' needs the teacher's "
              f"architecture to be weak_pretrain's ({cfg.weak_pretrain.model!r} "
              f"{dict(cfg.weak_pretrain.model_kwargs or {})}), got {s.model!r} "
              f"{dict(s.model_kwargs or {})}"
          )
        if s.steps == 0:
          raise ConfigError(
              "teacher.init_from='weak_pretrain' needs teacher.steps > 0: the "
              "weakly supervised model gets a new head, fine-tuned on D"
          )
      elif not same_architecture(s, cfg.baseline):
        raise ConfigError(
            f"teacher.init_from='baseline' needs the teacher's architecture to "
            f"be the baseline's ({cfg.baseline.model!r} "
            f"{dict(cfg.baseline.model_kwargs or {})}), got {s.model!r} "
            f"{dict(s.model_kwargs or {})}"
        )
    if s.steps is None and not s.epochs:
      raise ConfigError(
          f"{name}: set steps (a positive integer) or epochs (positive), got "
          f"steps={s.steps!r} epochs={s.epochs!r}"
      )
    if s.steps == 0 and not s.init_from:
      raise ConfigError(
          f"{name}.steps=0 trains nothing, so {name}.init_from must name the "
          f"variables to use (a folder, or 'baseline' for the teacher)"
      )
  if cfg.finetune.init_from:
    raise ConfigError(
        f"finetune.init_from must be None: fine-tuning starts from the "
        f"pre-trained student, got {cfg.finetune.init_from!r}"
    )
  for name in ("pretrain", "finetune"):
    if not same_architecture(cfg[name], cfg.baseline):
      raise ConfigError(
          f"{name}.model must be the student architecture, which is also the "
          f"baseline's ({cfg.baseline.model!r} {dict(cfg.baseline.model_kwargs)}), "
          f"got {cfg[name].model!r} {dict(cfg[name].model_kwargs or {})}"
      )
  sc = cfg.score
  if sc.get("max_p") is not None and sc.get("max_k") is None:
    raise ConfigError("score.max_p needs score.max_k (the K kept per rank)")
  if sc.get("max_k") is not None:
    if cfg.select.k > sc.max_k:
      raise ConfigError(
          f"select.k={cfg.select.k} is above score.max_k={sc.max_k}, the K "
          f"scoring keeps; raise score.max_k (and rescore) or lower select.k"
      )
    if sc.get("max_p") is not None and cfg.select.p > sc.max_p:
      raise ConfigError(f"select.p={cfg.select.p} is above score.max_p={sc.max_p}")
  if cfg.select.p > d.num_classes:
    raise ConfigError(
        f"select.p must be an integer between 1 and data.num_classes "
        f"({d.num_classes}), got {cfg.select.p!r}"
    )
  if sc.get("max_p") is not None and sc.max_p > d.num_classes:
    raise ConfigError(
        f"score.max_p must be at most data.num_classes ({d.num_classes}), " f"got {sc.max_p}"
    )
  if num_devices is not None:
    check_batch_sizes(cfg, num_devices, num_processes)


def _plain(v):
  """A config value as plain Python (a ConfigDict as a dict), for messages."""
  if isinstance(v, ml_collections.ConfigDict):
    return {k: _plain(x) for k, x in v.items()}
  return v


def _kind(default) -> tuple[str, Callable[[object], bool]]:
  """What an architecture argument like ``default`` must be: (words, test)."""

  def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

  if isinstance(default, bool):
    return "True or False", lambda x: isinstance(x, bool)
  if isinstance(default, int):
    return "an integer", is_int
  if isinstance(default, str):
    return "a string", lambda x: isinstance(x, str)
  if isinstance(default, tuple):
    return "a tuple of integers, e.g. '(16, 32, 64)'", lambda x: (
        isinstance(x, (list, tuple)) and all(is_int(e) for e in x)
    )
  return type(default).__name__, lambda x: isinstance(x, type(default))


def _check_model_kwargs(section: str, model: str, kwargs: dict) -> None:
  """Each architecture argument has the type of its default (``widths``: integers, ...):
  a value of another type is named here, not found by the model's int() when it builds."""
  defaults = {"zero_init_residual": False}
  if model == "resnet_small":
    defaults.update(models.SMALL_DEFAULTS)
  elif model == "r2plus1d_small":
    defaults.update(SMALL_VIDEO_DEFAULTS)
  for k, v in kwargs.items():
    if k in defaults:
      words, ok = _kind(defaults[k])
      if not ok(_plain(v)):
        raise ConfigError(f"{section}.model_kwargs.{k} must be {words}, got {_plain(v)!r}")


def _check_video(cfg) -> None:
  """Video data, video models and video-able stages go together."""
  d, u = cfg.data, cfg.unlabelled
  video = is_video(cfg)
  stages = set(parse_stages(cfg.stages))
  for name in TRAIN_SECTIONS:
    if name == "weak_pretrain" and "weak_pretrain" not in stages:
      continue
    m = cfg[name].model
    if video != models.is_video_model(m):
      need = models.VIDEO_MODEL_NAMES if video else models.IMAGE_MODEL_NAMES
      raise ConfigError(
          f"{name}.model={m!r} is {'a video' if not video else 'an image'} model but "
          f"data.kind={d.kind!r} is {'image' if not video else 'video'} data, which needs one "
          f"of {', '.join(need)} (video data: data.kind in {', '.join(VIDEO_DATA_KINDS)})"
      )
  if not video:
    if u.kind == "video_list":
      raise ConfigError(
          f"unlabelled.kind='video_list' needs video data (data.kind one of "
          f"{VIDEO_DATA_KINDS}), got data.kind={d.kind!r}"
      )
    return
  if u.kind in IMAGE_ONLY_UNLABELLED:
    raise ConfigError(
        f"unlabelled.kind={u.kind!r} holds images; with video data use "
        f"'rest_of_train', 'video_list' or 'fake'"
    )
  missing = [
      f"data.{f}" for f in ("train_csv", "test_csv") if d.kind == "video_folder" and not d.get(f)
  ]
  if u.kind == "video_list" and not u.get("path"):
    missing.append("unlabelled.path")
  if missing:
    raise ConfigError(
        f"the video recipe needs {', '.join(missing)}: labelled videos as CSVs (columns "
        f"path,label, or Kinetics-400's own label,youtube_id,time_start,time_end files with "
        f"the videos in <label>/<youtube_id>_<start:06d>_<end:06d>.mp4) and unlabelled "
        f"videos (a folder, searched recursively, or a file list). For Kinetics-400: "
        f"--config.data.train_csv=<kinetics>/train.csv --config.data.test_csv=<kinetics>/"
        f"validate.csv --config.data.video_dir=<kinetics>/videos --config.unlabelled.path="
        f"<videos>; see docs/video.md. Without videos: --config=configs/video.py:demo"
    )
  if d.augment not in VIDEO_AUGMENTATIONS:
    raise ConfigError(
        f"data.augment={d.augment!r} is for images; video clips take "
        f"'pad_crop_flip', 'pad_crop' (no mirror) or 'none'"
    )
  span = (d.clip_len - 1) * d.frame_stride + 1
  if d.kind in ("moving_fashion_mnist", "fake_video") and span > d.video_frames:
    raise ConfigError(
        f"a clip spans (data.clip_len - 1) x data.frame_stride + 1 = {span} "
        f"frames but the videos have data.video_frames={d.video_frames}: lower "
        f"clip_len or frame_stride (videos shorter than a clip are looped)"
    )
  if d.kind == "moving_fashion_mnist" and d.garment_size > d.image_size:
    raise ConfigError(
        f"data.garment_size={d.garment_size} must be at most "
        f"data.image_size={d.image_size} (the canvas)"
    )
  if "transfer" in stages:
    raise ConfigError(
        "the transfer stage transfers image models; video recipes have no "
        "transfer target (drop 'transfer' from --config.stages)"
    )


def mesh_dims(mesh_shape, num_devices: int) -> tuple[int, ...]:
  """``mesh_shape`` (``()``, ``(data,)`` or ``(data, fsdp)``, one entry may be -1) as the
  mesh's sizes on ``num_devices`` devices; ConfigError when they cannot form it."""
  shape = [int(s) for s in tuple(mesh_shape or ())] or [num_devices]
  given = tuple(mesh_shape or ())
  if len(shape) > 2 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise ConfigError(
        f"mesh_shape must be (data,) or (data, fsdp): one or two positive integers, one "
        f"may be -1, got {given!r}"
    )
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if num_devices % rest:
      raise ConfigError(
          f"mesh_shape {given!r}: {num_devices} devices do not split into groups of {rest}"
      )
    shape[shape.index(-1)] = num_devices // rest
  if math.prod(shape) != num_devices:
    raise ConfigError(
        f"mesh_shape {given!r} needs {math.prod(shape)} devices, but {num_devices} are "
        f"present; e.g. ({num_devices},)"
        + (f" or ({num_devices // 2}, 2)" if num_devices % 2 == 0 and num_devices > 2 else "")
    )
  return tuple(shape)


def check_batch_sizes(cfg, num_devices: int, num_processes: int) -> None:
  """The mesh (``mesh_shape``) can be formed from the devices, and every global batch of
  every stage splits evenly over processes and devices (the batch is split over every
  mesh axis; scoring runs on each process's own devices: a multiple of all devices
  suffices)."""
  mesh_dims(cfg.mesh_shape, num_devices)
  stages = set(parse_stages(cfg.stages))
  sizes = [
      (f"{s}.batch_size", cfg[s].batch_size)
      for s in TRAIN_SECTIONS
      if s in stages and cfg[s].steps != 0
  ]
  sizes += [("score.batch_size", cfg.score.batch_size)] if "score" in stages else []
  if "transfer" in stages and "full_ft" in str(cfg.transfer.modes).split(","):
    sizes.append(("transfer.ft_batch_size", cfg.transfer.ft_batch_size))
  if stages & {"baseline", "teacher", "pretrain", "finetune", "evaluate", "transfer"}:
    sizes.append(("data.eval_batch_size", cfg.data.eval_batch_size))
  for name, b in sizes:
    if b % num_devices or b % num_processes:
      raise ConfigError(
          f"{name}={b} must be a multiple of the number of devices "
          f"({num_devices} on {num_processes} process(es)); e.g. "
          f"{max(num_devices, b - b % num_devices)}"
      )


def check_paths(cfg) -> None:
  """Every file or folder that the configured stages open, beyond the data (whose folders
  and lists bssl.data checks when it opens them, before any work), exists: the
  ``init_from`` of each training stage that runs and weak_pretrain's tagged images, tags
  and vocabulary. Raises ConfigError naming the field, the path and what is accepted, before
  any work (a missing teacher.init_from was found only after the baseline trained).
  Touches the file system (or the object store): one existence check per path."""
  stages = set(parse_stages(cfg.stages))
  for name in TRAIN_SECTIONS:
    v = cfg[name].get("init_from")
    if name not in stages or v is None or v in ("baseline", "weak_pretrain"):
      continue
    stage_names = " or 'baseline' / 'weak_pretrain' (the teacher)" if name == "teacher" else ""
    accepted = (
        f"a folder of variables (a stage's final/, or the --out of python -m bssl.convert)"
        f"{stage_names}, or None to start from scratch (--config.{name}.init_from=None)"
    )
    p = storage.path(v)
    if not p.exists():
      raise ConfigError(
          f"{name}.init_from={v!r}: no such file or folder; accepted: {accepted}; checked "
          f"before any work"
      )
    if p.is_dir() and not (p / "_METADATA").exists() and (p / "final" / "_METADATA").exists():
      raise ConfigError(
          f"{name}.init_from={v!r} is a stage's folder, not its variables: give "
          f"{os.fspath(p / 'final')!r}"
      )
    if not p.is_dir() or not (p / "_METADATA").exists():
      raise ConfigError(
          f"{name}.init_from={v!r} is not a folder of variables (no orbax _METADATA in it); "
          f"accepted: {accepted}; checked before any work"
      )
  w = cfg.weak
  if "weak_pretrain" in stages and w.kind in ("tags_file", "captions"):
    fields = (
        ("path", "tags_file", "vocab_file") if w.kind == "tags_file" else ("path", "vocab_file")
    )
    for f in fields:
      v = w.get(f)
      if v is not None and not storage.exists(v):
        raise ConfigError(
            f"weak.{f}={v!r}: no such file or folder (weak.kind={w.kind!r}; see "
            f"docs/semiweak.md); checked before any work"
        )
