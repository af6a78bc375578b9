"""bssl's config: the schema of every field (:mod:`~bssl.config.fields`), the names it
speaks in, each defined once (:mod:`~bssl.config.names`: stages, data kinds, augmentations,
...), the base config and the helpers recipes and stages use (:mod:`~bssl.config.base`), the
cross-field checks run before any work (:mod:`~bssl.config.validate`) and the generator of
docs/config.md (:mod:`~bssl.config.reference`; ``python -m bssl.config``).

Callers import from here: ``from bssl import config``; ``config.base()``,
``config.validate(cfg)``, ``config.ALL_STAGES``. The package imports :mod:`bssl.models` (the
architecture checks of :func:`validate`): ``bssl/data/`` and ``bssl/deps.py``, which must not
reach the models, import :mod:`bssl.config.names` or :mod:`bssl.config.fields` directly.
"""

from bssl.config.base import (
    base,
    get,
    is_video,
    override,
    parse_stages,
    presets,
    resolve_steps,
    same_architecture,
    scoring_kp,
    to_json,
)
from bssl.config.fields import FIELDS, TRAIN_FIELDS, ConfigError, Field, all_fields
from bssl.config.names import (
    ALL_STAGES,
    AUGMENTATIONS,
    BN_MODES,
    CAPTION_TAGS,
    DATA_KINDS,
    DEFAULT_STAGES,
    DTYPES,
    EVAL_TRANSFORMS,
    EVALUATED_MODELS,
    IMAGE_ONLY_UNLABELLED,
    RESAMPLING,
    ROUND_STAGES,
    SCHEDULES,
    TRAIN_SECTIONS,
    TRANSFER_MODELS,
    TRANSFER_MODES,
    TRANSFER_TARGETS,
    UNLABELLED_KINDS,
    VIDEO_AUGMENTATIONS,
    VIDEO_DATA_KINDS,
    WEAK_KINDS,
    round_of,
    round_stage,
    section_of,
)
from bssl.config.reference import reference_markdown
from bssl.config.validate import check_batch_sizes, check_field, check_paths, validate

__all__ = [
    "ALL_STAGES",
    "AUGMENTATIONS",
    "BN_MODES",
    "CAPTION_TAGS",
    "DATA_KINDS",
    "DEFAULT_STAGES",
    "DTYPES",
    "EVALUATED_MODELS",
    "EVAL_TRANSFORMS",
    "FIELDS",
    "IMAGE_ONLY_UNLABELLED",
    "RESAMPLING",
    "ROUND_STAGES",
    "SCHEDULES",
    "TRAIN_FIELDS",
    "TRAIN_SECTIONS",
    "TRANSFER_MODELS",
    "TRANSFER_MODES",
    "TRANSFER_TARGETS",
    "UNLABELLED_KINDS",
    "VIDEO_AUGMENTATIONS",
    "VIDEO_DATA_KINDS",
    "WEAK_KINDS",
    "ConfigError",
    "Field",
    "all_fields",
    "base",
    "check_batch_sizes",
    "check_field",
    "check_paths",
    "get",
    "is_video",
    "override",
    "parse_stages",
    "presets",
    "reference_markdown",
    "resolve_steps",
    "round_of",
    "round_stage",
    "same_architecture",
    "scoring_kp",
    "section_of",
    "to_json",
    "validate",
]
