"""A sweep's grid: ``--sweep=<field>=<v1>,<v2>,...`` axes (checked against the config
schema) times ``--seeds``, the points' folder names and each point's config.

Every point is ``{"name", "overrides", "seed"}``; its name is its folder under
``<sweep>/points/``. The name depends on the point's exact values alone (never on the
grid's other values), and different values never share a name: each value is written
as it is when its text names it exactly (numbers, booleans, None, plain words), else as
a readable part plus a hash of its canonical JSON (``folder_label``). So a rerun, a grown
grid or another grid in the same folder finds each point's own work again, and only its.
Points are ordered so that the points sharing a teacher follow each other.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re

from bssl import config as config_lib


class SweepError(ValueError):
  """A bad --sweep / --seeds value (exit 2)."""


def parse_axis(text: str, cfg) -> tuple[str, list]:
  """``field=v1,v2`` -> (field, typed values), checked against the config schema."""
  if "=" not in text:
    raise SweepError(f"--sweep: expected <field>=<v1>,<v2>,..., got {text!r}")
  name, values = text.split("=", 1)
  name = name.strip()
  fields = {f.name: f for f in config_lib.all_fields()}
  if name not in fields:
    raise SweepError(f"--sweep: unknown config field {name!r}")
  f = fields[name]
  if values.lstrip().startswith("["):  # a JSON list: dicts and tuples, e.g. model_kwargs
    try:
      out = json.loads(values)
    except json.JSONDecodeError as e:
      raise SweepError(f"--sweep: {name}={values!r} is not a JSON list ({e})") from None
    kinds = {
        dict: (dict,),
        tuple: (list,),
        bool: (bool,),
        int: (int,),
        float: (int, float),
        str: (str,),
    }.get(f.type, (object,))
    if (
        not isinstance(out, list)
        or not out
        or not all(
            (v is None and f.optional)
            or (isinstance(v, kinds) and not (f.type is not bool and isinstance(v, bool)))
            for v in out
        )
    ):
      raise SweepError(f"--sweep: {name} takes {f.type.__name__} values; got {values!r}")
    if f.type is tuple:
      out = [None if v is None else tuple(v) for v in out]
    if f.type is float:  # 1 and 1.0: one value, one folder
      out = [None if v is None else float(v) for v in out]
    if len({json.dumps(v, sort_keys=True) for v in out}) != len(out):
      raise SweepError(f"--sweep: repeated values for {name!r}: {out}")
    return name, out
  if f.type not in (bool, int, float, str):
    raise SweepError(
        f"--sweep: field {name!r} ({f.type.__name__}) takes a JSON list, "
        f"e.g. --sweep='{name}=[{{...}},{{...}}]'"
    )
  out = []
  for v in values.split(","):
    v = v.strip()
    if not v:
      continue
    if v == "None" and f.optional:  # e.g. unlabelled.limit=...,None: all of U
      out.append(None)
      continue
    try:
      if f.type is bool:
        if v.lower() not in ("true", "false", "1", "0"):
          raise ValueError(v)
        out.append(v.lower() in ("true", "1"))
      else:
        out.append(f.type(v))
    except ValueError:
      raise SweepError(f"--sweep: {name}={v!r} is not a {f.type.__name__}") from None
  if not out:
    raise SweepError(f"--sweep: no values for {name!r}")
  if len(set(out)) != len(out):
    raise SweepError(f"--sweep: repeated values for {name!r}: {out}")
  return name, out


def label(v) -> str:
  """A value, readable (for figures): ``{"widths": [8, 16]}`` -> ``widths-8-16``. Not
  injective (``{"x": -1}`` and ``{"x": 1}`` both read ``x-1``): folders use
  :func:`folder_label`, tables :func:`value_text`."""
  if isinstance(v, (dict, list, tuple)):
    text = json.dumps(v, sort_keys=True)
    return "-".join(t for t in re.split(r"[^A-Za-z0-9._]+", text) if t) or "empty"
  return str(v).replace("/", "_")


def value_text(v) -> str:
  """A value exactly, as a table shows it: compact JSON for dicts and lists."""
  if isinstance(v, (dict, list, tuple)):
    return json.dumps(v, sort_keys=True, separators=(",", ":"))
  return str(v)


_PLAIN = re.compile(r"[A-Za-z0-9._+-]{1,64}\Z")  # no ",", "=", "/" or "~"; not too long


def folder_label(v) -> str:
  """A value as its piece of a point's folder name, a function of the value alone and
  injective: numbers, booleans and None as Python writes them, a plain word (letters,
  digits, ``._+-``) as it is; any other value (a path, a dict, a list, "None" as a
  string) as a readable part, ``~`` and a hash of its canonical JSON
  (``/data/u/v2`` -> ``data_u_v2~<hash>``, which ``/data/u_v2`` does not share). No
  label contains ``,`` or ``=``, so a name splits back into its fields unambiguously."""
  if v is None or isinstance(v, (bool, int, float)):
    return str(v)
  if isinstance(v, str) and _PLAIN.match(v) and v not in ("None", "True", "False"):
    return v
  text = json.dumps(v, sort_keys=True, separators=(",", ":"))
  readable = "_".join(t for t in re.split(r"[^A-Za-z0-9.+-]+", label(v)) if t)[:40]
  return f"{readable or 'value'}~{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def point_name(overrides: dict, seed: int) -> str:
  """A point's folder name: ``<field>=<folder_label>`` for each axis, then the seed."""
  return ",".join([f"{k}={folder_label(v)}" for k, v in overrides.items()] + [f"seed={seed}"])


def points(cfg, axes: list[tuple[str, list]], seeds: list[int]) -> list[dict]:
  """The grid, in an order where points sharing a teacher follow each other."""
  out = []
  for seed in seeds:
    for combo in itertools.product(*[vals for _, vals in axes]):
      overrides = {name: v for (name, _), v in zip(axes, combo)}
      out.append({"name": point_name(overrides, seed), "overrides": overrides, "seed": seed})
  if len({p["name"] for p in out}) != len(out):  # cannot happen (folder_label); a guard
    raise SweepError("--sweep: two points of the grid would share a folder name")
  return out


def point_config(base, point: dict, axes: list[tuple[str, list]]):
  cfg = base.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.seed = int(point["seed"])
    for name, v in point["overrides"].items():
      node = cfg
      *head, last = name.split(".")
      for h in head:
        node = node[h]
      node[last] = v
    # One scoring pass per teacher for every K and P of the grid (derived exactly).
    ks = dict(axes).get("select.k")
    ps = dict(axes).get("select.p")
    if ks or ps:
      cfg.score.max_k = max([int(cfg.select.k)] + [int(k) for k in (ks or [])])
      cfg.score.max_p = max([int(cfg.select.p)] + [int(p) for p in (ps or [])])
  return cfg


def parse_seeds(text: str) -> list[int]:
  """``0,1,2`` -> [0, 1, 2]: distinct non-negative integers."""
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise SweepError(f"--seeds: expected comma-separated integers, got {text!r}") from None
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise SweepError(f"--seeds: expected distinct non-negative integers, got {text!r}")
  return seeds


def parse_grid(base, sweep: list[str], seeds: str) -> tuple[list[tuple[str, list]], list[int]]:
  """The axes of the ``--sweep`` values and the ``--seeds``, with every point's config
  validated before any work (SweepError, naming the point, else)."""
  if any(a.split("=", 1)[0].strip() == "seed" for a in sweep):
    raise SweepError(
        "--sweep=seed=... and --seeds both set the seed: give the seeds with "
        "--seeds=0,1,2 (every point runs once per seed)"
    )
  axes = [parse_axis(a, base) for a in sweep]
  if len({n for n, _ in axes}) != len(axes):
    raise SweepError("--sweep: a field is given twice")
  seed_list = parse_seeds(seeds)
  for p in points(base, axes, seed_list):  # every point's config checked before any work
    try:
      config_lib.validate(point_config(base, p, axes))
    except config_lib.ConfigError as e:
      raise SweepError(f"--sweep point {p['name']}: {e}") from None
  return axes, seed_list
