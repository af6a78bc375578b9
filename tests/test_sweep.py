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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist (the README's commands install it)")
ARGS = ["--config=configs/demo.py:tiny", "--sweep=select.k=20,50", "--sweep=select.p=1,2",
        "--seeds=0,1", "--config.pretrain.steps=2", "--config.finetune.steps=2"]


def _env(tmp_path):
  # a persistent compilation cache: the points compile the same steps (results unchanged)
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _points(path):
  return json.dumps(json.load(open(os.path.join(path, "sweep.json")))["points"],
                    sort_keys=True)


@pytest.fixture(scope="module")
def ref_sweep(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("sweep")
  ref = tmp_path / "ref"
  r = subprocess.run([sys.executable, "-m", "bssl.sweep", *ARGS, f"--workdir={ref}"], cwd=ROOT,
                     env=_env(tmp_path), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.strip().splitlines()[-1]) == {"num_points": 8, "num_done": 8}
  return tmp_path, ref


def test_sweep_shares_the_teacher_and_the_scoring_pass(ref_sweep):
  _, ref = ref_sweep
  pts = sorted(os.listdir(ref / "points"))
  assert len(pts) == 8

  def artifacts(stage):
    return {json.load(open(ref / "points" / p / stage / "done.json"))["artifact_id"]
            for p in pts}
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


def test_parallel_sweep_killed_at_a_random_moment_resumes_to_the_same_sweep_json(ref_sweep):
  """--jobs=2 (points in two processes, waiting for each other's shared stages), the whole
  process group killed with SIGKILL at a random moment, then rerun with one process: the
  same sweep.json as the uninterrupted one-process sweep, and still one baseline and one
  scoring pass per seed."""
  import signal
  tmp_path, ref = ref_sweep
  wd = tmp_path / "killed"
  cmd = [sys.executable, "-m", "bssl.sweep", *ARGS, f"--workdir={wd}"]
  proc = subprocess.Popen(cmd + ["--jobs=2"], cwd=ROOT, env=_env(tmp_path),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  delay = float(np.random.default_rng().uniform(4, 25))
  try:
    proc.wait(timeout=delay)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  print(f"killed after {delay:.1f}s")
  r = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert _points(wd) == _points(ref)
  pts = sorted(os.listdir(wd / "points"))
  for stage in ("baseline", "score"):
    ids = {json.load(open(wd / "points" / p / stage / "done.json"))["artifact_id"]
           for p in pts}
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
      (["--sweep=teacher.model_kwargs=[{]"], "is not a JSON list")):
    r = subprocess.run([sys.executable, "-m", "bssl.sweep", "--config=configs/demo.py:tiny",
                        f"--workdir={tmp_path / 'w'}", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, (args, r.stderr[-2000:])
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_emit_prints_one_command_per_point(tmp_path):
  r = subprocess.run([sys.executable, "-m", "bssl.sweep", "--config=configs/demo.py:tiny",
                      f"--workdir={tmp_path}", "--sweep=select.k=20,50", "--seeds=0,1",
                      "--emit"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 4 and all("-m bssl.sweep" in l and "--emit" not in l for l in lines)
  assert [l.split("--point=")[1] for l in lines] == [
      "select.k=20,seed=0", "select.k=50,seed=0", "select.k=20,seed=1", "select.k=50,seed=1"]
  r = subprocess.run([sys.executable, "-m", "bssl.sweep", "--config=configs/demo.py:tiny",
                      f"--workdir={tmp_path}", "--sweep=select.k=20,50", "--point=nope"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "not a point of this grid" in r.stderr


def test_dict_fields_are_swept_as_json_lists():
  from bssl import config, sweep
  cfg = config.base()
  name, vals = sweep.parse_axis('teacher.model_kwargs=[{"widths": [8, 16, 32]}, '
                                '{"widths": [32, 64, 128], "depths": [2, 2, 2]}]', cfg)
  assert name == "teacher.model_kwargs" and vals[1]["depths"] == [2, 2, 2]
  pts = sweep.points(cfg, [(name, vals)], [0])
  assert [p["name"] for p in pts] == ["teacher.model_kwargs=widths-8-16-32,seed=0",
                                      "teacher.model_kwargs=depths-2-2-2-widths-32-64-128,seed=0"]
  got = sweep.point_config(cfg, pts[1], [(name, vals)]).teacher.model_kwargs
  assert dict(got) == {"widths": [32, 64, 128], "depths": [2, 2, 2]}  # replaced, not merged
  # values whose readable labels collide get distinct folders
  name, vals = sweep.parse_axis('teacher.model_kwargs=[{"x": -1}, {"x": 1}, {"x": 2}]', cfg)
  names = [p["name"] for p in sweep.points(cfg, [(name, vals)], [0])]
  assert len(set(names)) == 3 and names[2] == "teacher.model_kwargs=x-2,seed=0", names
  for bad, msg in (("teacher.model_kwargs=[1, 2]", "takes dict values"),
                   ("teacher.model_kwargs=[{]", "not a JSON list"),
                   ("teacher.model_kwargs={}", "takes a JSON list"),
                   ("select.k=[1, 1]", "repeated values")):
    with pytest.raises(sweep.SweepError, match=msg):
      sweep.parse_axis(bad, cfg)
