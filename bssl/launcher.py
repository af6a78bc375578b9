"""N processes of one program on this machine, as N hosts of a pod: the supervisor behind
``python -m bssl.cli.local`` (and ``launch/local.sh``), which the multi-host tests drive.

Each process gets the multi-host environment read by
``bssl.parallel.maybe_initialize_distributed`` (``BSSL_DISTRIBUTED=1``,
``BSSL_COORDINATOR_ADDRESS=127.0.0.1:PORT``, ``BSSL_NUM_PROCESSES``, ``BSSL_PROCESS_ID``),
``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (D fake CPU
devices; cross-process collectives use gloo), optionally its own working directory and
``TMPDIR`` (a host with its own disk: only the work directory is shared).

Why a supervisor rather than N background jobs: a pod fails as a whole. When one process
dies the others would wait forever in a collective, so they are stopped (SIGTERM, which
bssl answers with a checkpoint, then SIGKILL after a grace period) and the launcher exits
with the failed process's code, naming it and showing the tail of its log. SIGTERM/SIGINT
to the launcher are forwarded as SIGTERM (exit 143 / 130); a second one kills.

No JAX and nothing else of bssl here: the launcher only starts processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
POLL_S = 0.2
DRAIN_S = 10.0  # for process 0's last output (a child it left may hold the pipe)


@dataclasses.dataclass(frozen=True)
class LocalPod:
  """What to start: ``program`` (the argv after the interpreter: ``-m module args...`` or
  ``script args...``) as ``num_processes`` processes of ``devices_per_process`` CPU
  devices each, coordinated over ``127.0.0.1:port``; logs ``log_dir/process_<i>.log``;
  with ``host_dirs``, process i runs in ``host_dirs/host_<i>`` with ``TMPDIR`` there."""

  program: Sequence[str]
  num_processes: int = 2
  devices_per_process: int = 1
  port: int = 0
  log_dir: str = "./logs"
  python: str = sys.executable
  host_dirs: str | None = None
  grace_period: float = 30.0

  @property
  def coordinator(self) -> str:
    return f"127.0.0.1:{self.port}"

  def log_file(self, i: int) -> str:
    return f"{self.log_dir}/process_{i}.log"

  def host_dir(self, i: int) -> str | None:
    return self.host_dirs and f"{self.host_dirs}/host_{i}"

  def argv(self) -> list[str]:
    return [self.python, *self.program]

  def env(self, i: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables process ``i`` gets on top of the launcher's environment ``base``
    (``os.environ`` by default), in the order a dry run prints them."""
    base = os.environ if base is None else base
    path = base.get("PYTHONPATH", "")
    env = {
        "BSSL_DISTRIBUTED": "1",
        "BSSL_COORDINATOR_ADDRESS": self.coordinator,
        "BSSL_NUM_PROCESSES": str(self.num_processes),
        "BSSL_PROCESS_ID": str(i),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags(base.get("XLA_FLAGS", ""), self.devices_per_process),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": path
        if path.split(":")[0] == REPO_ROOT
        else f"{REPO_ROOT}:{path}".rstrip(":"),
    }
    if self.host_dirs:
      env["TMPDIR"] = f"{self.host_dir(i)}/tmp"
    return env


def xla_flags(current: str, devices: int) -> str:
  """The caller's XLA_FLAGS with the fake device count replaced by ``devices``."""
  kept = [f for f in current.split() if not f.startswith(DEVICE_COUNT_FLAG + "=")]
  return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={devices}"])


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (the coordinator binds it)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def default_log_dir(program_args: Sequence[str]) -> str:
  """``<workdir>/logs`` when the program gets a local ``--workdir``, else ``./logs``."""
  workdir = ""
  for k, a in enumerate(program_args):
    if a.startswith("--workdir="):
      workdir = a[len("--workdir=") :]
    elif a == "--workdir" and k + 1 < len(program_args):
      workdir = program_args[k + 1]
  return f"{workdir}/logs" if workdir and "://" not in workdir else "./logs"


def dry_run(pod: LocalPod) -> str:
  """Each process's command (``env VARS... python program...``), shell-quoted, under a
  comment naming its log."""
  lines = [
      f"# dry run: {pod.num_processes} process(es) x {pod.devices_per_process} CPU device(s),"
      f" coordinator {pod.coordinator}, logs in {pod.log_dir}"
  ]
  for i in range(pod.num_processes):
    env = [f"{k}={v}" for k, v in pod.env(i).items()]
    cwd = f", in {pod.host_dir(i)}" if pod.host_dirs else ""
    lines.append(f"# process {i} (log: {pod.log_file(i)}{cwd})")
    lines.append(shlex.join(["env", *env, *pod.argv()]))
  return "\n".join(lines) + "\n"


def _exit_code(returncode: int) -> int:
  """A shell's exit status for a child: 128 + N when signal N killed it."""
  return 128 - returncode if returncode < 0 else returncode


def _tee(src, log_path: str, out) -> None:
  """Copies process 0's output to its log file and to ``out`` (the terminal)."""
  with open(log_path, "wb") as log:
    for chunk in iter(lambda: src.read1(65536), b""):
      log.write(chunk)
      log.flush()
      try:
        out.write(chunk)
        out.flush()
      except (BrokenPipeError, ValueError):
        pass


def _tail(path: str, n: int = 20) -> list[str]:
  try:
    with open(path, errors="replace") as fh:
      return fh.read().splitlines()[-n:]
  except OSError:
    return []


class _Supervisor:
  """The running pod: its processes, what it was told (signals) and how it ended."""

  def __init__(self, pod: LocalPod, log: Callable[[str], None]):
    self.pod, self.log = pod, log
    self.procs: list[subprocess.Popen] = []
    self.signalled: str | None = None
    self.killed = False  # a second signal: everything SIGKILLed

  def running(self) -> list[subprocess.Popen]:
    return [p for p in self.procs if p.poll() is None]

  def send(self, sig: int) -> None:
    for p in self.running():
      try:
        p.send_signal(sig)
      except ProcessLookupError:
        pass

  def on_signal(self, signum, _frame) -> None:
    name = signal.Signals(signum).name[3:]
    if self.signalled:
      self.log(f"second SIG{name}: killing all processes")
      self.send(signal.SIGKILL)
      self.killed = True
      return
    self.signalled = name
    self.log(f"got SIG{name}: forwarding SIGTERM to all processes (again to kill them)")
    self.send(signal.SIGTERM)

  def wait_all(self, timeout: float) -> bool:
    """Whether every process ended within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while self.running() and time.monotonic() < deadline:
      time.sleep(POLL_S)
    return not self.running()

  def stop_all(self) -> None:
    """SIGTERM to every process, SIGKILL to whoever is left after the grace period."""
    self.send(signal.SIGTERM)
    if not self.wait_all(self.pod.grace_period):
      self.log(f"processes still running after {self.pod.grace_period:g}s; sending SIGKILL")
      self.send(signal.SIGKILL)
      self.wait_all(float("inf"))

  def start(self, out) -> threading.Thread:
    pod = self.pod
    os.makedirs(pod.log_dir, exist_ok=True)
    tee = None
    for i in range(pod.num_processes):
      cwd = pod.host_dir(i)
      if cwd:
        os.makedirs(f"{cwd}/tmp", exist_ok=True)
      env = {**os.environ, **pod.env(i)}
      if i == 0:
        p = subprocess.Popen(
            pod.argv(), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        tee = threading.Thread(target=_tee, args=(p.stdout, pod.log_file(0), out), daemon=True)
        tee.start()
      else:
        with open(pod.log_file(i), "wb") as fh:
          p = subprocess.Popen(pod.argv(), env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
      self.procs.append(p)
    return tee

  def watch(self) -> tuple[int, int] | None:
    """Waits until every process ended, one failed (returns (index, exit code)), or a
    signal's grace period ran out (then SIGKILL, and waits on)."""
    kill_at = None  # when the grace period after a signal runs out
    while self.running() and not self.killed:
      time.sleep(POLL_S)
      if not self.signalled:
        for i, p in enumerate(self.procs):
          if p.poll() not in (None, 0):
            return i, _exit_code(p.returncode)
      elif kill_at is None:
        kill_at = time.monotonic() + self.pod.grace_period
      elif time.monotonic() > kill_at:
        self.log(
            f"processes still running {self.pod.grace_period:g}s after SIGTERM; sending SIGKILL"
        )
        self.send(signal.SIGKILL)
        kill_at = math.inf
    return None


def run(
    pod: LocalPod,
    out=None,
    log: Callable[[str], None] | None = None,
) -> int:
  """Starts the pod, streams process 0 to ``out`` (default: this process's stdout), waits;
  returns the exit code: 0, the failed process's code, 143 after SIGTERM, 130 after
  SIGINT (also for a second signal, which kills). Installs SIGINT/SIGTERM handlers for
  its duration (call it from the main thread)."""
  out = out or sys.stdout.buffer
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  sup = _Supervisor(pod, log)
  old = {s: signal.signal(s, sup.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  tee = None
  try:
    log(
        f"starting {pod.num_processes} process(es) x {pod.devices_per_process} device(s), "
        f"coordinator {pod.coordinator}; logs in {pod.log_dir}/process_<i>.log; "
        "streaming process 0"
    )
    tee = sup.start(out)
    failed = sup.watch()
    if failed:
      i, rc = failed
      # Stop the others first so process 0's stream does not interleave with the report.
      sup.stop_all()
      tee.join(DRAIN_S)
      lines = [f"process {i} failed with exit code {rc}; log: {pod.log_file(i)}"]
      if i != 0:
        lines.append(f"last lines of {pod.log_file(i)}:")
        lines += [f"  [process {i}] {line}" for line in _tail(pod.log_file(i))]
      lines.append("stopped the other processes")
      for line in lines:
        log(line)
      return rc
    sup.wait_all(float("inf"))
    tee.join(DRAIN_S)
    if sup.killed:
      return 130
    if sup.signalled:
      log(f"all processes stopped after SIG{sup.signalled}")
      return 130 if sup.signalled == "INT" else 143
    log(f"all {pod.num_processes} process(es) finished successfully")
    return 0
  finally:
    sup.send(signal.SIGKILL)  # only on an error of the launcher itself: else none is left
    for p in sup.procs:
      p.wait()
    if tee is not None:
      tee.join(DRAIN_S)
    for s, h in old.items():
      signal.signal(s, h)
