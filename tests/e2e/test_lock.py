"""One command per work directory (bssl/workdir.py WorkdirLock, taken by engine.run_recipe):
two real ``python -m bssl.main`` processes on one --workdir, the second refused (exit 2,
naming the owner) or waiting with --wait_for_lock; a kill -9'd owner's lock taken over by
the rerun; SIGTERM releases it; a 2-process run refuses, waits and runs as one; on gs://
(the local GCS emulator) two lockers race on one object and exactly one wins, a stale lock
is taken over, a fresh one refused."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from bssl import engine, procs
from bssl import workdir as W
from bssl.configs import demo

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BSSL = [sys.executable, "-m", "bssl.main", "--config=configs/demo.py:tiny"]
STAGE = ["--config.stages=baseline"]

needs_fmnist = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist (the README's commands install it)",
)


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("BSSL_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)
  if "BSSL_CACHE_DIR" in os.environ:  # (the session's file-identity cache, tests/conftest.py)
    env["BSSL_CACHE_DIR"] = os.environ["BSSL_CACHE_DIR"]
  return env


def _start(workdir, log, *extra, env=None):
  """``python -m bssl.main`` in the background, its output in file ``log``."""
  fh = open(log, "w")
  return subprocess.Popen(
      [*BSSL, *STAGE, f"--workdir={workdir}", *extra],
      cwd=ROOT,
      stdout=fh,
      stderr=subprocess.STDOUT,
      text=True,
      env=env or _env(),
  )


def _wait_until(cond, procs_alive, what, timeout=300):
  t0 = time.time()
  while not cond():
    for p, log in procs_alive:
      if p.poll() is not None:
        raise AssertionError(f"ended (exit {p.returncode}) before {what}:\n{_read(log)[-3000:]}")
    if time.time() - t0 > timeout:
      raise AssertionError(f"no {what} after {timeout}s")
    time.sleep(0.2)


def _read(path):
  with open(path) as fh:
    return fh.read()


def _error_line(stderr):
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
  return lines[0]


# ----------------------------------------------------------------------------- two commands


@pytest.fixture(scope="module")
def contended(tmp_path_factory):
  """An owner running the baseline (stopped by SIGSTOP while it holds the lock, so the
  others meet it running), a second command (refused), a third with --wait_for_lock
  (waits until the owner, let go on, finishes). Every process ran to its end."""
  tmp = tmp_path_factory.mktemp("contended")
  wd = tmp / "run"
  owner_log, waiter_log = tmp / "owner.log", tmp / "waiter.log"
  owner = _start(wd, owner_log)
  try:
    _wait_until(lambda: (wd / "lock.json").exists(), [(owner, owner_log)], "lock.json")
    lock = json.loads((wd / "lock.json").read_text())
    os.kill(owner.pid, signal.SIGSTOP)
    second = subprocess.run(
        [*BSSL, *STAGE, f"--workdir={wd}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    owner_running = owner.poll() is None
    waiter = _start(wd, waiter_log, "--wait_for_lock")
    _wait_until(
        lambda: "--wait_for_lock" in _read(waiter_log), [(waiter, waiter_log)], "a waiting line"
    )
    os.kill(owner.pid, signal.SIGCONT)
    owner.wait(timeout=600)
    waiter.wait(timeout=600)
  finally:
    for p in (owner, locals().get("waiter")):
      if p is not None and p.poll() is None:
        os.kill(p.pid, signal.SIGCONT)
        p.kill()
        p.wait()
  return dict(
      wd=wd,
      lock=lock,
      owner=owner,
      owner_out=_read(owner_log),
      second=second,
      owner_running=owner_running,
      waiter=waiter,
      waiter_out=_read(waiter_log),
  )


@needs_fmnist
def test_a_second_command_exits_2_naming_the_owner_and_the_first_finishes(contended):
  c = contended
  assert c["lock"]["pid"] == c["owner"].pid and c["lock"]["host"] == socket.gethostname()
  assert c["second"].returncode == 2, c["second"].stdout[-2000:] + c["second"].stderr[-2000:]
  line = _error_line(c["second"].stderr)
  assert f"is in use by another bssl command: pid {c['owner'].pid} on host " in line, line
  assert socket.gethostname() in line and "--wait_for_lock" in line and "since 20" in line
  assert "--config.stages=baseline" in line  # the owner's command
  assert "[baseline] starting" not in c["second"].stdout  # refused before any work
  assert c["owner_running"]  # the first was running all along
  assert c["owner"].returncode == 0, c["owner_out"][-3000:]
  assert "[baseline] done" in c["owner_out"]


@needs_fmnist
def test_wait_for_lock_waits_then_reuses_the_owners_stages(contended):
  c = contended
  out = c["waiter_out"]
  assert c["waiter"].returncode == 0, out[-3000:]
  assert f"is in use by pid {c['owner'].pid} on host {socket.gethostname()}" in out, out
  assert "took the lock of" in out and "after waiting" in out, out
  assert "[baseline] complete in" in out and "skipping" in out, out  # nothing recomputed
  assert "[baseline] starting" not in out
  assert not (c["wd"] / "lock.json").exists()  # released at the end


@needs_fmnist
def test_kill_9_of_the_owner_then_the_rerun_takes_the_lock_over(tmp_path):
  wd, log = tmp_path / "run", tmp_path / "owner.log"
  owner = _start(wd, log)
  try:
    # in the middle of the stage: it started (started.json), the lock is held
    _wait_until(
        lambda: (wd / "baseline" / "started.json").exists(), [(owner, log)], "the stage's start"
    )
    assert json.loads((wd / "lock.json").read_text())["pid"] == owner.pid
  finally:
    owner.kill()  # SIGKILL: no cleanup, lock.json stays
    owner.wait()
  assert (wd / "lock.json").exists()
  r = subprocess.run(
      [*BSSL, *STAGE, f"--workdir={wd}"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=_env(),
      timeout=600,
  )
  out = r.stdout + r.stderr
  assert r.returncode == 0, out[-3000:]
  assert f"taking over the lock of {wd} from pid {owner.pid} on host" in out, out
  assert f"pid {owner.pid} no longer runs on this host" in out, out
  assert "[baseline] done" in out
  assert not (wd / "lock.json").exists()


@needs_fmnist
def test_sigterm_releases_the_lock(tmp_path):
  """SIGTERM outside a training loop (bssl's default action: the process ends) and inside
  one (a checkpoint, exit 143) both leave no lock.json behind."""
  wd, log = tmp_path / "run", tmp_path / "owner.log"
  owner = _start(wd, log)
  try:
    _wait_until(lambda: (wd / "lock.json").exists(), [(owner, log)], "lock.json")
    owner.send_signal(signal.SIGTERM)
    owner.wait(timeout=120)
  finally:
    if owner.poll() is None:
      owner.kill()
      owner.wait()
  assert owner.returncode in (-signal.SIGTERM, 143), _read(log)[-3000:]
  assert not (wd / "lock.json").exists(), _read(log)[-3000:]


def test_run_recipe_refuses_a_live_owner_before_reading_the_data(tmp_path, monkeypatch):
  """In-process (as a sweep runs its points): a live owner on this host refuses the run
  with one line (a ConfigError: exit 2), before the data is built; nothing is written."""
  holder = subprocess.Popen(["sleep", "300"])
  try:
    wd = tmp_path / "point"
    wd.mkdir()
    _fake_lock(wd, holder.pid, procs.process_start(holder.pid))
    cfg = demo.get_config("tiny")

    def no_data(cfg):
      raise AssertionError("the data was built before the lock was checked")

    monkeypatch.setattr(engine.recipe, "build_data", no_data)
    assert issubclass(engine.WorkdirLockedError, engine.config_lib.ConfigError)
    with pytest.raises(engine.WorkdirLockedError, match=f"pid {holder.pid} on host"):
      engine.run_recipe(cfg, str(wd))
    assert sorted(os.listdir(wd)) == ["lock.json"]
  finally:
    holder.kill()
    holder.wait()


def _fake_lock(wd, pid, start, host=None, heartbeat=None):
  now = time.time()
  owner = {
      "host": host or socket.gethostname(),
      "pid": pid,
      "start": start,
      "command": "sleep 300",
      "since": now - 60,
      "heartbeat": now if heartbeat is None else heartbeat,
      "token": "someone-else",
  }
  (wd / "lock.json").write_text(json.dumps(owner))


# ----------------------------------------------------------------------------- processes


@needs_fmnist
def test_two_processes_of_one_run_refuse_wait_and_run_as_one(contended, tmp_path):
  """A 2-process run (launch/local.sh): only process 0 takes the lock and both learn the
  outcome before any collective: refused, both exit 2 (no process waits forever in a
  collective); with --wait_for_lock both wait while process 0 waits, then run (on a copy
  of the contended run: its baseline is reused, by both processes, past their barriers)."""
  wd = tmp_path / "run"
  shutil.copytree(contended["wd"], wd)
  holder = subprocess.Popen(["sleep", "600"])
  _fake_lock(wd, holder.pid, procs.process_start(holder.pid))

  def pod(logs, *extra, wait=True):
    cmd = [
        "bash",
        os.path.join(ROOT, "launch", "local.sh"),
        "--num_processes",
        "2",
        "--devices_per_process",
        "2",
        "--log_dir",
        str(logs),
        "--grace_period",
        "10",
        "--",
        "--config=configs/demo.py:tiny",
        *STAGE,
        f"--workdir={wd}",
        *extra,
    ]
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    if wait:
      return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)

  try:
    r = pod(tmp_path / "logs1")
    logs = [_read(tmp_path / "logs1" / f"process_{i}.log") for i in range(2)]
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:] + "".join(logs)[-4000:]
    for log in logs:  # each process: the one line naming the owner, no training
      assert f"pid {holder.pid} on host {socket.gethostname()}" in log, log[-2000:]
      assert "[baseline] starting" not in log
    waiting = pod(tmp_path / "logs2", "--wait_for_lock", wait=False)
    log0 = tmp_path / "logs2" / "process_0.log"
    _wait_until(
        lambda: log0.exists() and "--wait_for_lock" in _read(log0),
        [(waiting, log0)],
        "process 0's waiting line",
    )
    holder.kill()  # the owner is gone: process 0 takes the lock over, both run
    holder.wait()
    out = waiting.communicate(timeout=600)[0]
    logs = [_read(tmp_path / "logs2" / f"process_{i}.log") for i in range(2)]
    assert waiting.returncode == 0, out[-2000:] + "".join(logs)[-4000:]
    assert f"taking over the lock of {wd} from pid {holder.pid}" in logs[0]
    assert "[baseline] complete in" in logs[0]  # (process 0 logs; process 1 went along)
    assert not (wd / "lock.json").exists()
  finally:
    if holder.poll() is None:
      holder.kill()
      holder.wait()


# ----------------------------------------------------------------------------- gs:// and local


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path, monkeypatch):
  if request.param == "local":
    return str(tmp_path / "wd")
  gcs = request.getfixturevalue("gcs")
  gcs.apply_env(monkeypatch)
  return gcs.url(f"locks/{request.node.originalname}/{time.time_ns()}")


def test_the_store_refuses_a_second_create_and_a_stale_swap(root):
  """The atomic primitives: of two creates of one lock file exactly one succeeds
  (O_CREAT|O_EXCL / ifGenerationMatch=0); of two takeovers of the version both read,
  exactly one."""
  f = W.WorkdirLock(root).file
  if "://" not in root:
    os.makedirs(root)
  v1 = f.create(b'{"a": 1}')
  assert v1 is not None and f.create(b'{"b": 2}') is None
  assert f.read()[0] == b'{"a": 1}'
  v2 = f.replace(b'{"c": 3}', v1)
  assert v2 is not None and f.replace(b'{"d": 4}', v1) is None
  assert f.read()[0] == b'{"c": 3}'
  f.delete(v1)  # not the version there: kept
  assert f.read() is not None
  f.delete(v2)
  assert f.read() is None


def test_racing_lockers_exactly_one_wins(root):
  for _ in range(5):
    lockers = [W.WorkdirLock(root, log=lambda m: None) for _ in range(4)]
    barrier, won, refused = threading.Barrier(len(lockers)), [], []

    def take(lock):
      barrier.wait()
      try:
        lock.acquire()
        won.append(lock)
      except W.LockedError as e:
        refused.append(str(e))

    threads = [threading.Thread(target=take, args=(lk,)) for lk in lockers]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert len(won) == 1 and len(refused) == 3, (won, refused)
    assert all(f"pid {os.getpid()} on host" in r for r in refused)
    won[0].release()
  assert W.WorkdirLock(root).file.read() is None


def test_a_stale_lock_of_another_host_is_taken_over_a_fresh_one_refused(root):
  lines = []
  if "://" not in root:
    os.makedirs(root)
  f = W.WorkdirLock(root).file
  now = time.time()

  def other(heartbeat):
    return json.dumps(
        dict(host="elsewhere", pid=4242, start="1", command="bssl ...", since=now - 900)
        | dict(heartbeat=heartbeat, token="theirs")
    ).encode()

  v = f.create(other(now - 5))
  with pytest.raises(W.LockedError, match="pid 4242 on host elsewhere.*last heartbeat 5s ago"):
    W.WorkdirLock(root, log=lines.append).acquire()
  f.delete(v)
  f.create(other(now - W.STALE_S - 60))
  lock = W.WorkdirLock(root, log=lines.append)
  lock.acquire()
  assert json.loads(f.read()[0])["token"] == lock.token
  assert any("taking over the lock" in l and "pid 4242 on host elsewhere" in l for l in lines)
  lock.release()
  assert f.read() is None


def test_the_owner_beats_and_a_silent_owner_ahead_in_time_is_taken_over(root, monkeypatch):
  """The heartbeat is rewritten while the lock is held; an owner on another host whose
  clock is an hour ahead (its heartbeat looks fresh) but whose heartbeat does not change
  while a command waits is taken over after STALE_S of the waiter's own clock."""
  monkeypatch.setattr(W, "HEARTBEAT_S", 0.2)
  monkeypatch.setattr(W, "STALE_S", 1.5)
  monkeypatch.setattr(W, "WAIT_POLL_S", 0.1)
  lock = W.WorkdirLock(root, log=lambda m: None)
  lock.acquire()
  first = json.loads(lock.file.read()[0])
  deadline = time.time() + 60
  while json.loads(lock.file.read()[0])["heartbeat"] == first["heartbeat"]:
    assert time.time() < deadline, "no heartbeat"
    time.sleep(0.1)
  assert json.loads(lock.file.read()[0])["token"] == lock.token
  lock.release()
  assert lock.file.read() is None

  if "://" not in root:
    os.makedirs(root, exist_ok=True)  # (released, the lock removed the folder it made)
  ahead = time.time() + 3600
  owner = dict(host="elsewhere", pid=7, since=ahead, heartbeat=ahead, command="c", token="t")
  lock.file.create(json.dumps(owner).encode())
  with pytest.raises(W.LockedError, match="pid 7 on host elsewhere"):
    W.WorkdirLock(root).acquire()
  lines = []
  waiter = W.WorkdirLock(root, log=lines.append)
  waiter.acquire(wait=True)
  assert any("has not changed for" in l for l in lines), lines
  assert json.loads(waiter.file.read()[0])["token"] == waiter.token
  waiter.release()
