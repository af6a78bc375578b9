"""The names bssl's config speaks in, each defined here once: the stages and their order, the
training sections, the stages of later rounds, and the values a field may take (data kinds,
augmentations, schedules, ...). The schema (:mod:`bssl.config.fields`) takes its choices from
here, and the modules that act on a field (``bssl/train.py``, ``bssl/data/*``) import the same
tuple, so a new choice is added in one place.
"""

from __future__ import annotations

import re

# ----------------------------------------------------------------------------- stages

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
# The stages a later round of self-training repeats (round r: ``<stage>_r<r>``).
ROUND_STAGES = ("score", "select", "pretrain", "finetune")
# (result key, stage) of the models a run evaluates (later rounds add their own:
# bssl/stages/evaluate.py); here so that bssl.sweep reads them without the stage table
EVALUATED_MODELS = (
    ("baseline", "baseline"),
    ("teacher", "teacher"),
    ("student_pretrained", "pretrain"),
    ("student", "finetune"),
)
TRANSFER_MODES = ("fc_only", "full_ft")
TRANSFER_MODELS = ("baseline", "teacher", "student")
TRANSFER_TARGETS = ("digits", "tfds")

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


# ----------------------------------------------------------------------------- choices

SCHEDULES = ("cosine", "step", "constant")
BN_MODES = ("sync", "per_device")
DTYPES = ("float32", "bfloat16")
WEAK_KINDS = ("synthetic", "tags_file", "captions")
CAPTION_TAGS = ("words", "hashtags")
RESAMPLING = ("none", "sqrt", "inverse")
VIDEO_DATA_KINDS = ("moving_fashion_mnist", "video_folder", "fake_video")
DATA_KINDS = ("fashion_mnist", "image_folder", "tfds", "fake") + VIDEO_DATA_KINDS
UNLABELLED_KINDS = ("rest_of_train", "image_folder", "shards", "tfds", "fake", "video_list")
IMAGE_ONLY_UNLABELLED = ("image_folder", "shards", "tfds")
AUGMENTATIONS = ("pad_crop_flip", "pad_crop", "random_resized_crop_flip", "none")
# video clips: no random-resized crop
VIDEO_AUGMENTATIONS = ("pad_crop_flip", "pad_crop", "none")
EVAL_TRANSFORMS = ("none", "resize_center_crop")
