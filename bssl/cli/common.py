"""What every bssl command shares: --config/--workdir, one error path, exit codes.

Exit codes: 0 done; 2 a user error (a bad flag, config, data or work directory), printed
as ONE line ``<prog>: error: <message>`` on stderr with no traceback, and a full disk
(ENOSPC or a quota, wherever it is raised: orbax, a bssl write, Parquet): one line naming
the path and the space left there (what was saved stays; rerun the same command once space
is freed and it resumes); 143 preempted by SIGTERM (a checkpoint was saved; rerun the same
command to resume).

``--config.<field>=None`` (or ``none``, ``null``) sets a field that accepts None (an
optional field of the schema, :mod:`bssl.config.fields`) to None, whatever its type; for
other fields it stays the text it is. An override of a field the schema does not have is
refused (one line, exit 2) with the nearest names, before the config is loaded.

API (a program in bssl/cli/ defines its own flags at module top, then):

- ``CONFIG, WORKDIR = define_config_flags()``: the shared ``--config`` (a config file,
  ``configs/demo.py:tiny``, or a packaged one by name, ``demo:tiny``, from any folder;
  ``--config.<field>=<v>`` overrides) and ``--workdir`` (local or gs://). Only programs
  that take a recipe call it; nobody reads another program's flags.
- ``config_and_workdir(no_workdir)``: the loaded config after checking both flags
  (missing or broken: one line, exit 2; ``no_workdir`` is the message for a missing
  --workdir). ``WORKDIR.value`` is then set. ``define_workdir_flag()``: --workdir alone.
- ``DISTRIBUTED = define_distributed_flag()``: ``--distributed`` (bssl, bssl-sweep), for
  ``parallel.maybe_initialize_distributed(force=DISTRIBUTED.value)``.
- ``HELP_FLAGS``: the arguments that print the program's help (stdout, exit 0).
- ``fail(msg, code=2)``: print ``<prog>: error: <msg>`` (whitespace folded to one line)
  and exit.
- ``user_errors()``: the exception classes that are the user's to fix (exit 2).
- ``run(main_fn, prog=..., errors=...)``: the console command. absl's ``app.run`` with
  flag errors as one line (exit 2), ``--help`` on stdout (exit 0), positional arguments
  refused, ``errors`` (default ``user_errors()``) raised by ``main_fn`` as one line
  (exit 2) and ``train.Preempted`` as exit 143.
- ``call(main_fn, argv, prog=..., errors=...)``: the same in-process for tests (``argv``
  without the program name; flags parsed afresh); returns ``main_fn``'s result (0 when
  None), raises SystemExit on an error.
"""

from __future__ import annotations

import difflib
import logging as py_logging
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from bssl import config, scoring, storage, train
from bssl.data.sources import DataError

_PROG = ["bssl"]  # the name errors are printed under (set_program, by run() / call())
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")  # help on stdout, exit 0
_SHARED: dict = {}


def set_program(name: str) -> None:
  """Names the program that :func:`fail` and the preemption line print under (``run`` and
  ``call`` do it; a command with its own argument walk, like ``cli/local.py``, calls it)."""
  _PROG[0] = name


def fail(msg: str, code: int = 2) -> NoReturn:
  """One line on stderr, ``<prog>: error: <msg>``, then exit ``code``."""
  print(f"{_PROG[0]}: error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
  sys.exit(code)


def user_errors() -> tuple[type[BaseException], ...]:
  """The exceptions that are the user's to fix: printed as one line, exit code 2."""
  return (
      config.ConfigError,
      DataError,
      FileNotFoundError,
      NotADirectoryError,
      storage.CorruptArtifactError,
      train.VariablesMismatchError,
      scoring.IncompleteScoringError,
  )


def define_config_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """Defines ``--config`` and ``--workdir`` (once per process); returns their holders."""
  if "config" not in _SHARED:
    _SHARED["config"] = config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py[:preset]).", lock_config=True
    )
  return _SHARED["config"], define_workdir_flag()


def define_workdir_flag() -> flags.FlagHolder:
  """Defines ``--workdir`` alone (once per process; bssl-reshard reads a run's)."""
  if "workdir" not in _SHARED:
    _SHARED["workdir"] = flags.DEFINE_string(
        "workdir", None, "Work directory for all artifacts (a local folder or gs://bucket/prefix)."
    )
  return _SHARED["workdir"]


def define_distributed_flag() -> flags.FlagHolder:
  """Defines ``--distributed`` (once per process); returns its holder."""
  if "distributed" not in _SHARED:
    _SHARED["distributed"] = flags.DEFINE_bool(
        "distributed", False, "Call jax.distributed.initialize() (also: BSSL_DISTRIBUTED=1)."
    )
  return _SHARED["distributed"]


def config_and_workdir(no_workdir: str):
  """The loaded --config (a config file that failed, or none given: one line, exit 2) after
  checking that --workdir is given (else ``no_workdir``, exit 2)."""
  config_flag, workdir_flag = define_config_flags()
  try:
    cfg = config_flag.value
    if cfg is not None:
      cfg.keys()  # a config file that failed to load raises here
  except Exception as e:
    fail("--config: " + " ".join(str(e).split())[:600])
  if cfg is None:
    fail("--config is required, e.g. --config=configs/demo.py")
  if not workdir_flag.value:
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
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  packaged = os.path.join(here, "configs", name)
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


def _print_help(argv: list[str], doc: str | None, module: str | None) -> NoReturn:
  """``--help``: the program's docstring and its own flags (``--helpfull``: every flag)."""
  f = flags.FLAGS
  print((doc or "").strip() + "\n")
  if "--helpfull" in argv:
    print(f.get_help())
  else:
    by_module = f.flags_by_module_dict()
    mods = [m for m in (module, __name__) if m in by_module]
    mods += [m for m in by_module if m.startswith("ml_collections") and m not in mods]
    print("\n".join(f.module_help(m) for m in mods if f.module_help(m).strip()))
    print("\nTry --helpfull to get a list of all flags.")
  sys.exit(0)


_NONE_WORDS = ("None", "none", "null")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", re.S)


def _overrides(args: list[str]) -> list[tuple[int, int, str, str | None]]:
  """(first index, last index, field, value) of each ``--config.<field>[=| ]<value>``."""
  out, i = [], 0
  while i < len(args):
    m = _OVERRIDE.match(args[i])
    if m and args[i] != "--":
      value, last = m.group(2), i
      is_bool = args[i].startswith(("--noconfig.", "-noconfig."))
      if value is None and not is_bool and i + 1 < len(args) and not args[i + 1].startswith("-"):
        value, last = args[i + 1], i + 1  # "--config.x value"
      out.append((i, last, m.group(1), value))
      i = last
    i += 1
  return out


def _unknown_field(name: str, schema: dict) -> str | None:
  """The refusal of an override of a field the schema does not have (None: it has it)."""
  sections = {n.rsplit(".", 1)[0] for n in schema if "." in n}
  if name in schema or name in sections:
    return None
  head, _, _ = name.rpartition(".")
  if head in schema and schema[head].type is dict:
    return None  # an entry of a dict field (model_kwargs): the recipe's dict decides
  near = difflib.get_close_matches(name, list(schema), n=3, cutoff=0.75)
  if not near and head in sections:  # the leaf alone, within its section
    leaves = [n[len(head) + 1 :] for n in schema if n.startswith(head + ".")]
    near = [
        f"{head}.{m}" for m in difflib.get_close_matches(name[len(head) + 1 :], leaves, 3, 0.75)
    ]
  if near:
    hint = f"did you mean {' or '.join(near)}? "
  else:  # nothing close: the nearest names of its section (or of all) all the same
    pool = [n for n in schema if n.startswith(head + ".")] if head in sections else list(schema)
    hint = f"nearest names: {', '.join(difflib.get_close_matches(name, pool, 3, 0.0))}; "
  return (
      f"--config.{name}: no such config field; {hint}every field is listed in docs/config.md "
      f"(or run `python -m bssl.config`)"
  )


def _check_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """``argv`` without the ``--config.<field>=None`` overrides of fields that accept None
  (set to None after parsing: the field's own parser would take "None" as text, or fail
  on it) and without all but the last override of a field given more than once, and the
  fields set to None; an override of an unknown field fails here (one line)."""
  if "config" not in _SHARED:
    return argv, []
  schema = {f.name: f for f in config.all_fields()}
  end = argv.index("--") if "--" in argv else len(argv)
  found = _overrides(argv[1:end])
  for _, _, name, _ in found:
    msg = _unknown_field(name, schema)
    if msg:
      fail(msg)
  last = {name: value for _, _, name, value in found}  # the last override of a field wins
  to_none = [n for n, v in last.items() if v in _NONE_WORDS and n in schema and schema[n].optional]
  drop = {j + 1 for i, k, n, _ in found if n in to_none for j in range(i, k + 1)}
  # an override given twice: only the last one is passed on (the parser of a tuple field
  # would join the values, e.g. step_boundaries=0.3 then =0.5 gave (0.3, 0.5))
  final = {n: i for i, _, n, _ in found}
  drop |= {j + 1 for i, k, n, _ in found if final[n] != i for j in range(i, k + 1)}
  return [a for j, a in enumerate(argv) if j not in drop], to_none


def _set_none(names: list[str]) -> None:
  if not names:
    return
  cfg = flags.FLAGS["config"].value
  if cfg is None:
    return
  try:
    for name in names:
      *sections, leaf = name.split(".")
      node = cfg
      for part in sections:
        node = node[part]
      node[leaf] = None
  except Exception:  # a config file that failed to load: config_and_workdir says why
    return


def parse_flags(argv: Sequence[str], doc: str | None = None, module: str | None = None):
  """absl's parser, with flag and config-file errors as one line and exit code 2."""
  argv = _resolve_config_flag(list(argv))
  args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
  if any(a in HELP_FLAGS for a in args):
    _print_help(args, doc, module)
  argv, to_none = _check_overrides(argv)
  try:
    rest = flags.FLAGS(argv)
    _set_none(to_none)
    return rest
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # a config file that raised: absl embeds its traceback; its last line is the error
    text = lines[-1] if "Traceback" in str(e) else " ".join(lines)
    flag = lines[0].split(":")[0] if lines else "flags"
    fail((text if text.startswith(flag) else f"{flag}: {text}")[:600])
  except (FileNotFoundError, OSError) as e:
    fail(f"--config: {e}")
  except Exception as e:
    if isinstance(e, (AttributeError, KeyError)):
      _missing_entry(argv, e)
    fail(f"--config: {type(e).__name__}: {e}")


def _missing_entry(argv: list[str], e: BaseException) -> None:
  """An override of an entry a dict field (model_kwargs) of the recipe does not have: one
  line saying so (ml_collections says only ``AttributeError: "'name'"``)."""
  schema = {f.name: f for f in config.all_fields()}
  for _, _, name, _ in _overrides(argv[1:]):
    head, _, leaf = name.rpartition(".")
    if head in schema and schema[head].type is dict and repr(leaf) in str(e):
      fail(
          f"--config.{name}: the recipe's {head} has no entry {leaf!r}, and entries cannot "
          f"be added one by one; give the whole dict, e.g. --config.{head}=\"{{'{leaf}': "
          f'...}}" (its entries for each model: docs/config.md)'
      )


def disk_full_message(exc: BaseException) -> str | None:
  """The one line for an exception that is (or wraps) a full disk, else None: the path
  being written, the space left on its disk, and that a rerun resumes."""
  where = storage.disk_full(exc)
  if where is None:
    return None
  workdir = _SHARED["workdir"].value if "workdir" in _SHARED else None
  what = f"writing {where}" if where else f"in {workdir or os.getcwd()}"
  free = storage.free_space(where or workdir or os.getcwd())
  return (
      f"no space left on device {what}"
      + (f" ({free} on its disk)" if free else "")
      + "; free space there (or raise the quota) and rerun the same command: it resumes "
      "from what was saved"
  )


class _DiskFullLogs(py_logging.Filter):
  """Drops the log records of a full disk (orbax logs each failed write with its
  traceback, from every thread, before the error reaches bssl): the error is said once,
  as one line, when it reaches the command."""

  seen = False  # a full disk was seen in this process

  def filter(self, record: py_logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and (storage.disk_full(exc) is not None or _aftermath(exc)):
      _DiskFullLogs.seen = True
      return False
    try:
      text = record.getMessage()
    except Exception:
      return True
    full = any(t in text for t in storage.DISK_FULL_TEXTS)
    _DiskFullLogs.seen |= full
    return not full and not (_DiskFullLogs.seen and "Event loop is closed" in text)


def _aftermath(exc: BaseException) -> bool:
  """An error of orbax's writer threads after a full disk stopped a save (their asyncio
  loop was closed under them): said by the one line of the full disk, not again."""
  return _DiskFullLogs.seen and isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _thread_errors(args) -> None:
  """threading.excepthook: a full disk's errors in background threads (and their
  aftermath) are left to the command's one line; any other error as Python prints it."""
  exc = args.exc_value
  if exc is not None and (storage.disk_full(exc) is not None or _aftermath(exc)):
    _DiskFullLogs.seen = True
    return
  _default_thread_errors(args)


_default_thread_errors = threading.excepthook


def _quiet_disk_full_logs() -> None:
  handlers = [*py_logging.getLogger().handlers, absl_logging.get_absl_handler()]
  for h in handlers:
    if not any(isinstance(f, _DiskFullLogs) for f in h.filters):
      h.addFilter(_DiskFullLogs())
  threading.excepthook = _thread_errors


def _guarded(main_fn: Callable, errors: tuple[type[BaseException], ...] | None):
  caught = user_errors() if errors is None else errors

  def wrapped(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments: {argv[1:]}")
    _quiet_disk_full_logs()
    try:
      return main_fn(argv)
    except train.Preempted as e:
      print(f"{_PROG[0]}: {e}; rerun the same command to resume", file=sys.stderr, flush=True)
      sys.exit(143)
    except Exception as e:
      full = disk_full_message(e)
      if full:
        fail(full)
      if isinstance(e, caught):
        fail(str(e))
      raise

  return wrapped


def run(
    main_fn: Callable[[list[str]], int | None],
    prog: str = "bssl",
    errors: tuple[type[BaseException], ...] | None = None,
) -> NoReturn:
  """The console command: ``app.run(main_fn)`` with bssl's error path (module doc)."""
  set_program(prog)
  module = sys.modules.get(main_fn.__module__)
  doc = getattr(module, "__doc__", None)
  app.run(
      _guarded(main_fn, errors),
      flags_parser=lambda argv: parse_flags(argv, doc, main_fn.__module__),
  )
  sys.exit(0)  # (app.run exits itself)


def call(
    main_fn: Callable[[list[str]], int | None],
    argv: Sequence[str],
    prog: str = "bssl",
    errors: tuple[type[BaseException], ...] | None = None,
) -> int:
  """``run`` in-process (tests): ``argv`` without the program name, parsed afresh."""
  set_program(prog)
  if flags.FLAGS.is_parsed():
    flags.FLAGS.unparse_flags()
  module = sys.modules.get(main_fn.__module__)
  rest = parse_flags([prog, *argv], getattr(module, "__doc__", None), main_fn.__module__)
  rc = _guarded(main_fn, errors)(rest)
  return 0 if rc is None else rc
