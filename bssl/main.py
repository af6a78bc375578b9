"""Entry point: ``python -m bssl.main --config=configs/demo.py --workdir=/tmp/run`` (or
``bssl --config=demo --workdir=...`` once installed: the packaged configs are found from
any folder).

``--config.<field>=<value>`` overrides a field (e.g. ``--config.select.k=2000``);
``--config.stages=teacher,score`` runs a subset. Rerunning the same command after a
crash or preemption continues where the work directory (local or ``gs://``) left off.

Exit codes: 0 done; 2 a user error (bad flag, config, data or work directory: one line on
stderr, nothing written); 143 preempted by SIGTERM (a checkpoint was saved; rerun).
"""

import os
import sys

from bssl import hostmem

hostmem.tune_malloc()  # before JAX starts its threads (see bssl/hostmem.py)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bssl import parallel  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:preset]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Work directory for all artifacts " "(a local folder or gs://bucket/prefix)."
)
_RECOMPUTE_STALE = flags.DEFINE_bool(
    "recompute_stale",
    False,
    "Delete the stages of --workdir that are stale (made with "
    "another config or other inputs, or reading such a stage), printing each, and rerun "
    "them; without it such a run is refused, naming every stale folder.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (also: BSSL_DISTRIBUTED=1)."
)


def fail(msg: str, code: int = 2):
  print(f"bssl: error: {msg}", file=sys.stderr, flush=True)
  sys.exit(code)


def user_errors() -> tuple[type, ...]:
  """The exceptions that are the user's to fix: printed as one line, exit code 2."""
  from bssl import config, train, workdir
  from bssl.data.sources import DataError
  from bssl.scoring import IncompleteScoringError

  return (
      config.ConfigError,
      DataError,
      FileNotFoundError,
      NotADirectoryError,
      workdir.CorruptArtifactError,
      train.VariablesMismatchError,
      IncompleteScoringError,
  )


def config_and_workdir(no_workdir: str):
  """The loaded --config (a config file that failed, or none given: one line, exit 2) after
  checking that --workdir is given (else ``no_workdir``, exit 2)."""
  try:
    cfg = _CONFIG.value
    if cfg is not None:
      cfg.keys()  # a config file that failed to load raises here
  except Exception as e:
    fail("--config: " + " ".join(str(e).split())[:600])
  if cfg is None:
    fail("--config is required, e.g. --config=configs/demo.py")
  if not _WORKDIR.value:
    fail(no_workdir)
  return cfg


def resolve_config_path(arg: str) -> str:
  """``--config`` value with the packaged configs found from anywhere: ``demo``,
  ``demo.py`` or ``configs/demo.py`` (with an optional ``:preset``) that is not a file
  here names ``bssl/configs/demo.py`` of the installed package."""
  path, sep, preset = arg.partition(":")
  if os.path.isfile(path):
    return arg
  name = os.path.basename(path)
  name = name if name.endswith(".py") else name + ".py"
  packaged = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", name)
  if os.path.dirname(path) in ("", "configs", "bssl/configs") and os.path.exists(packaged):
    return packaged + sep + preset
  return arg


def _resolve_config_flag(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve_config_path(a[len("--config=") :])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config_path(out[i + 1])
  return out


def parse_flags(argv):
  """absl's parser, with flag and config-file errors as one line and exit code 2."""
  argv = _resolve_config_flag(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # a config file that raised: absl embeds its traceback; its last line is the error
    text = lines[-1] if "Traceback" in str(e) else " ".join(lines)
    flag = lines[0].split(":")[0] if lines else "flags"
    fail(f"{flag}: {text}"[:600])
  except (FileNotFoundError, OSError) as e:
    fail(f"--config: {e}")
  except Exception as e:
    fail(f"--config: {type(e).__name__}: {e}")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  # Libraries (orbax above all) log every checkpoint step at INFO; bssl prints its own
  # progress lines. `--verbosity=0` (absl's flag) brings their logs back.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  cfg = config_and_workdir(
      "--workdir is required, e.g. --workdir=/tmp/bssl_demo or " "gs://bucket/run"
  )
  # Multi-host init happens before anything touches devices.
  parallel.maybe_initialize_distributed(force=_DISTRIBUTED.value)
  from bssl import engine, train

  try:
    engine.run_recipe(cfg, _WORKDIR.value, recompute_stale=_RECOMPUTE_STALE.value)
  except user_errors() as e:
    fail(str(e))
  except train.Preempted as e:
    print(f"bssl: {e}; rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(143)


def run():
  """The ``bssl`` console command (= ``python -m bssl.main``)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
