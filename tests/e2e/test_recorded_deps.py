"""What a stage recorded is exactly what a rerun compares (issue #21): the tiny presets
(configs/demo.py, semiweak.py with weak_pretrain and transfer, video.py, resnext.py) run
once each through the engine; then, for every field of the schema, a config with that
field changed to another valid value must make ``engine.stale_stages`` report exactly the
stages that recorded the field and the stages that read them (nothing is rerun: only the
check). Changing a field no stage recorded, a cosmetic one included, makes nothing stale.

Also the hostile cases: a smaller U refuses the weak pre-training done on the larger one
(it trains on U), and transfer's full fine-tuning records the ``finetune.*`` fields it
trains with even when the student is not transferred (finetune is then not an input of
transfer). And bssl/readers.json (the "read by" column of docs/config.md) is what these
runs record (regenerate it with ``.venv/bin/python tools/record_presets.py``).

The presets run with fewer training steps, no evaluate/report and, in semiweak, transfer
of the baseline and teacher only (tools/record_presets.py says why that records the same
fields); configs/demo.py:tiny is the session's shared run of tests/conftest.py.
"""

import json
import os
import shutil

import ml_collections
import pytest

from bssl import config as config_lib
from bssl import deps, engine, stages
from bssl import workdir as workdir_lib
from bssl.data import recipe
from tools import record_presets as rp

needs_fmnist = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist (the README's commands install it)",
)
BACKEND = "jax"


# ----------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  # the session's (tests/conftest.py): shared with the other tests' runs of these presets
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def demo_run(demo_tiny_run):
  _, wd = demo_tiny_run  # tests/conftest.py's run of configs/demo.py:tiny
  return rp.preset_config("demo"), wd


def _run_fixture(name):
  @pytest.fixture(scope="module")
  def run(tmp_path_factory, jax_cache):
    wd = str(tmp_path_factory.mktemp(f"recorded_{name}"))
    return rp.run_preset(name, wd, cache=jax_cache), wd

  return run


semiweak_run = _run_fixture("semiweak")
video_run = _run_fixture("video")
resnext_run = _run_fixture("resnext")


# ----------------------------------------------------------------------------- changing a field


def _bump(x):
  """Another value of a number, a string, a sequence or a mapping of them."""
  if isinstance(x, bool):
    return not x
  if isinstance(x, int):
    return x + 1
  if isinstance(x, float):
    return x / 2 if 0 < x < 1 else x * 2 if x else 0.5
  if isinstance(x, str):
    return x + "x"
  if isinstance(x, (list, tuple)):
    return type(x)([_bump(x[0])] + list(x[1:])) if x else (1,)
  if isinstance(x, dict):
    if not x:
      return {"widths": (8,)}
    k = sorted(x)[0]
    return dict(x, **{k: _bump(x[k])})
  raise TypeError(f"no other value for {x!r}")


def other_value(field: config_lib.Field, value):
  """A valid value of ``field`` other than ``value``: int + 1, float x 2 (or halved when a
  fraction), bool flipped, another choice, a str with "x" appended (or another subset of
  a comma-separated list), a sequence or mapping with one element changed; for a field
  at None, a value of its type."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  t = field.type if isinstance(field.type, type) else field.type[0]
  candidates = []
  if field.choices:
    i = list(field.choices).index(value) if value in field.choices else -1
    candidates += [
        field.choices[(i + 1 + j) % len(field.choices)] for j in range(len(field.choices))
    ]
  if value is None:
    candidates += [
        {
            int: int(field.minimum or 0) + 1,
            float: 0.5,
            str: "x",
            bool: True,
            tuple: (1,),
            dict: {"widths": (8,)},
        }[t]
    ]
  else:
    if isinstance(value, str) and "," in value:  # a comma-separated list: one less
      candidates.append(value.rsplit(",", 1)[0])
    candidates.append(_bump(value))
    if isinstance(value, str):
      candidates += list(config_lib.TRANSFER_MODES) + list(config_lib.TRANSFER_MODELS)
  for c in candidates:
    if deps.plain(c) == deps.plain(value):
      continue
    try:
      config_lib.check_field(field, c)
    except config_lib.ConfigError:
      continue
    return c
  raise AssertionError(f"no other valid value for {field.name}={value!r}")


def with_field(cfg, name: str, value):
  """A copy of ``cfg`` with field ``name`` set to ``value``."""
  out = cfg.copy_and_resolve_references()
  *path, leaf = name.split(".")
  with out.unlocked():
    node = out
    for p in path:
      node = node[p]
    node[leaf] = value
  assert deps.current_value(out, name) == deps.plain(value), name
  return out


def _upstream(table, cfg) -> dict[str, set[str]]:
  """{stage: every stage it reads, directly or not}."""
  out: dict[str, set[str]] = {}
  for name, st in table.items():
    ups = set(st.reads(cfg))
    for u in list(ups):
      ups |= out.get(u, set())
    out[name] = ups
  return out


@needs_fmnist
@pytest.mark.parametrize("preset", rp.PRESETS)
def test_a_changed_field_makes_stale_exactly_the_stages_that_recorded_it(preset, request):
  cfg, wd = request.getfixturevalue(f"{preset}_run")
  w = workdir_lib.Workdir(wd)
  table = stages.table(cfg)
  recs = rp.records(cfg, wd)
  assert set(recs) >= {"baseline", "teacher", "score", "select", "pretrain", "finetune"}
  schema = {f.name: f for f in config_lib.all_fields()}
  for stage, rec in recs.items():  # only schema fields, never a cosmetic one
    bad = [n for n in rec["fields"] if n not in schema or schema[n].cosmetic]
    assert not bad, f"{preset} {stage} recorded {bad}"
    assert rec["version"] == deps.RECORD_VERSION and rec["backend"] == BACKEND
  data = recipe.build_data(cfg)
  assert engine.stale_stages(table, cfg, w, BACKEND, data) == {}  # as it ran
  upstream = _upstream(table, cfg)

  failures, counts = [], {"recorded": 0, "not recorded": 0, "cosmetic": 0}
  for f in config_lib.all_fields():
    old = deps.current_value(cfg, f.name)
    new = other_value(f, config_lib.get(cfg, f.name))
    cfg2 = with_field(cfg, f.name, new)
    got = engine.stale_stages(stages.table(cfg2), cfg2, w, BACKEND, data)
    direct = {s for s, rec in recs.items() if f.name in rec["fields"]}
    want = {s for s in recs if s in direct or upstream[s] & direct}
    counts["cosmetic" if f.cosmetic else "recorded" if direct else "not recorded"] += 1
    what = f"{f.name}: {old!r} -> {deps.plain(new)!r}"
    if set(got) != want:
      failures.append(
          f"{what}: stale {sorted(got)}, expected {sorted(want)} (recorded by "
          f"{sorted(direct)}): {got}"
      )
      continue
    for s in direct:  # a stage that recorded the field names it
      if not any(line.startswith(f"{f.name}: ") for line in got[s]):
        failures.append(f"{what}: {s} is stale but its reasons do not name it: {got[s]}")
    for s in want - direct:  # the others, because an input is recomputed
      if not all(line.startswith("input ") for line in got[s]):
        failures.append(f"{what}: {s} did not record it but is stale for {got[s]}")
  assert not failures, f"{preset}:\n" + "\n".join(failures)
  assert counts["recorded"] >= 30 and counts["not recorded"] >= 10, counts


# ----------------------------------------------------------------------------- hostile cases


def _tree(folder) -> dict:
  return {
      os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
      for d, _, fs in os.walk(folder)
      for f in fs
  }


@needs_fmnist
def test_a_smaller_U_refuses_the_weak_pretraining_done_on_the_larger(semiweak_run, tmp_path):
  cfg, wd = semiweak_run
  assert cfg.weak.kind == "synthetic" and cfg.unlabelled.limit is None
  rec = rp.records(cfg, wd)["weak_pretrain"]
  assert rec["fields"]["unlabelled.limit"] is None
  w2 = str(tmp_path / "w")
  shutil.copytree(os.path.join(wd, "weak_pretrain"), os.path.join(w2, "weak_pretrain"))
  before = _tree(w2)
  n = len(recipe.build_data(cfg).unlabelled)
  small = rp.preset_config("semiweak")
  small.stages = "weak_pretrain"
  small.unlabelled.limit = n // 2
  with pytest.raises(
      engine.RefusedError, match=rf"weak_pretrain: unlabelled\.limit: None -> {n // 2}"
  ):
    engine.run_recipe(small, w2)
  assert _tree(w2) == before  # refused before writing anything
  stale = engine.stale_stages(
      stages.table(small), small, workdir_lib.Workdir(w2), BACKEND, recipe.build_data(small)
  )
  assert list(stale) == ["weak_pretrain"]
  # the control: the same U skips it
  same = rp.preset_config("semiweak")
  same.stages = "weak_pretrain"
  assert engine.run_recipe(same, w2) == {}
  assert json.load(open(os.path.join(w2, "weak_pretrain", "done.json")))["record"] == rec


@needs_fmnist
def test_transfer_full_ft_records_the_finetune_fields_it_trains_with(semiweak_run, tmp_path):
  cfg, wd = semiweak_run
  table = stages.table(cfg)
  assert "student" not in cfg.transfer.models.split(",") and "full_ft" in cfg.transfer.modes
  assert "finetune" not in table["transfer"].reads(cfg)
  rec = rp.records(cfg, wd)["transfer"]
  for f in ("momentum", "weight_decay", "nesterov", "label_smoothing", "bn_mode", "dtype"):
    assert f"finetune.{f}" in rec["fields"], f
  for f in ("ft_steps", "ft_lr", "ft_batch_size", "modes", "models", "target"):
    assert f"transfer.{f}" in rec["fields"], f
  # ... and not those transfer sets itself (its own length, rate, batch, schedule, start):
  # changing them must not make transfer stale (the old code recorded all of finetune)
  for f in (
      "steps",
      "epochs",
      "lr",
      "batch_size",
      "schedule",
      "warmup_fraction",
      "warmup_steps",
      "init_from",
      "model",
      "model_kwargs",
  ):
    assert f"finetune.{f}" not in rec["fields"], f
  w2 = str(tmp_path / "w")
  shutil.copytree(wd, w2)
  before = _tree(w2)
  changed = rp.preset_config("semiweak")
  changed.stages = "transfer"
  changed.finetune.weight_decay = cfg.finetune.weight_decay * 2
  with pytest.raises(engine.RefusedError, match=r"transfer: finetune\.weight_decay: "):
    engine.run_recipe(changed, w2)
  assert _tree(w2) == before


# ----------------------------------------------------------------------------- readers.json


@needs_fmnist
def test_readers_json_is_what_the_tiny_presets_record(
    demo_run, semiweak_run, video_run, resnext_run
):
  runs = (demo_run, semiweak_run, video_run, resnext_run)
  got = rp.readers([rp.records(cfg, wd) for cfg, wd in runs])
  want = rp.committed()
  diff = [
      f"{f}: committed {want.get(f)}, recorded {got.get(f)}"
      for f in sorted(set(got) | set(want))
      if got.get(f) != want.get(f)
  ]
  assert not diff, (
      f"bssl/readers.json is not what the tiny presets record; regenerate it "
      f"with `{rp.REGENERATE}` (then `.venv/bin/python -m bssl.config > "
      f"docs/config.md`):\n" + "\n".join(diff)
  )
  schema = {f.name: f for f in config_lib.all_fields()}
  assert all(f in schema and not schema[f].cosmetic for f in got)
