"""The base config and what recipes and stages do with a config: :func:`base` builds every
field of the schema at its default; a recipe (``bssl/configs/*.py``) picks its presets with
:func:`presets` and sets fields with :func:`override`; the other helpers read a config the
same way wherever they are called (the stages to run, image or video, training length, the
K and P scoring keeps).

Seeds are a field, not a preset: ``--config.seed=N``. The ``seedN`` presets the recipes once
had are refused with that hint (:func:`presets`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict

from bssl.config.fields import ConfigError, Field, all_fields
from bssl.config.names import ALL_STAGES, VIDEO_DATA_KINDS

_SEED_PRESET = re.compile(r"seed(\d+)")


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


def presets(
    arg: str | None, accepted: Sequence[str], seed_presets_were: str | None = None
) -> set[str]:
  """The comma-separated presets of ``--config=file.py:a,b``, checked against ``accepted``.

  A ``seedN`` preset (removed: the seed is the field ``seed``) is refused with the command
  that replaces it, ``--config.seed=N``; ``seed_presets_were`` names the preset that the
  recipe's ``seedN`` also implied (video: ``demo``), to be given with it.
  """
  chosen = set(filter(None, (arg or "").split(",")))
  for p in sorted(chosen - set(accepted)):
    m = _SEED_PRESET.fullmatch(p)
    if m:
      n = m.group(1)
      if seed_presets_were:
        raise ConfigError(
            f"preset {p!r} was removed: use the preset {seed_presets_were!r} and pass "
            f"--config.seed={n} ({p} was {seed_presets_were} with seed {n})"
        )
      raise ConfigError(f"preset {p!r} was removed: pass --config.seed={n} instead")
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


def get(cfg, name: str):
  """The value of the dotted field ``name`` (e.g. ``select.k``)."""
  node = cfg
  for part in name.split("."):
    node = node[part]
  return node


def parse_stages(stages) -> tuple[str, ...]:
  """``stages`` (comma-separated or a sequence) checked and put in the recipe's order."""
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


def is_video(cfg) -> bool:
  return cfg.data.kind in VIDEO_DATA_KINDS


def same_architecture(a, b) -> bool:
  return a.model == b.model and dict(a.model_kwargs or {}) == dict(b.model_kwargs or {})


def resolve_steps(scfg, num_examples: int) -> int:
  """Training length in steps: ``steps`` when set, else ``epochs`` over ``num_examples``."""
  if scfg.get("steps") is not None:
    return int(scfg.steps)
  return max(1, math.ceil(float(scfg.epochs) * num_examples / int(scfg.batch_size)))


def scoring_kp(cfg) -> tuple[int, int, bool]:
  """(K, P, ranked) the score stage keeps: (score.max_k, score.max_p or select.p, True)
  when score.max_k is set, else (select.k, select.p, False)."""
  sc = cfg.score
  if sc.get("max_k") is not None:
    return int(sc.max_k), int(sc.get("max_p") or cfg.select.p), True
  return int(cfg.select.k), int(cfg.select.p), False


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
