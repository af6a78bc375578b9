"""The schema: every field bssl reads, with its default, type, one-line doc and whether it
changes a stage's result. :func:`bssl.config.base` builds the base config from it; recipe
configs (``bssl/configs/*.py``) start from that and override fields;
:func:`bssl.config.validate` checks any config against it before any expensive work, naming
the field, the bad value and what is accepted; ``python -m bssl.config`` prints it as
docs/config.md.

Fields marked ``cosmetic`` (log frequency, checkpoint frequency, evaluation batch size,
threads, figures) do not change what a stage produces, so they are left out of the record
of what a stage read (:mod:`bssl.deps`): changing them between reruns resumes instead of
refusing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from bssl.config.names import (
    AUGMENTATIONS,
    BN_MODES,
    CAPTION_TAGS,
    DATA_KINDS,
    DEFAULT_STAGES,
    DTYPES,
    EVAL_TRANSFORMS,
    RESAMPLING,
    SCHEDULES,
    TRAIN_SECTIONS,
    TRANSFER_MODELS,
    TRANSFER_MODES,
    TRANSFER_TARGETS,
    UNLABELLED_KINDS,
    WEAK_KINDS,
)


class ConfigError(ValueError):
  """A config field has a value bssl cannot use."""

  __module__ = "bssl.config"  # its public name (in messages: bssl.config.ConfigError)


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
  # names a file or folder: a stage's record compares it by what it names (bssl.deps:
  # the same inputs moved, symlinked, listed or copied are no change), not as a string
  path: bool = False
  check: Callable[[Any], str | None] | None = None  # returns an error text or None


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fractions(v) -> str | None:
  if not all(_is_number(x) and 0 < x < 1 for x in v) or list(v) != sorted(v):
    return f"must be increasing fractions in (0, 1), e.g. '(0.5, 0.75)', got {tuple(v)!r}"
  return None


def _at_most_1(v) -> str | None:
  return None if v <= 1 else f"must be at most 1, got {v!r}"


def _pixel_stats(positive: bool) -> Callable[[Any], str | None]:
  """data.mean / data.std: numbers (std: positive), one per channel or one for all."""
  what, e = (
      ("positive numbers", "'(58.4, 57.1, 57.4)'")
      if positive
      else ("numbers", "'(123.7, 116.3, 103.5)'")
  )

  def check(v) -> str | None:
    if not v or not all(_is_number(x) and (x > 0 or not positive) for x in v):
      return (
          f"must be {what} on the 0-255 pixel scale, one per channel or one for all, "
          f"e.g. {e}, got {tuple(v)!r}"
      )
    return None

  return check


def _mesh(v) -> str | None:
  if not all(isinstance(x, int) and not isinstance(x, bool) and (x > 0 or x == -1) for x in v):
    return f"must be positive integers (one may be -1), e.g. '(4, 2)', got {tuple(v)!r}"
  if len(v) > 2 or list(v).count(-1) > 1:
    return f"must be (data,) or (data, fsdp), at most one -1, e.g. '(4, 2)', got {tuple(v)!r}"
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
        choices=SCHEDULES,
    ),
    Field(
        "step_boundaries",
        (1 / 3, 2 / 3, 8 / 9),
        tuple,
        "schedule='step': decay points " "as fractions of the run",
        check=_fractions,
    ),
    Field("step_decay", 0.1, float, "schedule='step': factor at each boundary", minimum=0),
    Field(
        "warmup_fraction",
        0.0,
        float,
        "linear warm-up as a fraction of the run",
        minimum=0,
        check=_at_most_1,
    ),
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
        choices=BN_MODES,
    ),
    Field("dtype", "float32", str, "compute dtype", choices=DTYPES),
    Field(
        "init_from",
        None,
        str,
        "start from a folder of variables (bssl.convert output, a "
        "stage's final/), any device count; teacher only: 'baseline'",
        optional=True,
        path=True,
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
        "device mesh: () or (data,) = one data axis over all devices (the train state "
        "replicated); (data, fsdp) = two axes (jax.make_mesh), parameters, gradients and "
        "momentum sharded over fsdp (ZeRO-3; arrays under 2^14 elements replicated), the "
        "batch over both; one entry may be -1 (the remaining devices); data x fsdp must be "
        "the device count (docs/scale.md)",
        cosmetic=True,
        check=_mesh,
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
        path=True,
    ),
    Field(
        "data.train_dir",
        None,
        str,
        "image_folder: training images, one subfolder per "
        "class (sorted names = classes); D (and validation, and U with unlabelled.kind="
        "'rest_of_train') are taken from it as for fashion_mnist",
        optional=True,
        path=True,
    ),
    Field(
        "data.val_dir",
        None,
        str,
        "image_folder: validation images, one subfolder per "
        "class (None: carve data.val_per_class from data.train_dir)",
        optional=True,
        path=True,
    ),
    Field(
        "data.test_dir",
        None,
        str,
        "image_folder: test images, one subfolder per class",
        optional=True,
        path=True,
    ),
    Field("data.tfds_name", "imagenet2012", str, "tfds: dataset name"),
    Field(
        "data.tfds_data_dir",
        None,
        str,
        "tfds: data_dir of the ArrayRecord build",
        optional=True,
        path=True,
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
        "data.mean",
        (72.94,),
        tuple,
        "per-channel mean of uint8 pixels (1 or channels entries)",
        check=_pixel_stats(positive=False),
    ),
    Field(
        "data.std",
        (90.02,),
        tuple,
        "per-channel std of uint8 pixels (1 or channels entries)",
        check=_pixel_stats(positive=True),
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
        path=True,
    ),
    Field(
        "data.val_csv",
        None,
        str,
        "video_folder: CSV of validation videos (None: carve "
        "data.val_per_class from the training videos)",
        optional=True,
        path=True,
    ),
    Field(
        "data.test_csv", None, str, "video_folder: CSV of the test videos", optional=True, path=True
    ),
    Field(
        "data.video_dir",
        None,
        str,
        "video_folder: root of the CSVs' paths (default: " "each CSV's folder)",
        optional=True,
        path=True,
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
        "no effect, kept so that older configs "
        "load: image and video folders and lists are always identified by every file's "
        "content (hashed once, then cached by device, inode, size, mtime and ctime)",
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
        path=True,
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
        path=True,
    ),
    Field(
        "unlabelled.limit", None, int, "use only the first N images of U", minimum=1, optional=True
    ),
    Field("unlabelled.size", 200, int, "fake: images in U", minimum=1),
    Field("unlabelled.tfds_name", None, str, "tfds: dataset used as U", optional=True),
    Field("unlabelled.split", None, str, "tfds: its split", optional=True),
    Field("unlabelled.tfds_data_dir", None, str, "tfds: its data_dir", optional=True, path=True),
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
        check=_at_most_1,
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
        path=True,
    ),
    Field(
        "weak.tags_file",
        None,
        str,
        "tags_file: one line per image id of weak.path: its " "tag names, whitespace-separated",
        optional=True,
        path=True,
    ),
    Field(
        "weak.vocab_file",
        None,
        str,
        "tags_file, captions: the vocabulary, one tag per "
        "line (optionally '<TAB>class id'); default: the sorted tag names (tags_file), the "
        "weak.vocab_size most frequent caption tags (captions)",
        optional=True,
        path=True,
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
        choices=TRANSFER_TARGETS,
    ),
    Field("transfer.tfds_name", "caltech_birds2011", str, "tfds: the target (CUB-200-2011)"),
    Field("transfer.train_split", "train", str, "tfds: its train split"),
    Field("transfer.test_split", "test", str, "tfds: its test split"),
    Field("transfer.tfds_data_dir", None, str, "tfds: its data_dir", optional=True, path=True),
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
        check=_at_most_1,
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
    Field(
        "select.near_duplicates",
        "collapse",
        str,
        "collapse: D̂ counts distinct images: of a family of near-duplicates within U "
        "(bssl/data/neardup.py) at most one member per class is selected, the best ranked; "
        "the score stage keeps K + max(8, K/4) candidates per class for it, D̂ is the first K "
        "distinct, the others are listed in select/near_duplicates.parquet (video: not "
        "searched); off: the plain top-K",
        choices=("collapse", "off"),
    ),
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
