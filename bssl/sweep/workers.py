"""The processes of a sweep: one process per point (``--jobs``), supervised.

* ``run_points``: starts the points as ``python -m bssl.sweep ... --point=<name>`` workers,
  at most ``jobs`` at once, each logging to ``points/<name>/sweep.log``; SIGTERM to the
  sweep is passed on to them (they checkpoint and exit 143).
* ``die_with_parent``: a point worker gets SIGTERM when the sweep that started it dies,
  even by SIGKILL (Linux's parent-death signal), instead of running on beside a rerun.
* ``claim_running`` / ``check_running`` / ``release_running``: while a process works in a
  sweep folder it has an entry in ``<sweep>/running/``; a rerun refuses (naming them) while
  another sweep or point command still runs there, and waits for the workers of a killed
  sweep to stop.
* ``on_sigterm`` / ``exit_preempted``: SIGTERM exits 143 wherever it lands.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from bssl import procs, storage
from bssl.sweep.grid import SweepError

STOP_WAIT_S = 300  # how long a rerun waits for the point workers of a killed sweep to stop


class Terminated(BaseException):
  """The points of ``--jobs`` were stopped by SIGTERM (the sweep exits 143)."""


_ENTRIES: list = []  # this process's running/ entries (claim_running)


def on_sigterm(signum, frame):
  """SIGTERM outside a training loop (where it saves a checkpoint and raises
  ``train.Preempted``): exit 143 now, as a SIGKILL would stop it (every stage survives
  that; the one cut short resumes from its last resume point), with a line and without
  the running/ entries. Not an exception: one raised in whatever Python code the signal
  lands on is dropped there if that is a gc callback or a ``__del__``."""
  for f in list(_ENTRIES):
    release_running(f)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, RuntimeError, ValueError):  # RuntimeError: it was writing
      pass
  os.write(2, b"bssl.sweep: SIGTERM; rerun the same command to continue\n")
  os._exit(143)


def exit_preempted(msg: str) -> None:
  """Exits 143 (after ``finally`` blocks and atexit work); if a thread keeps the
  interpreter from exiting, a watchdog ends it after 60 s."""
  signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping already: a repeat changes nothing
  print(f"bssl.sweep: {msg}; rerun the same command to continue", file=sys.stderr, flush=True)
  t = threading.Timer(60.0, os._exit, (143,))
  t.daemon = True
  t.start()
  sys.exit(143)


PARENT_ENV = "BSSL_SWEEP_PARENT"  # set for a point worker: the pid of the sweep that started it


def die_with_parent() -> None:
  """In a point worker (``$BSSL_SWEEP_PARENT`` set), before any work: has Linux send it
  SIGTERM when the sweep that started it dies, even by SIGKILL
  (``prctl(PR_SET_PDEATHSIG)``), so that it saves a checkpoint and exits 143 instead of
  running on beside a rerun; exits 143 at once if that sweep is gone already. Done here
  rather than in a ``preexec_fn``: forking a process that runs JAX's threads is unsafe.
  Elsewhere than Linux the ``running/`` entries still keep a rerun off its folders."""
  parent = os.environ.pop(PARENT_ENV, "")
  if not parent.isdigit():
    return
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() != int(parent):  # it died before prctl: no signal will come
    print(
        "bssl.sweep: the sweep that started this point is gone; rerun the sweep to continue",
        file=sys.stderr,
        flush=True,
    )
    os._exit(143)


def _process_entry() -> dict:
  """This process, as a ``running/`` entry names it."""
  me, parent = procs.proc_stat(os.getpid()), os.getppid()
  return {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "start": me and me[2],
      "ppid": parent,
      "argv": sys.argv,
      "since": time.time(),
  }


def _orphaned(e: dict) -> bool:
  """Whether a live entry's process lost the parent it had (a point worker of a sweep that
  was killed: it got SIGTERM with the parent's death and is stopping)."""
  st = procs.proc_stat(int(e["pid"]))
  return st is not None and e.get("ppid") is not None and st[1] != e["ppid"]


def _running_dir(root):
  root = storage.path(root)
  return None if storage.is_remote(root) else root / "running"


def check_running(root, names=None, wait_s: float = STOP_WAIT_S, log=print) -> None:
  """Raises SweepError naming the processes still at work in sweep folder ``root``
  (entries ``<root>/running/<name>.json`` of this machine: ``names``, or all, but this
  process's). A point worker that lost its sweep (killed: the worker got SIGTERM and is
  saving a checkpoint) is waited for, up to ``wait_s``; a live sweep, or a point whose
  parent still runs, is not. Entries of dead processes are removed."""
  d = _running_dir(root)
  if d is None:
    return
  deadline, told = time.time() + wait_s, set()
  while True:
    live, stopping = [], []
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
      name = f.name[: -len(".json")]
      if names is not None and name not in names:
        continue
      try:
        e = json.loads(f.read_text())
      except (OSError, ValueError):
        continue  # removed meanwhile (entries are written whole)
      if e.get("host") != socket.gethostname() or e.get("pid") == os.getpid():
        continue  # another machine's (cannot be checked), or ours
      if not procs.owner_alive(e, host_checked=True):
        f.unlink(missing_ok=True)  # a process killed without cleaning up
      elif name != "_sweep" and _orphaned(e):
        stopping.append((name, e))
      else:
        live.append((name, e))
    if live or (stopping and time.time() > deadline):
      what = ", ".join(
          ("a sweep" if n == "_sweep" else f"point {n}") + f" (pid {e['pid']})"
          for n, e in live + stopping
      )
      raise SweepError(
          f"--workdir {root} is in use by processes still running: {what}; "
          f"wait for them to end or stop them (kill PID), then rerun"
      )
    if not stopping:
      return
    for n, e in stopping:
      if n not in told:
        told.add(n)
        log(f"sweep: waiting for point {n} (pid {e['pid']}) of a sweep that was killed to " f"stop")
    time.sleep(0.5)


def claim_running(root, name: str, wait_s: float = STOP_WAIT_S, log=print):
  """Enters this process as running ``name`` (a point, or ``_sweep``: the grid) in
  ``<root>/running/`` once no live process holds it (``check_running``); returns the entry's
  path for ``release_running`` (None for a remote folder: not checked)."""
  d = _running_dir(root)
  if d is None:
    return None
  d.mkdir(parents=True, exist_ok=True)
  f = d / f"{name}.json"
  for _ in range(5):
    check_running(root, [name], wait_s, log)
    tmp = d / f".{name}.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(_process_entry()))
    try:
      os.link(tmp, f)  # whole, and only if no other process entered it meanwhile
      _ENTRIES.append(f)
      return f
    except FileExistsError:
      continue
    finally:
      tmp.unlink(missing_ok=True)
  raise SweepError(f"--workdir {root}: {name} is being started by another process")


def release_running(f) -> None:
  """Removes an entry of ``claim_running`` (if it is still this process's)."""
  if f is None:
    return
  try:
    if json.loads(f.read_text()).get("pid") == os.getpid():
      f.unlink(missing_ok=True)
  except (OSError, ValueError):
    pass
  if f in _ENTRIES:
    _ENTRIES.remove(f)


def launch_order(pts: list[dict], jobs: int) -> list[dict]:
  """With parallel jobs, seeds interleaved: the first points started share nothing."""
  if jobs <= 1:
    return pts
  by_seed: dict[int, list] = {}
  for p in pts:
    by_seed.setdefault(p["seed"], []).append(p)
  out = []
  for i in range(max(len(v) for v in by_seed.values())):
    out += [v[i] for v in by_seed.values() if i < len(v)]
  return out


class PointsFailed(Exception):
  """Points of ``run_points`` failed (not by SIGTERM): the sweep exits with ``code`` (2 if
  one was a user error, else 1), after each failure was logged."""

  def __init__(self, failed: list[tuple[str, int]], code: int):
    super().__init__(f"{len(failed)} point(s) failed: {failed}")
    self.failed, self.code = failed, code


def run_points(todo: list[dict], jobs: int, root, point_argv: list[str], progress, log=print):
  """Runs the points ``todo`` as worker processes, ``jobs`` at a time (``launch_order``),
  each ``python -m bssl.sweep <point_argv> --point=<name>``. ``progress(point, "done")``
  after each success. Returns ``(failed, stopped)``: the ``(name, exit code)`` of the
  points that failed, and whether SIGTERM stopped the sweep (it was passed on to the
  running points, none started after it). A user error (2) or preemption (143) of one
  point stops further launches."""
  root_p = storage.path(root)
  queue, running, failed, stop, signalled = launch_order(todo, jobs), {}, [], [], set()

  def terminate(q):
    if q not in signalled and q.poll() is None:
      signalled.add(q)
      q.send_signal(signal.SIGTERM)

  def on_term(signum, frame):  # preemption: pass it on, let the points checkpoint
    stop.append(signum)
    queue.clear()
    for q in list(running):
      terminate(q)

  previous = signal.signal(signal.SIGTERM, on_term)
  env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
  try:
    while queue or running:
      while queue and len(running) < jobs and not stop:
        p = queue.pop(0)
        logf = root_p / "points" / p["name"] / "sweep.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        fh = open(logf, "a")
        proc = subprocess.Popen(
            [sys.executable, "-m", "bssl.sweep", *point_argv, f"--point={p['name']}"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
        running[proc] = (p, fh)
        if stop:  # SIGTERM came while it started
          terminate(proc)
        log(f"sweep: started point {p['name']} (pid {proc.pid}, log {logf})")
      time.sleep(1.0)
      for proc in [q for q in running if q.poll() is not None]:
        p, fh = running.pop(proc)
        fh.close()
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode  # as a shell
        if code == 0:
          progress(p, "done")
        else:
          failed.append((p["name"], code))
          log(
              f"sweep: point {p['name']} failed (exit {code}); see "
              f"{root_p / 'points' / p['name'] / 'sweep.log'}"
          )
          if code in (2, 143):  # a user error or preemption: stop launching
            queue.clear()
  finally:
    signal.signal(signal.SIGTERM, previous)
  return failed, bool(stop)
