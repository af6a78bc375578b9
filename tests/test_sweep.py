"""python -m bssl.sweep: a 2-axis x 2-seed grid of configs/demo.py:tiny shares the teacher and
the scoring pass across points (counted from the work directory), and (opt-in,
BSSL_SLOW_TESTS=1, for suite time) a kill -9 at a random moment, then the same command,
gives the same sweep.json."""
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


@pytest.mark.skipif(os.environ.get("BSSL_SLOW_TESTS") != "1",
                    reason="opt-in for suite time (two more sweeps, ~70 s): BSSL_SLOW_TESTS=1")
def test_sweep_killed_at_a_random_moment_resumes_to_the_same_sweep_json(ref_sweep):
  tmp_path, ref = ref_sweep
  wd = tmp_path / "killed"
  cmd = [sys.executable, "-m", "bssl.sweep", *ARGS, f"--workdir={wd}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  time.sleep(float(np.random.default_rng().uniform(3, 30)))
  proc.kill()
  proc.wait()
  r = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert _points(wd) == _points(ref)


def test_sweep_cli_errors_are_one_line(tmp_path):
  for args, msg in (
      (["--sweep=select.nope=1,2"], "unknown config field 'select.nope'"),
      (["--sweep=select.k=20,x"], "select.k='x' is not a int"),
      (["--sweep=select.k=20", "--seeds=a"], "--seeds"),
      (["--sweep=select.p=2,11"], "point select.p=2,seed=0: score.max_p must be at most"),
      ([], "--sweep is required")):
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
  assert len(lines) == 4 and all("-m bssl.main" in l for l in lines)
  assert all("--config.score.max_k=50" in l for l in lines)
