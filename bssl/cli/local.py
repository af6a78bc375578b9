"""``python -m bssl.cli.local [flags] -- PROGRAM_ARGS...`` (also ``launch/local.sh``): N CPU
processes of ``python -m bssl.main PROGRAM_ARGS`` on this machine, one per simulated host,
talking over 127.0.0.1 (gloo collectives) -- a pod on one machine, for tests and laptops.

Each process gets BSSL_DISTRIBUTED=1, BSSL_COORDINATOR_ADDRESS=127.0.0.1:PORT,
BSSL_NUM_PROCESSES=N, BSSL_PROCESS_ID=i, JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=D (the caller's other XLA flags kept).
Process 0's output is streamed here; every process logs to <log_dir>/process_<i>.log
(--log_dir DIR, absl's own flag, read here; default <workdir>/logs when a local --workdir
is among PROGRAM_ARGS, else ./logs).
If a process exits non-zero, the others are stopped (SIGTERM, then SIGKILL after
--grace_period) and the launcher exits with its code, naming it and its log. Ctrl-C /
SIGTERM are forwarded as SIGTERM (bssl checkpoints; exit 130 / 143); a second one kills.
--dry_run prints each process's environment and command line, and starts nothing.

Example:
  launch/local.sh --num_processes 2 --devices_per_process 4 -- \\
      --config=configs/demo.py:tiny --workdir=/tmp/bssl_run
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from absl import flags

from bssl import launcher
from bssl.cli import common

PROG = "local.sh"
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Number of processes.")
_DEVICES = flags.DEFINE_integer(
    "devices_per_process",
    1,
    "Fake CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=D).",
)
_PORT = flags.DEFINE_integer("port", None, "Coordinator port on 127.0.0.1 (default: a free one).")
_MODULE = flags.DEFINE_string("module", "bssl.main", "Python module to run with `python -m`.")
_SCRIPT = flags.DEFINE_string("python_script", None, "Run this python file instead of a module.")
_PYTHON = flags.DEFINE_string(
    "python", None, "Python interpreter of the processes (default: $PYTHON, else this one)."
)
_HOST_DIRS = flags.DEFINE_string(
    "host_dirs",
    None,
    "Give process i its own working directory and TMPDIR, DIR/host_<i> (hosts with their own "
    "disks: only the --workdir is shared); pass absolute --config paths.",
)
_GRACE = flags.DEFINE_integer(
    "grace_period", 30, "Seconds between SIGTERM and SIGKILL when stopping the processes."
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print each process's command (environment + command line) and exit."
)
_VALUE_FLAGS = ("num_processes", "devices_per_process", "port", "log_dir", "module")
_VALUE_FLAGS += ("python_script", "python", "host_dirs", "grace_period")
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _check_words(args: list[str]) -> None:
  """What absl would let through otherwise: a flag's missing value (absl takes the next
  word, even the next flag) and an option not ours (PROGRAM_ARGS go after ``--``)."""
  k = 0
  while k < len(args):
    a = args[k]
    name = a.lstrip("-").split("=", 1)[0]
    if a.startswith("-") and a not in common.HELP_FLAGS:
      if name in _VALUE_FLAGS and "=" not in a:
        if k + 1 == len(args) or args[k + 1].startswith("--"):
          common.fail(f"--{name} needs a value")
        k += 1
      elif name not in flags.FLAGS and not (name[:2] == "no" and name[2:] in flags.FLAGS):
        common.fail(f"unknown option '{a}' (program arguments go after '--')")
    k += 1


def _pod(program_args: list[str]) -> launcher.LocalPod:
  """The flags, checked, as a LocalPod."""
  for holder in (_NUM_PROCESSES, _DEVICES):
    if holder.value < 1:
      common.fail(f"--{holder.name} must be a positive integer, got '{holder.value}'")
  if _GRACE.value < 0:
    common.fail(f"--grace_period must be a non-negative integer (seconds), got '{_GRACE.value}'")
  if _PORT.value is not None and not 0 < _PORT.value < 65536:
    common.fail(f"--port must be an integer in 1..65535, got '{_PORT.value}'")
  python = _PYTHON.value or os.environ.get("PYTHON") or sys.executable
  if not shutil.which(python):
    common.fail(f"--python: interpreter '{python}' not found")
  if _SCRIPT.value is not None:
    if flags.FLAGS["module"].present:
      common.fail("--module and --python_script are mutually exclusive")
    if not os.path.isfile(_SCRIPT.value):
      common.fail(f"--python_script: no such file '{_SCRIPT.value}'")
    program = [_SCRIPT.value, *program_args]
  else:
    if not _MODULE_NAME.fullmatch(_MODULE.value):
      common.fail(f"--module must be a dotted python module name, got '{_MODULE.value}'")
    program = ["-m", _MODULE.value, *program_args]
  return launcher.LocalPod(
      program=program,
      num_processes=_NUM_PROCESSES.value,
      devices_per_process=_DEVICES.value,
      port=_PORT.value or launcher.free_port(),
      log_dir=flags.FLAGS.log_dir or launcher.default_log_dir(program_args),
      python=python,
      host_dirs=_HOST_DIRS.value,
      grace_period=_GRACE.value,
  )


def main(argv: list[str]) -> int:
  """``argv`` as sys.argv: the program name, the launcher's flags, ``--``, the program's
  arguments. Returns the exit code (module doc)."""
  common.set_program(PROG)
  k = argv.index("--") if "--" in argv else len(argv)
  ours, program_args = list(argv[:k]), list(argv[k + 1 :])
  _check_words(ours[1:])
  if flags.FLAGS.is_parsed():
    flags.FLAGS.unparse_flags()
  # (run as `python -m`, absl files our flags under the script's path, not __name__)
  module = flags.FLAGS.find_module_defining_flag("num_processes")
  rest = common.parse_flags(ours, __doc__, module)
  if len(rest) > 1:
    common.fail(f"unexpected arguments {rest[1:]} (program arguments go after '--')")
  pod = _pod(program_args)
  if _DRY_RUN.value:
    sys.stdout.write(launcher.dry_run(pod))
    return 0
  return launcher.run(pod, log=lambda msg: print(f"{PROG}: {msg}", file=sys.stderr, flush=True))


def run() -> None:
  sys.exit(main(sys.argv))


if __name__ == "__main__":
  run()
