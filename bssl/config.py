"""The base config: every field bssl reads, with its default, type, one-line doc and
whether it changes a stage's result. Recipe configs (``configs/*.py``) start from
:func:`base` and override fields; :func:`validate` checks any config against this schema
before any expensive work, naming the field, the bad value and what is accepted.

Fields marked ``cosmetic`` (log frequency, checkpoint frequency, evaluation batch size,
threads, figures) do not change what a stage produces, so they are left out of the record
of what a stage read (:mod:`bssl.deps`): changing them between reruns resumes instead of
refusing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
  """A config field has a value bssl cannot use."""


@dataclasses.dataclass(frozen=True)
class Field:
  name: str  # dotted, e.g. "select.k"; "<train>." for every training stage
  default: Any
  type: type | tuple
  doc: str
  choices: tuple = ()
  minimum: float | None = None  # inclusive
  optional: bool = False  # None is accepted (and is the default when default is None)
  cosmetic: bool = False  # does not change any stage's result
  check: Callable[[Any], str | None] | None = None  # returns an error text or None


TRAIN_SECTIONS = ("weak_pretrain", "baseline", "teacher", "pretrain", "finetune")
ALL_STAGES = (
    "weak_pretrain",
    "baseline",
    "teacher",
    "score",
    "select",
    "pretrain",
    "finetune",
    "transfer",
    "evaluate",
    "report",
)
# What runs unless --config.stages says otherwise (weak_pretrain is for semi-weak recipes;
# transfer, to a target data set, is asked for).
DEFAULT_STAGES = tuple(s for s in ALL_STAGES if s not in ("weak_pretrain", "transfer"))
TRANSFER_MODES = ("fc_only", "full_ft")
TRANSFER_MODELS = ("baseline", "teacher", "student")
# (result key, stage) of the models a run evaluates (later rounds add their own:
# bssl/stages/evaluate.py); here so that bssl.sweep reads them without the stage table
EVALUATED_MODELS = (
    ("baseline", "baseline"),
    ("teacher", "teacher"),
    ("student_pretrained", "pretrain"),
    ("student", "finetune"),
)
WEAK_KINDS = ("synthetic", "tags_file", "captions")
CAPTION_TAGS = ("words", "hashtags")
RESAMPLING = ("none", "sqrt", "inverse")
VIDEO_DATA_KINDS = ("moving_fashion_mnist", "video_folder", "fake_video")
DATA_KINDS = ("fashion_mnist", "image_folder", "tfds", "fake") + VIDEO_DATA_KINDS
UNLABELLED_KINDS = ("rest_of_train", "image_folder", "shards", "tfds", "fake", "video_list")
IMAGE_ONLY_UNLABELLED = ("image_folder", "shards", "tfds")
AUGMENTATIONS = ("pad_crop_flip", "pad_crop", "random_resized_crop_flip", "none")
EVAL_TRANSFORMS = ("none", "resize_center_crop")


def _fractions(v) -> str | None:
  if not all(0 < float(x) < 1 for x in v) or list(v) != sorted(v):
    return f"must be increasing fractions in (0, 1), got {tuple(v)}"
  return None


# One training stage (baseline, teacher, pretrain, finetune).
TRAIN_FIELDS = (
    Field(
        "model",
        "resnet50",
        str,
        "architecture name in bssl.models (e.g. resnet50, " "resnext101_32x48d, resnet_small)",
    ),
    Field(
        "model_kwargs",
        {},
        dict,
        "architecture arguments (resnet_small: widths, depths, " "block, groups, width_per_group)",
    ),
    Field(
        "steps",
        None,
        int,
        "training length in steps (wins over epochs); 0 = no training " "(needs init_from)",
        minimum=0,
        optional=True,
    ),
    Field(
        "epochs",
        None,
        float,
        "training length in epochs of the stage's training set",
        minimum=0,
        optional=True,
    ),
    Field("batch_size", 256, int, "global batch size (all devices of all hosts)", minimum=1),
    Field(
        "lr",
        None,
        float,
        "base learning rate; None = 0.1 x batch_size / 256",
        minimum=0,
        optional=True,
    ),
    Field(
        "schedule",
        "cosine",
        str,
        "learning-rate schedule after warm-up",
        choices=("cosine", "step", "constant"),
    ),
    Field(
        "step_boundaries",
        (1 / 3, 2 / 3, 8 / 9),
        tuple,
        "schedule='step': decay points " "as fractions of the run",
        check=_fractions,
    ),
    Field("step_decay", 0.1, float, "schedule='step': factor at each boundary", minimum=0),
    Field("warmup_fraction", 0.0, float, "linear warm-up as a fraction of the run", minimum=0),
    Field(
        "warmup_steps",
        None,
        int,
        "linear warm-up in steps (wins over warmup_fraction)",
        minimum=0,
        optional=True,
    ),
    Field("momentum", 0.9, float, "SGD momentum", minimum=0),
    Field("nesterov", False, bool, "Nesterov momentum"),
    Field("weight_decay", 1e-4, float, "L2 decay on kernels (not BN, not biases)", minimum=0),
    Field(
        "label_smoothing",
        0.0,
        float,
        "label smoothing in [0, 1)",
        minimum=0,
        check=lambda v: None if v < 1 else f"must be below 1, got {v!r}",
    ),
    Field(
        "bn_mode",
        "sync",
        str,
        "BatchNorm statistics over the global batch (sync) or "
        "each device's shard (per_device, as the paper)",
        choices=("sync", "per_device"),
    ),
    Field("dtype", "float32", str, "compute dtype", choices=("float32", "bfloat16")),
    Field(
        "init_from",
        None,
        str,
        "start from a folder of variables (bssl.convert output, a "
        "stage's final/), any device count; teacher only: 'baseline'",
        optional=True,
    ),
    Field("log_every", 100, int, "steps between progress lines", minimum=1, cosmetic=True),
    Field(
        "checkpoint_every",
        1000,
        int,
        "steps between checkpoints (0: only at the end)",
        minimum=0,
        cosmetic=True,
    ),
    Field("keep_checkpoints", 2, int, "checkpoints kept", minimum=1, cosmetic=True),
)

FIELDS = (
    Field("name", "bssl", str, "run name shown in reports", cosmetic=True),
    Field("seed", 0, int, "seed of splits, initialisation and augmentation", minimum=0),
    Field(
        "stages",
        ",".join(DEFAULT_STAGES),
        str,
        "comma-separated stages to run "
        "(dependencies must be complete or included); semi-weak recipes add weak_pretrain",
        cosmetic=True,
    ),
    Field(
        "mesh_shape",
        (),
        tuple,
        "device mesh shape; () = one data axis over all devices",
        cosmetic=True,
    ),
    Field("num_threads", 1, int, "grain read threads per process", minimum=1, cosmetic=True),
    Field(
        "num_workers",
        0,
        int,
        "training-input worker processes per process (grain "
        "mp_prefetch: decode and augment without the GIL; the same batches; one read "
        "thread each; 0: in num_threads threads of the process itself; -1: the cores "
        "this process may use, minus one)",
        minimum=-1,
        cosmetic=True,
    ),
    Field(
        "rounds",
        1,
        int,
        "teacher -> student rounds of self-training: round r > 1 scores "
        "U with round r-1's student and trains a new student (stages score_r<r>, ..., "
        "finetune_r<r>, with the config of score, select, pretrain, finetune)",
        minimum=1,
    ),
    # data: D, validation, test
    Field("data.kind", "fashion_mnist", str, "labelled data source", choices=DATA_KINDS),
    Field(
        "data.folder",
        None,
        str,
        "fashion_mnist: folder of the idx files (default: "
        "Debian's /usr/share/datasets/fashion-mnist)",
        optional=True,
    ),
    Field(
        "data.train_dir",
        None,
        str,
        "image_folder: training images, one subfolder per "
        "class (sorted names = classes); D (and validation, and U with unlabelled.kind="
        "'rest_of_train') are taken from it as for fashion_mnist",
        optional=True,
    ),
    Field(
        "data.val_dir",
        None,
        str,
        "image_folder: validation images, one subfolder per "
        "class (None: carve data.val_per_class from data.train_dir)",
        optional=True,
    ),
    Field(
        "data.test_dir",
        None,
        str,
        "image_folder: test images, one subfolder per class",
        optional=True,
    ),
    Field("data.tfds_name", "imagenet2012", str, "tfds: dataset name"),
    Field(
        "data.tfds_data_dir", None, str, "tfds: data_dir of the ArrayRecord build", optional=True
    ),
    Field("data.train_split", "train", str, "tfds: split used as D"),
    Field("data.test_split", "validation", str, "tfds: split used as test"),
    Field("data.val_split", None, str, "tfds: split used for validation", optional=True),
    Field("data.num_classes", 10, int, "number of classes", minimum=1),
    Field("data.image_size", 28, int, "model input size (square)", minimum=1),
    Field("data.channels", 1, int, "model input channels", choices=(1, 3)),
    Field("data.augment", "pad_crop_flip", str, "training augmentation", choices=AUGMENTATIONS),
    Field(
        "data.eval_transform",
        "none",
        str,
        "evaluation/scoring view of an image",
        choices=EVAL_TRANSFORMS,
    ),
    Field("data.pad", 2, int, "pad_crop_flip: padding in pixels", minimum=0),
    Field(
        "data.mean", (72.94,), tuple, "per-channel mean of uint8 pixels (1 or channels " "entries)"
    ),
    Field(
        "data.std", (90.02,), tuple, "per-channel std of uint8 pixels (1 or channels " "entries)"
    ),
    Field(
        "data.labelled_per_class",
        None,
        int,
        "fashion_mnist/fake/image_folder: D per " "class " "(None: all training images)",
        minimum=1,
        optional=True,
    ),
    Field(
        "data.val_per_class",
        None,
        int,
        "fashion_mnist/fake/image_folder: "
        "validation images per class "
        "carved from training (None: no validation)",
        minimum=1,
        optional=True,
    ),
    Field(
        "data.subset",
        None,
        int,
        "fashion_mnist/fake/image_folder: only "
        "the first N training images "
        "(and N/4 test images)",
        minimum=1,
        optional=True,
    ),
    # video (data.kind in VIDEO_DATA_KINDS; bssl/data/video.py)
    Field("data.clip_len", 8, int, "video: frames per clip", minimum=1),
    Field(
        "data.frame_stride", 1, int, "video: a clip takes every frame_stride-th frame", minimum=1
    ),
    Field(
        "data.num_clips",
        10,
        int,
        "video: uniformly spaced clips per video whose softmax "
        "is averaged in evaluation and scoring (the paper: 10)",
        minimum=1,
    ),
    Field(
        "data.video_frames", 16, int, "moving_fashion_mnist/fake_video: frames per video", minimum=1
    ),
    Field(
        "data.garment_size",
        20,
        int,
        "moving_fashion_mnist: garment size in pixels on " "the data.image_size canvas",
        minimum=1,
    ),
    Field(
        "data.train_csv",
        None,
        str,
        "video_folder: CSV of the training videos (columns "
        "path,label or Kinetics' label,youtube_id,time_start,time_end)",
        optional=True,
    ),
    Field(
        "data.val_csv",
        None,
        str,
        "video_folder: CSV of validation videos (None: carve "
        "data.val_per_class from the training videos)",
        optional=True,
    ),
    Field("data.test_csv", None, str, "video_folder: CSV of the test videos", optional=True),
    Field(
        "data.video_dir",
        None,
        str,
        "video_folder: root of the CSVs' paths (default: " "each CSV's folder)",
        optional=True,
    ),
    Field(
        "data.max_frames",
        None,
        int,
        "video files: decode at most this many frames of " "each",
        minimum=1,
        optional=True,
    ),
    Field("data.fake_train_size", 160, int, "fake: training images", minimum=1),
    Field("data.fake_test_size", 40, int, "fake: test images", minimum=1),
    Field(
        "data.eval_batch_size", 1000, int, "global batch of evaluation", minimum=1, cosmetic=True
    ),
    Field(
        "data.identify_by_content",
        False,
        bool,
        "identify image and video folders and "
        "lists (D, validation, test, U) by a hash of every file's content instead of its "
        "(path, size, mtime): slower, for files rewritten with their old mtime",
        cosmetic=True,
    ),
    # unlabelled: U
    Field("unlabelled.kind", "rest_of_train", str, "source of U", choices=UNLABELLED_KINDS),
    Field(
        "unlabelled.path",
        None,
        str,
        "image_folder / video_list: folder (recursive) or "
        "file list; shards: the --out of `python -m bssl.ingest`",
        optional=True,
    ),
    Field(
        "unlabelled.drop_duplicates",
        True,
        bool,
        "shards: skip exact duplicates (same " "content hash as an earlier image) when scoring",
    ),
    Field(
        "unlabelled.cache_dir",
        None,
        str,
        "shards on gs://: local folder for the shards " "this host reads (default: under TMPDIR)",
        optional=True,
        cosmetic=True,
    ),
    Field(
        "unlabelled.limit", None, int, "use only the first N images of U", minimum=1, optional=True
    ),
    Field("unlabelled.size", 200, int, "fake: images in U", minimum=1),
    Field("unlabelled.tfds_name", None, str, "tfds: dataset used as U", optional=True),
    Field("unlabelled.split", None, str, "tfds: its split", optional=True),
    Field("unlabelled.tfds_data_dir", None, str, "tfds: its data_dir", optional=True),
    # weak: the weakly labelled images of weak_pretrain (bssl/data/weak.py)
    Field(
        "weak.kind",
        "synthetic",
        str,
        "synthetic (tags drawn from U's hidden labels: the "
        "offline demo), tags_file, or captions (the words or hashtags of a tar ingest's "
        "captions)",
        choices=WEAK_KINDS,
    ),
    Field("weak.synonyms_per_class", 3, int, "synthetic: tags of each class", minimum=1),
    Field("weak.distractors", 20, int, "synthetic: tags of no class", minimum=0),
    Field(
        "weak.p_class_tag",
        0.7,
        float,
        "synthetic: probability that an image carries a " "tag of its class",
        minimum=0.0,
    ),
    Field(
        "weak.max_noise_tags", 2, int, "synthetic: up to this many random tags per image", minimum=0
    ),
    Field(
        "weak.resample",
        "sqrt",
        str,
        "images drawn by tag frequency^-1/2 (sqrt), ^-1 " "(inverse) or as they are (none)",
        choices=RESAMPLING,
    ),
    Field(
        "weak.path",
        None,
        str,
        "tags_file: the images (an ingest's --out, or a folder / " "file list)",
        optional=True,
    ),
    Field(
        "weak.tags_file",
        None,
        str,
        "tags_file: one line per image id of weak.path: its " "tag names, whitespace-separated",
        optional=True,
    ),
    Field(
        "weak.vocab_file",
        None,
        str,
        "tags_file, captions: the vocabulary, one tag per "
        "line (optionally '<TAB>class id'); default: the sorted tag names (tags_file), the "
        "weak.vocab_size most frequent caption tags (captions)",
        optional=True,
    ),
    Field(
        "weak.caption_tags",
        "words",
        str,
        "captions: the tags of a caption: its words "
        "(lower-cased, stop words and 1-letter words left out; a #hashtag counts as its "
        "word) or only its #hashtags",
        choices=CAPTION_TAGS,
    ),
    Field(
        "weak.vocab_size",
        1500,
        int,
        "captions without weak.vocab_file: the most " "frequent tags kept (ties by name)",
        minimum=1,
    ),
    Field(
        "weak.min_tag_images",
        2,
        int,
        "captions without weak.vocab_file: a tag is kept "
        "only if at least this many images carry it",
        minimum=1,
    ),
    # transfer: to a target data set (bssl/data/targets.py, bssl/transfer.py)
    Field(
        "transfer.target",
        "digits",
        str,
        "digits (scikit-learn's, offline) or tfds",
        choices=("digits", "tfds"),
    ),
    Field("transfer.tfds_name", "caltech_birds2011", str, "tfds: the target (CUB-200-2011)"),
    Field("transfer.train_split", "train", str, "tfds: its train split"),
    Field("transfer.test_split", "test", str, "tfds: its test split"),
    Field("transfer.tfds_data_dir", None, str, "tfds: its data_dir", optional=True),
    Field(
        "transfer.num_classes",
        None,
        int,
        "tfds: classes, when the dataset does not say",
        optional=True,
        minimum=1,
    ),
    Field(
        "transfer.modes",
        "fc_only,full_ft",
        str,
        "comma-separated: fc_only (frozen "
        "features + L2 logistic regression) and/or full_ft (fine-tune everything)",
        check=lambda v: None
        if v and set(v.split(",")) <= set(TRANSFER_MODES)
        else f"must be a comma-separated subset of {TRANSFER_MODES}, got {v!r}",
    ),
    Field(
        "transfer.models",
        "baseline,teacher,student",
        str,
        "comma-separated models to " "transfer",
        check=lambda v: None
        if v and set(v.split(",")) <= set(TRANSFER_MODELS)
        else f"must be a comma-separated subset of {TRANSFER_MODELS}, got {v!r}",
    ),
    Field("transfer.ft_steps", 300, int, "full_ft: steps", minimum=1),
    Field("transfer.ft_lr", 0.01, float, "full_ft: base learning rate (cosine)", minimum=0.0),
    Field("transfer.ft_batch_size", 64, int, "full_ft: global batch", minimum=1),
    # score + select
    Field(
        "score.eval_copies",
        "exclude",
        str,
        "exclude: images of U that are near-"
        "duplicates of test or validation images (bssl/data/neardup.py) are never scored, "
        "so never in D̂, and are listed; off: not searched",
        choices=("exclude", "off"),
    ),
    Field(
        "score.copy_threshold",
        0.95,
        float,
        "similarity (aligned grey-level correlation, "
        "-1..1) from which an image is a near-duplicate",
        minimum=0.0,
    ),
    Field(
        "score.batch_size",
        1000,
        int,
        "global scoring batch; a resume may change it " "(positions are kept in images)",
        minimum=1,
        cosmetic=True,
    ),
    Field(
        "score.checkpoint_every",
        50,
        int,
        "batches between scoring checkpoints of a " "process",
        minimum=1,
        cosmetic=True,
    ),
    Field(
        "score.num_workers",
        0,
        int,
        "decode worker processes per process (grain "
        "mp_prefetch, one read thread each; 0: decode in num_threads threads of the "
        "process itself; -1: the cores this process may use, minus one)",
        minimum=-1,
        cosmetic=True,
    ),
    Field(
        "score.in_flight",
        2,
        int,
        "scoring batches dispatched to the devices ahead of "
        "the one whose results the host is folding",
        minimum=1,
        cosmetic=True,
    ),
    Field(
        "score.max_k",
        None,
        int,
        "keep a top-K per rank with this K (>= select.k), so "
        "that any select.k <= max_k and select.p <= max_p is selected exactly without "
        "rescoring (sweeps); None: score for select.k and select.p alone",
        minimum=1,
        optional=True,
    ),
    Field(
        "score.max_p",
        None,
        int,
        "with score.max_k: the P kept (>= select.p; default " "select.p)",
        minimum=1,
        optional=True,
    ),
    Field("select.k", 16000, int, "images kept per class (K)", minimum=1),
    Field(
        "select.balanced",
        True,
        bool,
        "True: K images per class (the paper's D̂); False: "
        "the same number of rows, K x num_classes, taken as the globally highest-scoring "
        "(image, class) pairs whatever their class (the paper's unbalanced ablation)",
    ),
    Field("select.p", 10, int, "classes kept per image (P), at most data.num_classes", minimum=1),
    # report
    Field(
        "report.figure_classes",
        3,
        int,
        "classes shown in the selected-images figure",
        minimum=0,
        cosmetic=True,
    ),
    Field(
        "report.figure_images", 8, int, "images per class in that figure", minimum=1, cosmetic=True
    ),
)


def all_fields() -> list[Field]:
  """Every field with its full dotted name (training fields once per training stage)."""
  out = list(FIELDS)
  for s in TRAIN_SECTIONS:
    out += [dataclasses.replace(f, name=f"{s}.{f.name}") for f in TRAIN_FIELDS]
  return out


def _value(f: Field):
  if f.default is None:
    return config_dict.placeholder(f.type)  # settable from the command line
  return f.default if not isinstance(f.default, dict) else dict(f.default)


def base() -> ml_collections.ConfigDict:
  """The base config: every field at its default."""
  root: dict = {}
  for f in all_fields():
    *sections, leaf = f.name.split(".")
    d = root
    for s in sections:
      d = d.setdefault(s, {})
    d[leaf] = _value(f)
  return ml_collections.ConfigDict(root)


def presets(arg: str | None, accepted: Sequence[str]) -> set[str]:
  """The comma-separated presets of ``--config=file.py:a,b``, checked against ``accepted``."""
  chosen = set(filter(None, (arg or "").split(",")))
  unknown = sorted(chosen - set(accepted))
  if unknown:
    raise ConfigError(f"unknown preset(s) {unknown}; accepted: {', '.join(accepted)}")
  return chosen


def override(section: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """``section.update(fields)`` that refuses names the section does not have."""
  unknown = sorted(set(fields) - set(section.keys()))
  if unknown:
    raise TypeError(f"unknown field(s) {unknown}; accepted: {sorted(section.keys())}")
  section.update(fields)
  return section


# ----------------------------------------------------------------------------- checks

ROUND_STAGES = ("score", "select", "pretrain", "finetune")
_ROUND = re.compile(r"^(.+)_r(\d+)$")


def section_of(stage: str) -> str:
  """The config section of a stage: a later round's ``pretrain_r2`` is ``pretrain``."""
  m = _ROUND.match(stage)
  return m.group(1) if m and m.group(1) in ROUND_STAGES else stage


def round_of(stage: str) -> int:
  m = _ROUND.match(stage)
  return int(m.group(2)) if m and m.group(1) in ROUND_STAGES else 1


def round_stage(base: str, r: int) -> str:
  """``base``'s stage in round ``r`` (round 1 keeps the plain name)."""
  return base if r == 1 else f"{base}_r{r}"


def parse_stages(stages) -> tuple[str, ...]:
  names = (
      [s.strip() for s in stages.split(",") if s.strip()]
      if isinstance(stages, str)
      else [str(s) for s in stages]
  )
  bad = [s for s in names if s not in ALL_STAGES]
  if bad or not names:
    raise ConfigError(
        f"stages: unknown stage(s) {bad or names!r}; accepted: "
        f"{', '.join(ALL_STAGES)} (comma-separated)"
    )
  return tuple(s for s in ALL_STAGES if s in names)


def get(cfg, name: str):
  node = cfg
  for part in name.split("."):
    node = node[part]
  return node


def _leaf_names(cfg, prefix: str = "") -> list[str]:
  out = []
  for k in cfg.keys():
    v = cfg[k]
    if isinstance(v, ml_collections.ConfigDict) and k != "model_kwargs":
      out += _leaf_names(v, f"{prefix}{k}.")
    else:  # model_kwargs is one field (a dict), not a section
      out.append(f"{prefix}{k}")
  return out


def _check_field(f: Field, v) -> None:
  if v is None:
    if f.optional:
      return
    raise ConfigError(f"{f.name} must be set ({f.doc}), got None")
  ok_types = f.type if isinstance(f.type, tuple) else (f.type,)
  if f.type is float and isinstance(v, int) and not isinstance(v, bool):
    v = float(v)
  if f.type in (tuple, dict) and isinstance(v, (list, tuple, dict, ml_collections.ConfigDict)):
    pass
  elif isinstance(v, bool) and bool not in ok_types:
    raise ConfigError(f"{f.name} must be {f.type.__name__}, got {v!r}")
  elif not isinstance(v, ok_types):
    raise ConfigError(f"{f.name} must be {getattr(f.type, '__name__', f.type)}, got {v!r}")
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
    msg = f.check(v)
    if msg:
      raise ConfigError(f"{f.name} {msg}")


def validate(
    cfg: ml_collections.ConfigDict, *, num_devices: int | None = None, num_processes: int = 1
) -> None:
  """Raises ConfigError on the first bad field. Cheap: touches no data and no device.

  With ``num_devices`` (all hosts) the batch sizes are checked against the mesh too.
  """
  from bssl import models

  schema = {f.name: f for f in all_fields()}
  unknown = sorted(n for n in _leaf_names(cfg) if n not in schema)
  if unknown:
    raise ConfigError(
        f"unknown config field(s) {unknown}; every field is listed in "
        f"bssl/config.py (e.g. {', '.join(sorted(schema)[:3])}, ...)"
    )
  missing = sorted(n for n in schema if not _has(cfg, n))
  if missing:
    raise ConfigError(
        f"config lacks field(s) {missing}: build recipe configs from " f"bssl.config.base()"
    )
  for name, f in schema.items():
    _check_field(f, get(cfg, name))
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
        "of tag names per image id); see README 'Semi-weak supervision'"
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
    try:
      models.arch_config(s.model, **dict(s.model_kwargs or {}))
    except (ValueError, TypeError) as e:
      raise ConfigError(f"{name}.model: {e}") from None
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


def is_video(cfg) -> bool:
  return cfg.data.kind in VIDEO_DATA_KINDS


def _check_video(cfg) -> None:
  """Video data, video models and video-able stages go together."""
  from bssl import models

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
  if d.augment not in ("pad_crop_flip", "pad_crop", "none"):
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


def _has(cfg, name: str) -> bool:
  node = cfg
  for part in name.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def check_batch_sizes(cfg, num_devices: int, num_processes: int) -> None:
  """Every global batch of every stage splits evenly over processes and devices (scoring
  runs on each process's own devices: a multiple of all devices suffices)."""
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


def same_architecture(a, b) -> bool:
  return a.model == b.model and dict(a.model_kwargs or {}) == dict(b.model_kwargs or {})


def resolve_steps(scfg, num_examples: int) -> int:
  """Training length in steps: ``steps`` when set, else ``epochs`` over ``num_examples``."""
  import math

  if scfg.get("steps") is not None:
    return int(scfg.steps)
  return max(1, math.ceil(float(scfg.epochs) * num_examples / int(scfg.batch_size)))


def _plain(v):
  if isinstance(v, ml_collections.ConfigDict):
    return {k: _plain(v[k]) for k in sorted(v.keys())}
  if isinstance(v, dict):
    return {k: _plain(v[k]) for k in sorted(v)}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  return v


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def scoring_kp(cfg) -> tuple[int, int, bool]:
  """(K, P, ranked) the score stage keeps: (score.max_k, score.max_p or select.p, True)
  when score.max_k is set, else (select.k, select.p, False)."""
  sc = cfg.score
  if sc.get("max_k") is not None:
    return int(sc.max_k), int(sc.get("max_p") or cfg.select.p), True
  return int(cfg.select.k), int(cfg.select.p), False


def _readers(name: str, read: dict[str, list[str]], cosmetic: bool = False) -> str:
  """The stages that read field ``name`` in the tiny presets, from ``read`` (the contents
  of bssl/readers.json: what their stages recorded while they ran, written by
  tests/record_presets.py), or why none does. ``<stage>.<field>``: that stage, and the
  other stages that read one training section's field."""
  if cosmetic:
    return "cosmetic: none"
  none = "no stage of the tiny presets"
  if not name.startswith("<stage>."):
    return ", ".join(read.get(name, ())) or none
  leaf = name[len("<stage>.") :]
  per = {s: list(read.get(f"{s}.{leaf}", ())) for s in TRAIN_SECTIONS}
  own = [s for s in TRAIN_SECTIONS if s in per[s]]
  out = [
      "that stage"
      if own == list(TRAIN_SECTIONS)
      else f"that stage ({', '.join(own)})"
      if own
      else none
  ]
  for s in TRAIN_SECTIONS:
    others = [x for x in per[s] if x != s]
    if s not in per[s]:
      out.append(f"`{s}.{leaf}`: {', '.join(others) or none}")
    elif others:
      out.append(f"`{s}.{leaf}` also {', '.join(others)}")
  return "; ".join(out)


def reference_markdown() -> str:
  """The config reference (docs/config.md): every field of :func:`base` with its type,
  default, the stages that read it and what it means. ``python -m bssl.config`` prints it;
  ``tests/test_docs.py`` fails when docs/config.md is not what this prints. The stages that
  read a field are those whose record held it when the tiny presets ran (bssl/readers.json,
  written by ``tests/record_presets.py``; ``tests/test_recorded_deps.py`` fails when it is
  not what they record), never a declaration."""
  import importlib.resources

  read = json.loads(importlib.resources.files("bssl").joinpath("readers.json").read_text())
  lines = [
      "# Config reference",
      "",
      "Generated from `bssl/config.py` by `python -m bssl.config > docs/config.md` (a test "
      "fails when this file is out of date). Every field can be overridden on the command "
      "line, e.g. `--config.select.k=2000`. *Cosmetic* fields change no stage's result: "
      "changing them between reruns never makes a finished stage stale. The training fields "
      f"exist once per training stage ({', '.join(TRAIN_SECTIONS)}).",
      "",
      "*Read by*: the stages that read the field when the tiny presets (`configs/demo.py`, "
      "`semiweak.py` with weak pre-training and transfer, `video.py`, `resnext.py`, each "
      "`:tiny`) ran, as the stages recorded it while they ran (`bssl/readers.json`, "
      "regenerated by `python tests/record_presets.py`). A stage records a field only when "
      "it reads it, so the list depends on the settings: a field of another data source "
      "(`data.train_dir`, ...) or option says *no stage of the tiny presets*, yet a stage "
      "that reads it under other settings records it and is stale when it changes. "
      "*evaluate* and *report* are rerun every time and record nothing.",
      "",
  ]

  def row(f: Field, name: str) -> str:
    t = f.type.__name__ if isinstance(f.type, type) else "/".join(x.__name__ for x in f.type)
    default = json.dumps(_plain(f.default)) if f.default is not None else "None"
    doc = f.doc
    if f.choices:
      doc += f"; one of {', '.join(f'`{c}`' for c in f.choices)}"
    if f.minimum is not None:
      doc += f"; at least {f.minimum:g}"
    if f.cosmetic:
      doc += " *(cosmetic)*"
    readers = _readers(name, read, f.cosmetic)
    return (
        f"| `{name}` | {t}{' or None' if f.optional else ''} | `{default}` | "
        f"{readers} | {doc.replace('|', '/')} |"
    )

  head = "| field | type | default | read by | meaning |\n|---|---|---|---|---|"
  sections: dict[str, list[Field]] = {}
  for f in FIELDS:
    sections.setdefault(f.name.split(".")[0] if "." in f.name else "(top level)", []).append(f)
  for sec, fs in sections.items():
    lines += [f"## {sec}", "", head] + [row(f, f.name) for f in fs] + [""]
  lines += [
      f"## training stages ({', '.join(TRAIN_SECTIONS)})",
      "",
      "Each of these sections has every field below: `<stage>.<field>`, e.g. "
      "`pretrain.steps`. *Read by* names the stages that read `<stage>.<field>`: that "
      "stage, and where another stage reads one section's field too, which.",
      "",
      head,
  ]
  lines += [row(f, f"<stage>.{f.name}") for f in TRAIN_FIELDS]
  return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
  print(reference_markdown(), end="")
