"""python -m bssl.sweep: a 2-axis x 2-seed grid of configs/demo.py:tiny shares the teacher and
the scoring pass across points (counted from the work directory); the same grid in two
parallel processes, killed with SIGKILL at a random moment, then rerun in one, gives the
same sweep.json."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist (the README's commands install it)",
)
ARGS = [
    "--config=configs/demo.py:tiny",
    "--sweep=select.k=20,50",
    "--sweep=select.p=1,2",
    "--seeds=0,1",
    "--config.pretrain.steps=2",
    "--config.finetune.steps=2",
]


def _env(tmp_path):
  # a persistent compilation cache: the points compile the same steps (results unchanged);
  # the session's (tests/conftest.py), shared with the other tests' runs of the demo
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path.parent / "jax_cache")
  return dict(
      os.environ,
      JAX_COMPILATION_CACHE_DIR=cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def _points(path):
  return json.dumps(json.load(open(os.path.join(path, "sweep.json")))["points"], sort_keys=True)


@pytest.fixture(scope="module")
def ref_sweep(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("sweep")
  ref = tmp_path / "ref"
  r = subprocess.run(
      [sys.executable, "-m", "bssl.sweep", *ARGS, f"--workdir={ref}"],
      cwd=ROOT,
      env=_env(tmp_path),
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.strip().splitlines()[-1]) == {"num_points": 8, "num_done": 8}
  return tmp_path, ref


def test_sweep_shares_the_teacher_and_the_scoring_pass(ref_sweep):
  _, ref = ref_sweep
  pts = sorted(os.listdir(ref / "points"))
  assert len(pts) == 8

  def artifacts(stage):
    return {json.load(open(ref / "points" / p / stage / "done.json"))["artifact_id"] for p in pts}

  # one baseline (= teacher) and one scoring pass per seed; a selection per point
  assert len(artifacts("baseline")) == 2 and len(artifacts("score")) == 2
  assert len(artifacts("select")) == 8
  s = json.load(open(ref / "sweep.json"))
  assert s["num_done"] == 8 and [a["field"] for a in s["axes"]] == ["select.k", "select.p"]
  md = open(ref / "sweep.md").read()
  assert "## select.k" in md and "## select.p" in md
  assert (ref / "select.k.png").stat().st_size > 1000
  for p in s["points"]:  # the D̂ of each point is its own K and P
    assert p["dhat_rows"] <= 10 * p["overrides"]["select.k"]


@pytest.mark.slow  # covered faster by: see docs/tests.md
def test_parallel_sweep_killed_at_a_random_moment_resumes_to_the_same_sweep_json(ref_sweep):
  """--jobs=2 (points in two processes, waiting for each other's shared stages), the whole
  process group killed with SIGKILL at a random moment, then rerun with one process: the
  same sweep.json as the uninterrupted one-process sweep, and still one baseline and one
  scoring pass per seed."""
  import signal

  tmp_path, ref = ref_sweep
  wd = tmp_path / "killed"
  cmd = [sys.executable, "-m", "bssl.sweep", *ARGS, f"--workdir={wd}"]
  proc = subprocess.Popen(
      cmd + ["--jobs=2"],
      cwd=ROOT,
      env=_env(tmp_path),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      start_new_session=True,
  )
  delay = float(np.random.default_rng().uniform(4, 25))
  try:
    proc.wait(timeout=delay)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  print(f"killed after {delay:.1f}s")
  r = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert _points(wd) == _points(ref)
  pts = sorted(os.listdir(wd / "points"))
  for stage in ("baseline", "score"):
    ids = {json.load(open(wd / "points" / p / stage / "done.json"))["artifact_id"] for p in pts}
    assert len(ids) <= 3, (stage, ids)  # 2 seeds; a killed claim may be recomputed once


def test_sweep_cli_errors_are_one_line(tmp_path):
  for args, msg in (
      (["--sweep=select.nope=1,2"], "unknown config field 'select.nope'"),
      (["--sweep=select.k=20,x"], "select.k='x' is not a int"),
      (["--sweep=select.k=20", "--seeds=a"], "--seeds"),
      (["--sweep=select.p=2,11"], "point select.p=2,seed=0: score.max_p must be at most"),
      ([], "--sweep is required"),
      (["--sweep=select.k=20", "--jobs=0"], "--jobs must be a positive integer"),
      (["--sweep=select.k=20", "--share_from=/nonexistent/sweep"], "is not a folder"),
      (["--sweep=teacher.model_kwargs=[{]"], "is not a JSON list"),
  ):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bssl.sweep",
            "--config=configs/demo.py:tiny",
            f"--workdir={tmp_path / 'w'}",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, (args, r.stderr[-2000:])
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_emit_prints_one_command_per_point(tmp_path):
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "bssl.sweep",
          "--config=configs/demo.py:tiny",
          f"--workdir={tmp_path}",
          "--sweep=select.k=20,50",
          "--seeds=0,1",
          "--emit",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 4 and all("-m bssl.sweep" in l and "--emit" not in l for l in lines)
  assert [l.split("--point=")[1] for l in lines] == [
      "select.k=20,seed=0",
      "select.k=50,seed=0",
      "select.k=20,seed=1",
      "select.k=50,seed=1",
  ]
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "bssl.sweep",
          "--config=configs/demo.py:tiny",
          f"--workdir={tmp_path}",
          "--sweep=select.k=20,50",
          "--point=nope",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert r.returncode == 2 and "not a point of this grid" in r.stderr


def test_dict_fields_are_swept_as_json_lists():
  from bssl import config
  from bssl.sweep import grid

  cfg = config.base()
  name, vals = grid.parse_axis(
      'teacher.model_kwargs=[{"widths": [8, 16, 32]}, '
      '{"widths": [32, 64, 128], "depths": [2, 2, 2]}]',
      cfg,
  )
  assert name == "teacher.model_kwargs" and vals[1]["depths"] == [2, 2, 2]
  pts = grid.points(cfg, [(name, vals)], [0])
  assert [p["name"] for p in pts] == [  # a dict: readable part, "~", a hash of its JSON
      "teacher.model_kwargs=widths-8-16-32~27db275342,seed=0",
      "teacher.model_kwargs=depths-2-2-2-widths-32-64-128~9a61676453,seed=0",
  ]
  got = grid.point_config(cfg, pts[1], [(name, vals)]).teacher.model_kwargs
  assert dict(got) == {"widths": [32, 64, 128], "depths": [2, 2, 2]}  # replaced, not merged
  # values whose readable labels collide get distinct folders
  name, vals = grid.parse_axis('teacher.model_kwargs=[{"x": -1}, {"x": 1}, {"x": 2}]', cfg)
  names = [p["name"] for p in grid.points(cfg, [(name, vals)], [0])]
  assert len(set(names)) == 3 and names[2] == "teacher.model_kwargs=x-2~5e2b030a4a,seed=0", names
  for bad, msg in (
      ("teacher.model_kwargs=[1, 2]", "takes dict values"),
      ("teacher.model_kwargs=[{]", "not a JSON list"),
      ("teacher.model_kwargs={}", "takes a JSON list"),
      ("select.k=[1, 1]", "repeated values"),
  ):
    with pytest.raises(grid.SweepError, match=msg):
      grid.parse_axis(bad, cfg)


# ----------------------------------------------------------------- the sweep's processes
# (issue #21 item 8: sweeps as robust as single runs)

TWO = [
    "--config=configs/demo.py:tiny",
    "--sweep=select.k=20",
    "--seeds=0,1",
    "--config.pretrain.steps=2",
    "--config.finetune.steps=2",
]  # two points, nothing shared


def _stat(pid):
  """(state, ppid, pgrp) of a process, None once it is gone."""
  try:
    text = open(f"/proc/{pid}/stat").read()
  except OSError:
    return None
  f = text[text.rindex(")") + 2 :].split()
  return f[0], int(f[1]), int(f[2])


def _gone(pid):
  st = _stat(pid)
  return st is None or st[0] in ("Z", "X")  # a zombie has stopped (nobody may reap it)


def _group(pgid):
  """The live processes of process group ``pgid``."""
  out = []
  for d in os.listdir("/proc"):
    st = d.isdigit() and _stat(int(d))
    if st and st[2] == pgid and st[0] not in ("Z", "X"):
      out.append(int(d))
  return out


def _point_entries(wd):
  d = wd / "running"
  return (
      {f.name[:-5]: json.load(open(f)) for f in d.glob("*.json") if not f.name.startswith("_")}
      if d.is_dir()
      else {}
  )


def _until(cond, what, timeout=240, proc=None):
  """Polls ``cond`` (a liveness bound, not a timing assertion)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    got = cond()
    if got:
      return got
    if proc is not None and proc.poll() is not None:
      raise AssertionError(
          f"the sweep exited ({proc.returncode}) before {what}: " f"{open(proc.out).read()[-3000:]}"
      )
    time.sleep(0.2)
  raise AssertionError(f"timed out waiting for {what}")


def _start(tmp_path, wd, *extra):
  """The sweep of TWO in its own process group; its stdout and stderr in ``proc.out``."""
  env = dict(_env(tmp_path), PYTHONUNBUFFERED="1")
  out = tmp_path / "out.txt"
  with open(out, "w") as fh:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bssl.sweep", *TWO, f"--workdir={wd}", *extra],
        cwd=ROOT,
        env=env,
        stdout=fh,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
  proc.out = out
  return proc


def _at_work(proc, wd):
  """The logs (the sweep's, the point workers') where a point's engine run has started."""
  logs = [proc.out, *wd.glob("points/*/sweep.log")]
  return [f for f in logs if "labelled, " in open(f).read()]


def _kill_group(proc):
  import signal

  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


def test_kill_9_of_a_parallel_sweep_stops_its_point_workers(tmp_path):
  """The sweep's parent killed with SIGKILL (--jobs=2): its point workers get SIGTERM from
  the kernel (parent-death signal), checkpoint and exit 143 instead of running on beside a
  rerun."""
  import signal

  wd = tmp_path / "w"
  proc = _start(tmp_path, wd, "--jobs=2")
  try:
    working = _until(lambda: _at_work(proc, wd), "a point worker at work", proc=proc)
    workers = [p for p in _group(proc.pid) if p != proc.pid]
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _until(lambda: all(_gone(p) for p in workers), "the workers to end", timeout=300)
    # stopped by the SIGTERM (exit 143), not run to the end. (At least one: a SIGTERM that
    # lands in a training stage's final checkpoint save, after the loop's last poll, is
    # not acted on by train.fit; the other worker may be there.)
    stopped = [
        log
        for log in working
        if "rerun the same command to continue" in open(log).read()
        and not (log.parent / "report" / "done.json").exists()
    ]
    assert stopped, [open(log).read()[-2000:] for log in working]
    assert not _point_entries(wd)  # each worker removed its running/ entry
  finally:
    _kill_group(proc)


@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_before_any_point_finishes_exits_143(tmp_path, jobs):
  """SIGTERM to the sweep, wherever it lands (a training loop, or any other stage), exits
  143 with one line saying to rerun; the point workers (--jobs=2) stop with it and every
  process leaves the work directory's running/ entries behind it."""
  import signal

  wd = tmp_path / "w"
  proc = _start(tmp_path, wd, f"--jobs={jobs}")
  try:
    _until(lambda: _at_work(proc, wd), "a point at work", proc=proc)
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    out = open(proc.out).read()
    assert proc.returncode == 143, (proc.returncode, out[-3000:])
    last = out.strip().splitlines()[-1]
    assert "rerun the same command to continue" in last and "Traceback" not in out, out[-3000:]
    assert _group(proc.pid) == []  # no worker left behind
    assert list((wd / "running").glob("*.json")) == []
    # (jobs=2: the other worker may have been in a training stage's final checkpoint save,
    # where train.fit does not act on a SIGTERM, and finished its point)
    assert len(list(wd.glob("points/*/report/done.json"))) < 2
  finally:
    _kill_group(proc)


def test_a_rerun_waits_for_or_refuses_processes_still_in_the_workdir(tmp_path):
  """<workdir>/running/<point>.json entries: a live process whose parent still runs is
  refused at once (exit 2, named); a worker whose sweep was killed is waited for; entries
  of dead processes, of reused pids or of other machines do not stop a rerun."""
  import socket

  from bssl import procs
  from bssl.sweep import grid, workers

  run = tmp_path / "running"
  run.mkdir()

  def entry(name, pid, **kw):
    e = dict(
        {
            "pid": pid,
            "host": socket.gethostname(),
            "start": procs.proc_stat(pid)[2] if procs.proc_stat(pid) else None,
            "ppid": os.getpid(),
        },
        **kw,
    )
    (run / f"{name}.json").write_text(json.dumps(e))

  dead = subprocess.Popen(["true"])
  dead.wait()
  entry("p_dead", dead.pid)
  live = subprocess.Popen(["sleep", "60"])
  try:
    entry("p_reused", live.pid, start="1")  # the pid of another, later process
    entry("p_far", live.pid, host="another-machine")
    workers.check_running(tmp_path, wait_s=0)  # none of these is at work here
    assert sorted(f.name for f in run.iterdir()) == ["p_far.json"]  # stale ones removed
    entry("select.k=20,seed=0", live.pid)  # its parent (this test) still runs
    with pytest.raises(grid.SweepError, match=rf"point select.k=20,seed=0 \(pid {live.pid}\)"):
      workers.check_running(tmp_path, wait_s=60)
    with pytest.raises(grid.SweepError, match="in use by processes still running"):
      workers.claim_running(tmp_path, "select.k=20,seed=0", wait_s=60)
    r = subprocess.run(
        [sys.executable, "-m", "bssl.sweep", *TWO, f"--workdir={tmp_path}"],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and f"(pid {live.pid})" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # a worker that lost its sweep (its recorded parent is not its parent): waited for,
    # up to wait_s, then named
    entry("select.k=20,seed=0", live.pid, ppid=dead.pid)
    with pytest.raises(grid.SweepError, match=f"pid {live.pid}"):
      workers.check_running(tmp_path, wait_s=1)
    short = subprocess.Popen(["sleep", "1"])
    entry("select.k=20,seed=0", short.pid, ppid=dead.pid)
    said = []
    workers.check_running(tmp_path, wait_s=120, log=said.append)
    assert _gone(short.pid) and said and "waiting for point select.k=20,seed=0" in said[0]
    short.wait()
    entry("_sweep", live.pid)  # a live sweep: refused, never waited for
    with pytest.raises(grid.SweepError, match=f"a sweep \\(pid {live.pid}\\)"):
      workers.claim_running(tmp_path, "_sweep", wait_s=60)
    (run / "_sweep.json").unlink()
    f = workers.claim_running(tmp_path, "_sweep")  # free: entered, and removed on release
    assert json.load(open(f))["pid"] == os.getpid()
    workers.release_running(f)
    assert not f.exists()
  finally:
    live.kill()
    live.wait()


def test_collect_with_no_point_done_or_no_evaluation_writes_an_empty_summary(tmp_path):
  from bssl import config, storage
  from bssl.sweep import grid, summary

  r = subprocess.run(
      [sys.executable, "-m", "bssl.sweep", *ARGS, f"--workdir={tmp_path}", "--collect"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.strip().splitlines()[-1]) == {"num_points": 8, "num_done": 0}
  s = json.load(open(tmp_path / "sweep.json"))
  assert s["num_done"] == 0 and s["points"] == []
  assert "No point is done yet" in open(tmp_path / "sweep.md").read()
  assert not list(tmp_path.glob("*.png"))
  cfg = config.base()
  axes = [grid.parse_axis("select.k=20,50", cfg), grid.parse_axis("select.p=1,2", cfg)]
  pts = grid.points(cfg, axes, [0, 1])
  stage_of = {"baseline": "baseline", "teacher": "teacher", "student": "finetune"}
  for models, md in (
      ({}, "No done point has a test evaluation"),  # stages without evaluate
      ({"baseline": {"top1": 0.5}}, "## select.k"),  # no student: no gain
      ({"teacher": {"top1": 0.5}}, "## select.p"),
  ):  # nothing on the plot
    for p in pts:
      for key in models:
        storage.write_json(
            tmp_path / "points" / p["name"] / stage_of[key] / "done.json",
            {"artifact_id": f"{key}-1", "finished": 1.0},
        )
      storage.write_json(
          tmp_path / "points" / p["name"] / "report" / "results.json",
          {
              "name": "tiny",
              "seed": p["seed"],
              **{k: dict(v, artifact_id=f"{k}-1") for k, v in models.items()},
          },
      )
    s = summary.collect(tmp_path, axes, pts)
    assert s["num_done"] == 8 and md in open(tmp_path / "sweep.md").read()
    assert bool(models) == (tmp_path / "select.k.png").exists()
    assert s["stale"] == []
  # A model replaced since a point's report (another artifact in its done.json), or a
  # result naming no artifact (an older report): never shown, and the point is listed.
  for p in pts:
    storage.write_json(
        tmp_path / "points" / p["name"] / "finetune" / "done.json",
        {"artifact_id": "student-1", "finished": 1.0},
    )
    storage.write_json(
        tmp_path / "points" / p["name"] / "report" / "results.json",
        {
            "name": "tiny",
            "seed": p["seed"],
            "baseline": {"top1": 0.5, "artifact_id": "baseline-1"},
            "student": {"top1": 0.9, "artifact_id": "student-1"},
        },
    )
  first, second = pts[0]["name"], pts[1]["name"]
  storage.write_json(
      tmp_path / "points" / first / "finetune" / "done.json",
      {"artifact_id": "student-2", "finished": 1.0},
  )
  res = json.load(open(tmp_path / "points" / second / "report" / "results.json"))
  del res["baseline"]["artifact_id"]
  storage.write_json(tmp_path / "points" / second / "report" / "results.json", res)
  s = summary.collect(tmp_path, axes, pts)
  assert s["stale"] == [
      {"name": first, "replaced": ["student"]},
      {"name": second, "replaced": ["baseline"]},
  ]
  rows = {r["name"]: r for r in s["points"]}
  assert rows[first]["top1"] == {"baseline": 0.5}
  assert rows[second]["top1"] == {"student": 0.9}
  assert f"{first}: student" in open(tmp_path / "sweep.md").read()


def test_seed_is_swept_with_seeds_only(tmp_path):
  for args in (["--sweep=seed=0,1"], ["--sweep=select.k=20", "--sweep=seed=0,1", "--seeds=2"]):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bssl.sweep",
            "--config=configs/demo.py:tiny",
            f"--workdir={tmp_path / 'w'}",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--sweep=seed" in lines[0] and "--seeds=0,1,2" in lines[0], lines
  assert not (tmp_path / "w").exists()


def test_share_lock_left_by_a_killed_point_is_taken_over(tmp_path):
  """A point killed while holding ``claims/<stage>`` leaves the lock behind: a lock whose
  owner is gone, or an unreadable one (an older bssl's empty file) after a few seconds, is
  taken over instead of waited on forever; a live owner's lock is waited on."""
  import threading

  from bssl import procs
  from bssl.sweep import share

  claims = tmp_path / "claims"
  claims.mkdir()
  dead = subprocess.Popen(["true"])
  dead.wait()
  (claims / "teacher").write_text(
      json.dumps({"pid": dead.pid, "host": os.uname()[1], "start": "1"})
  )
  (claims / "scoring").write_text("")
  old = time.time() - 60
  os.utime(claims / "scoring", (old, old))
  s = share.Sharer(tmp_path, "p0", log=lambda *a: None)

  def acquire(name):  # in a thread: the old code waited on these locks forever
    got = threading.Event()
    threading.Thread(target=lambda: (s._lock(name), got.set()), daemon=True).start()
    return got

  for name in ("teacher", "scoring"):
    assert acquire(name).wait(10), name
    assert json.loads((claims / name).read_text())["pid"] == os.getpid()
    s._release()
    assert not (claims / name).exists()
  # a live owner (another process of this machine): waited on until it releases
  live = subprocess.Popen(["sleep", "30"])
  try:
    (claims / "select").write_text(
        json.dumps({"pid": live.pid, "host": os.uname()[1], "start": procs.process_start(live.pid)})
    )
    got = acquire("select")
    assert not got.wait(1.0)
    live.kill()
    live.wait()
    assert got.wait(10)
  finally:
    live.kill()
  assert not [f for f in claims.iterdir() if f.name.startswith(".")]
