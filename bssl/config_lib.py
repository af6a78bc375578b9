"""Config checks and derived values, in one place, before any expensive work.

Every error names the field, the bad value and what is accepted.
"""
from __future__ import annotations

import json
import math

import ml_collections
from ml_collections import config_dict

from bssl import models
from bssl.data import pipelines

STAGES = ("baseline", "teacher", "score", "select", "pretrain", "finetune", "evaluate",
          "report")
TRAIN_STAGES = ("baseline", "teacher", "pretrain", "finetune")
DATA_KINDS = ("fashion_mnist", "tfds", "fake")
UNLABELLED_KINDS = ("rest_of_train", "image_folder", "tfds", "fake")
DTYPES = ("float32", "bfloat16")


def optional(type_: type):
  """A config field that is None by default but can be set from the command line
  (``--config.unlabelled.path=/data/u``): ml_collections refuses to override a plain
  ``None`` field, since it cannot tell which type the value should have."""
  return config_dict.placeholder(type_)


def train_stage(model: str, **fields) -> ml_collections.ConfigDict:
  """The config of one training stage (baseline, teacher, pretrain, finetune): every
  field a training stage reads, with these defaults unless ``fields`` sets it.

  ``steps`` wins over ``epochs``; ``lr=None`` follows the linear scaling rule
  (0.1 x batch / 256); ``warmup_steps`` (when set) wins over ``warmup_fraction``;
  ``step_boundaries`` are fractions of the run, used by ``schedule='step'``;
  ``init_from`` is a folder of variables (``bssl.convert``'s output, a stage's ``final/``)
  or, for the teacher only, ``"baseline"``: this work directory's baseline (with
  ``steps=0``, the teacher *is* the baseline -- self-training at no extra cost).
  """
  c = ml_collections.ConfigDict(dict(
      model=model, model_kwargs={}, steps=optional(int), epochs=optional(float),
      batch_size=256, lr=optional(float), schedule="cosine",
      step_boundaries=(1 / 3, 2 / 3, 8 / 9), step_decay=0.1, warmup_fraction=0.0,
      warmup_steps=optional(int), momentum=0.9, nesterov=False, weight_decay=1e-4,
      label_smoothing=0.0, bn_mode="sync", log_every=100, checkpoint_every=1000,
      keep_checkpoints=2, dtype="float32", init_from=optional(str)))
  unknown = set(fields) - set(c.keys())
  if unknown:
    raise TypeError(f"train_stage: unknown field(s) {sorted(unknown)}; accepted: "
                    f"{sorted(c.keys())}")
  c.update(fields)
  return c


def teacher_is_baseline(cfg: ml_collections.ConfigDict) -> bool:
  """Self-training at no extra cost: the teacher's variables are the baseline's, as they
  are (``teacher.init_from='baseline'`` and no teacher steps)."""
  return cfg.teacher.get("init_from") == "baseline" and not cfg.teacher.get("steps")


class ConfigError(ValueError):
  """A config field has a value bssl cannot use."""


def parse_stages(stages) -> tuple[str, ...]:
  if isinstance(stages, str):
    names = [s.strip() for s in stages.split(",") if s.strip()]
  else:
    names = [str(s) for s in stages]
  bad = [s for s in names if s not in STAGES]
  if bad or not names:
    raise ConfigError(f"stages: unknown stage(s) {bad or names!r}; accepted: "
                      f"{', '.join(STAGES)} (comma-separated)")
  return tuple(s for s in STAGES if s in names)


def _positive_int(value, field: str) -> None:
  if value is None or int(value) != value or int(value) <= 0:
    raise ConfigError(f"{field} must be a positive integer, got {value!r}")


def resolve_steps(scfg, num_examples: int) -> int:
  """Training length in steps: ``steps`` when set, else ``epochs`` over ``num_examples``."""
  if scfg.get("steps") is not None:
    return int(scfg.steps)
  if scfg.get("epochs"):
    return max(1, math.ceil(float(scfg.epochs) * num_examples / int(scfg.batch_size)))
  return int(scfg.steps)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on the first bad field. Cheap: touches no data and no device."""
  stages = parse_stages(cfg.stages)
  d = cfg.data
  if d.kind not in DATA_KINDS:
    raise ConfigError(f"data.kind must be one of {DATA_KINDS}, got {d.kind!r}")
  _positive_int(d.num_classes, "data.num_classes")
  _positive_int(d.image_size, "data.image_size")
  if d.channels not in (1, 3):
    raise ConfigError(f"data.channels must be 1 or 3, got {d.channels!r}")
  if d.augment not in pipelines.AUGMENTATIONS:
    raise ConfigError(f"data.augment must be one of {pipelines.AUGMENTATIONS}, got {d.augment!r}")
  if d.eval_transform not in pipelines.EVAL_TRANSFORMS:
    raise ConfigError(f"data.eval_transform must be one of {pipelines.EVAL_TRANSFORMS}, "
                      f"got {d.eval_transform!r}")
  for f in ("mean", "std"):
    if len(tuple(d[f])) not in (1, d.channels):
      raise ConfigError(f"data.{f} must have 1 or data.channels={d.channels} entries, "
                        f"got {tuple(d[f])}")
  if any(s <= 0 for s in d.std):
    raise ConfigError(f"data.std must be positive, got {tuple(d.std)}")
  _positive_int(d.eval_batch_size, "data.eval_batch_size")
  u = cfg.unlabelled
  if u.kind not in UNLABELLED_KINDS:
    raise ConfigError(f"unlabelled.kind must be one of {UNLABELLED_KINDS}, got {u.kind!r}")
  if u.kind == "rest_of_train" and d.kind == "tfds":
    raise ConfigError("unlabelled.kind='rest_of_train' needs data.kind 'fashion_mnist' or "
                      "'fake'; with TFDS data use 'image_folder' or 'tfds'")
  if u.kind == "image_folder" and not u.get("path"):
    raise ConfigError("unlabelled.path must name a folder of images or a file list when "
                      "unlabelled.kind='image_folder', got None")

  for name in TRAIN_STAGES:
    s = cfg[name]
    try:
      models.arch_config(s.model, **dict(s.get("model_kwargs") or {}))
    except ValueError as e:
      raise ConfigError(f"{name}.model: {e}") from None
    if s.get("init_from") in TRAIN_STAGES:
      if not (name == "teacher" and s.init_from == "baseline"):
        raise ConfigError(f"{name}.init_from={s.init_from!r}: only the teacher may start from "
                          f"another stage, and only from 'baseline'; otherwise give a folder "
                          f"of variables")
      if (s.model != cfg.baseline.model
          or dict(s.model_kwargs or {}) != dict(cfg.baseline.model_kwargs or {})):
        raise ConfigError(f"teacher.init_from='baseline' needs the teacher's architecture to "
                          f"be the baseline's ({cfg.baseline.model!r} "
                          f"{dict(cfg.baseline.model_kwargs or {})}), got {s.model!r} "
                          f"{dict(s.model_kwargs or {})}")
    if s.get("steps") is not None:
      if s.steps == 0 and s.get("init_from"):
        pass  # e.g. a converted teacher, evaluated but not trained
      else:
        _positive_int(s.steps, f"{name}.steps")
    elif s.get("epochs") is None or not s.epochs > 0:
      raise ConfigError(f"{name}: set steps (a positive integer) or epochs (positive), got "
                        f"steps={s.get('steps')!r} epochs={s.get('epochs')!r}")
    _positive_int(s.batch_size, f"{name}.batch_size")
    if s.get("lr") is not None and not s.lr > 0:
      raise ConfigError(f"{name}.lr must be positive or None (linear scaling rule), got {s.lr!r}")
    if s.schedule not in ("cosine", "step", "constant"):
      raise ConfigError(f"{name}.schedule must be one of cosine, step, constant, "
                        f"got {s.schedule!r}")
    if s.bn_mode not in ("sync", "per_device"):
      raise ConfigError(f"{name}.bn_mode must be 'sync' or 'per_device', got {s.bn_mode!r}")
    if s.dtype not in DTYPES:
      raise ConfigError(f"{name}.dtype must be one of {DTYPES}, got {s.dtype!r}")
    if not 0.0 <= s.label_smoothing < 1.0:
      raise ConfigError(f"{name}.label_smoothing must be in [0, 1), got {s.label_smoothing!r}")
  for name in ("pretrain", "finetune"):
    if (cfg[name].model != cfg.baseline.model
        or dict(cfg[name].model_kwargs or {}) != dict(cfg.baseline.model_kwargs or {})):
      raise ConfigError(f"{name}.model must be the student architecture, which is also the "
                        f"baseline's ({cfg.baseline.model!r} {dict(cfg.baseline.model_kwargs)}), "
                        f"got {cfg[name].model!r} {dict(cfg[name].model_kwargs or {})}")

  k, p = cfg.select.k, cfg.select.p
  if k is None or int(k) != k or k <= 0:
    raise ConfigError(f"select.k must be a positive integer, got {k!r}")
  if p is None or int(p) != p or not 1 <= p <= d.num_classes:
    raise ConfigError(f"select.p must be an integer between 1 and data.num_classes "
                      f"({d.num_classes}), got {p!r}")
  _positive_int(cfg.score.batch_size, "score.batch_size")
  del stages


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
