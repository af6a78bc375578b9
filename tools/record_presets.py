"""A generator, not a test: runs the tiny presets through the engine and writes what their
stages recorded to ``bssl/readers.json`` (for each config field, the stages that read it in
some tiny preset, shown by ``python -m bssl.config`` in docs/config.md).

Regenerate bssl/readers.json (a few minutes on 2 CPU cores) after a change to what a stage
reads::

    .venv/bin/python tools/record_presets.py

``tests/e2e/test_recorded_deps.py`` runs the same presets and fails when bssl/readers.json
is not what they record.

The presets run as their ``tiny`` configs say, except for values that change no field a
stage reads (:func:`preset_config`): 2 training steps, checkpoints only at the end, no
evaluate / report (not fingerprinted: nothing recorded), and, in semiweak, transfer of
the baseline and the teacher only (the student's transfer is the same code; with it left
out, the transfer stage does not read the fine-tuned student, so that what full
fine-tuning reads of ``finetune.*`` is checked on its own). configs/demo.py:tiny runs
exactly as tests/conftest.py's shared ``demo_tiny_run`` (which the tests reuse).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys

if __name__ == "__main__":  # as tests/conftest.py: CPU, 8 fake devices
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  _flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

READERS = os.path.join(ROOT, "bssl", "readers.json")
REGENERATE = ".venv/bin/python tools/record_presets.py"
PRESETS = ("demo", "semiweak", "video", "resnext")


def preset_config(name: str):
  """``configs/<name>.py:tiny`` as the tests run it (see the module doc)."""
  cfg = importlib.import_module(f"bssl.configs.{name}").get_config("tiny")
  if name == "demo":  # exactly tests/conftest.py's demo_tiny_run
    return cfg
  from bssl import config as config_lib

  stages = config_lib.parse_stages(cfg.stages)
  cfg.stages = ",".join(s for s in stages if s not in ("evaluate", "report"))
  for s in config_lib.TRAIN_SECTIONS:
    if cfg[s].steps:
      cfg[s].steps = 2
    cfg[s].checkpoint_every = 0
  if "transfer" in stages:
    cfg.transfer.models = "baseline,teacher"
    cfg.transfer.ft_steps = 2
  return cfg


@contextlib.contextmanager
def compilation_cache(folder: str | None):
  """JAX's persistent compilation cache in ``folder`` for the duration (baseline, pretrain
  and finetune of a preset compile the same programs), then off again, as it was."""
  if folder is None:
    yield
    return
  import jax

  try:
    from jax.experimental.compilation_cache import compilation_cache as cc

    cc.reset_cache  # noqa: B018
  except (ImportError, AttributeError):  # another JAX: run without
    yield
    return
  old = (
      jax.config.jax_compilation_cache_dir,
      jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()


def run_preset(name: str, workdir: str, cache: str | None = None):
  """Runs the preset's stages in ``workdir`` (in this process); returns its config."""
  from bssl import deps, engine

  cfg = preset_config(name)
  deps.forget_identities()
  with compilation_cache(cache):
    engine.run_recipe(cfg, workdir)
  return cfg


def records(cfg, workdir: str) -> dict[str, dict]:
  """{stage: record} of the fingerprinted stages of ``workdir``, in table order."""
  from bssl import stages
  from bssl import workdir as workdir_lib

  wd = workdir_lib.Workdir(workdir)
  out = {}
  for name, st in stages.table(cfg).items():
    done = wd.done(name)
    if st.fingerprinted and done is not None:
      assert "record" in done, f"{workdir}: {name}/done.json has no record"
      out[name] = done["record"]
  return out


def readers(all_records) -> dict[str, list[str]]:
  """{field: stages that recorded it in any of ``all_records`` (a list of {stage:
  record}), in recipe order}."""
  from bssl import config as config_lib

  order = {s: i for i, s in enumerate(config_lib.ALL_STAGES)}
  out: dict[str, set] = {}
  for recs in all_records:
    for stage, rec in recs.items():
      base = config_lib.section_of(stage)
      for field in rec.get("fields") or {}:
        out.setdefault(field, set()).add(base)
  return {f: sorted(s, key=lambda x: (order.get(x, len(order)), x)) for f, s in sorted(out.items())}


def dumps(rd: dict) -> str:
  """bssl/readers.json's text: one field a line, sorted."""
  return (
      "{\n"
      + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(rd.items()))
      + "\n}\n"
  )


def committed() -> dict:
  with open(READERS) as f:
    return json.load(f)


def main() -> None:
  import tempfile

  t = tempfile.mkdtemp(prefix="bssl_record_presets_")
  all_records = []
  for name in PRESETS:
    wd = os.path.join(t, name)
    cfg = run_preset(name, wd, cache=os.path.join(t, "jax_cache"))
    all_records.append(records(cfg, wd))
  with open(READERS, "w") as f:
    f.write(dumps(readers(all_records)))
  print(f"wrote {READERS} (work directories in {t})")


if __name__ == "__main__":
  main()
