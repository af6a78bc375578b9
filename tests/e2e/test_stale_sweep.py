"""Sweeps through the engine (issue #29, items 1 and 8): a rerun of a sweep plans every point
as one run would (a changed base config or a grown grid is refused in one line naming every
stale point and folder, or recomputed with --recompute_stale, also by --jobs' point
workers; an unchanged rerun reuses everything); point folders are named injectively
(another grid in the same folder never shows another value's results); and the advice the
summary prints, followed, does what it says.

One tiny sweep (configs/demo.py:tiny, select.k=20,50, one seed) is made once for the module
and carried through the steps, each a fixture so they run in order."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist (the README's commands install it)",
)
BASE = [
    "--config=configs/demo.py:tiny",
    "--config.pretrain.steps=2",
    "--config.finetune.steps=2",
    "--seeds=0",
]
OLD = ["--sweep=select.k=20,50"]
# the rerun: another base config (fine-tuning 3 steps, not 2) and a grown grid (K = 10:
# score.max_k stays 50, so only fine-tuning is stale in the old points)
NEW = ["--config.finetune.steps=3", "--sweep=select.k=10,20,50"]
OLD_POINTS = ["select.k=20,seed=0", "select.k=50,seed=0"]
ALL_POINTS = ["select.k=10,seed=0", *OLD_POINTS]
RECORDED = ("baseline", "teacher", "score", "select", "pretrain", "finetune")


def _env():
  return dict(os.environ, PYTHONUNBUFFERED="1")


def _sweep(wd, *args, timeout=900):
  return subprocess.run(
      [sys.executable, "-m", "bssl.sweep", *BASE, *args, f"--workdir={wd}"],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def _run_advice(cmd: str, timeout=900):
  """Runs a command the summary names (``python -m bssl.sweep ...``) as a user would."""
  argv = shlex.split(cmd)
  assert argv[:3] == ["python", "-m", "bssl.sweep"], argv
  return subprocess.run(
      [sys.executable, *argv[1:]],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def _advice(md: str, what: str) -> str:
  """The command in the summary's line that starts with ``what``."""
  line = next(l for l in md.splitlines() if l.startswith(what))
  cmds = re.findall(r"Rerun `([^`]+)`", line)
  assert len(cmds) == 1, line
  return cmds[0]


def _ids(wd, point):
  """{stage: artifact id} of a point's finished recorded stages."""
  out = {}
  for s in RECORDED:
    f = wd / "points" / point / s / "done.json"
    if f.exists():
      out[s] = json.load(open(f))["artifact_id"]
  return out


def _steps(wd, point):
  rec = json.load(open(wd / "points" / point / "finetune" / "done.json"))["record"]
  return rec["fields"]["finetune.steps"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """The first sweep: fine-tuning 2 steps, K = 20 and 50."""
  wd = tmp_path_factory.mktemp("stale_sweep") / "sweep"
  r = _sweep(wd, *OLD)
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, {p: _ids(wd, p) for p in OLD_POINTS}


@pytest.fixture(scope="module")
def refused(made):
  """The rerun with another base config and a grown grid, without --recompute_stale."""
  wd, before = made
  r = _sweep(wd, *NEW)
  return r, {p: _ids(wd, p) for p in OLD_POINTS}


@pytest.fixture(scope="module")
def collected(made, refused):
  """``--collect`` under the new config (--jobs=2 given: the advice keeps it)."""
  wd, _ = made
  r = _sweep(wd, *NEW, "--jobs=2", "--collect")
  assert r.returncode == 0, r.stderr[-3000:]
  return json.load(open(wd / "sweep.json")), open(wd / "sweep.md").read()


@pytest.fixture(scope="module")
def recomputed(made, collected):
  """The command ``--collect``'s summary names for the points of the old config (the sweep
  with --recompute_stale, in two point processes), run as given."""
  wd, _ = made
  _, md = collected
  r = _run_advice(_advice(md, "Not shown (made with another config"))
  assert r.returncode == 0, r.stderr[-3000:]
  return r


@pytest.fixture(scope="module")
def rerun_unchanged(made, recomputed):
  wd, _ = made
  before = {p: _ids(wd, p) for p in ALL_POINTS}
  r = _sweep(wd, *NEW)
  assert r.returncode == 0, r.stderr[-3000:]
  return r, before


def test_changed_base_config_is_refused_in_one_line_naming_every_stale_point(made, refused):
  wd, before = made
  r, after = refused
  assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  line = lines[0]
  for p in OLD_POINTS:  # every stale point, with its stale folder and what changed
    assert f"point {p} " in line and f"points/{p}/finetune" in line, line
  assert "finetune.steps: 2 -> 3" in line and "--recompute_stale" in line, line
  # stages that still hold are not named; the new point has nothing to be stale
  assert "/select," not in line and "/pretrain" not in line and "select.k=10" not in line, line
  # refused before any point ran: nothing made, nothing deleted
  assert after == before
  assert not (wd / "points" / "select.k=10,seed=0").exists()


def test_collect_shows_no_number_of_another_config(collected):
  s, md = collected
  assert [e["name"] for e in s["other_config"]] == OLD_POINTS
  assert s["num_done"] == 0 and s["points"] == []  # the old points' numbers: not shown
  assert "finetune.steps: 2 -> 3" in md and "--recompute_stale" in md


def test_recompute_stale_recomputes_exactly_the_stale_stages(made, recomputed):
  """Followed, the advice recomputes fine-tuning in the old points (the point workers of
  --jobs=2 take --recompute_stale too), keeps their other stages, runs the new point, and
  sweep.json / sweep.md show only results of the new config."""
  wd, before = made
  out = recomputed.stdout + recomputed.stderr
  for p in OLD_POINTS:
    log = open(wd / "points" / p / "sweep.log").read()  # a point worker's
    assert f"recomputing finetune: deleting {wd / 'points' / p / 'finetune'}" in log, log[-2000:]
    ids = _ids(wd, p)
    assert {s: ids[s] for s in RECORDED[:-1]} == {s: before[p][s] for s in RECORDED[:-1]}
    assert ids["finetune"] != before[p]["finetune"]
  for p in ALL_POINTS:
    assert _steps(wd, p) == 3, p
    res = json.load(open(wd / "points" / p / "report" / "results.json"))
    assert res["student"]["artifact_id"] == _ids(wd, p)["finetune"]  # measured: the new one
  s = json.load(open(wd / "sweep.json"))
  assert s["num_done"] == 3 and s["stale"] == [] and s["other_config"] == [], out[-2000:]
  assert sorted(r["name"] for r in s["points"]) == sorted(ALL_POINTS)
  md = open(wd / "sweep.md").read()
  assert "Not shown" not in md and "| 10 | 1 |" in md and "| 50 | 1 |" in md


def test_unchanged_rerun_checks_every_point_and_reuses_everything(made, rerun_unchanged):
  wd, _ = made
  r, before = rerun_unchanged
  out = r.stdout + r.stderr
  assert {p: _ids(wd, p) for p in ALL_POINTS} == before  # nothing recomputed
  assert "recomputing" not in out and "sweep: 3 points, 3 complete (checked), 0 to run" in out
  for p in ALL_POINTS:  # each point planned by the engine (all kept), none trained
    for s in RECORDED:
      assert f"[{s}] complete in {wd / 'points' / p}; skipping" in out, (p, s)
  assert not re.search(r"\[(baseline|teacher|score|select|pretrain|finetune)\] starting", out)
  assert "measured before" in out and json.load(open(wd / "sweep.json"))["num_done"] == 3


def test_summary_advice_to_measure_again_is_followed(made, rerun_unchanged):
  """A point's model replaced since its report (its fine-tuning folder deleted by hand, as
  a refusal suggests): ``--collect`` leaves its number out and names a command; run, that
  command measures it again."""
  wd, _ = made
  p = OLD_POINTS[0]
  shutil.rmtree(wd / "points" / p / "finetune")
  r = _sweep(wd, *NEW, "--collect")
  assert r.returncode == 0, r.stderr[-3000:]
  s = json.load(open(wd / "sweep.json"))
  assert s["stale"] == [{"name": p, "replaced": ["student"]}]
  md = open(wd / "sweep.md").read()
  r = _run_advice(_advice(md, "Not shown (replaced since"))
  assert r.returncode == 0, r.stderr[-3000:]
  s = json.load(open(wd / "sweep.json"))
  assert s["stale"] == [] and s["num_done"] == 3
  row = next(x for x in s["points"] if x["name"] == p)
  assert "student" in row["top1"]
  res = json.load(open(wd / "points" / p / "report" / "results.json"))
  assert res["student"]["artifact_id"] == _ids(wd, p)["finetune"]
  assert "Not shown" not in open(wd / "sweep.md").read()


# ------------------------------------------------------------ folder names, injective


def test_point_folder_names_are_injective_across_grids():
  """A point's folder name is a function of its values alone: values whose readable labels
  collide get different folders whether or not they are in one grid."""
  from bssl import config
  from bssl.sweep import grid

  cfg = config.base()

  def name(axis, seeds=(0,)):
    return [p["name"] for p in grid.points(cfg, [grid.parse_axis(axis, cfg)], list(seeds))]

  assert name('unlabelled.path=["/data/u/v2"]') != name('unlabelled.path=["/data/u_v2"]')
  assert name('teacher.model_kwargs=[{"x": -1}]') != name('teacher.model_kwargs=[{"x": 1}]')
  # None and the string "None", "" and a string with the separators: all apart
  many = name('unlabelled.path=[null, "None", "", "a,b=c", "a_b_c", "a/b/c"]')
  assert len(set(many)) == 6 and "unlabelled.path=None,seed=0" in many
  assert all("/" not in n and n.count("=") == 2 for n in many), many
  # the same value: the same folder, whatever else the grid holds
  assert name('teacher.model_kwargs=[{"x": -1}]')[0] == (
      name('teacher.model_kwargs=[{"x": -1}, {"x": 1}, {"x": 2}]')[0]
  )
  assert name("unlabelled.path=/data/u/v2,/data/u_v2")[0] == (
      name('unlabelled.path=["/data/u/v2"]')[0]
  )
  # plain values keep their plain names (existing sweeps' folders are found again)
  assert name("select.k=20,50", (0, 1)) == [
      "select.k=20,seed=0",
      "select.k=50,seed=0",
      "select.k=20,seed=1",
      "select.k=50,seed=1",
  ]
  assert name("finetune.lr=[1]") == name("finetune.lr=1.0")  # one value, one folder
  long = name("name=" + "w" * 300)[0]  # a folder name stays within a file name's limit
  assert len(long) < 120 and "~" in long


def test_two_grids_in_one_folder_keep_their_values_apart(made, recomputed, tmp_path):
  """``--sweep=name=a/b`` then ``--sweep=name=a_b`` in one folder (the readable labels
  collide): two folders, each report of its own value, and each summary of its own grid.
  Every stage is shared from the module's sweep (``name`` is read by the report only)."""
  src, _ = made
  wd = tmp_path / "names"
  common = ["--config.finetune.steps=3", "--config.select.k=20"]
  common += ["--config.score.max_k=50", "--config.score.max_p=2"]  # as the grid of `made`
  for value in ("a/b", "a_b"):
    r = _sweep(wd, *common, f"--sweep=name={value}", f"--share_from={src}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[finetune] starting" not in r.stdout + r.stderr  # shared, not trained
    s = json.load(open(wd / "sweep.json"))
    assert s["num_points"] == 1 and s["points"][0]["overrides"] == {"name": value}
  folders = sorted(os.listdir(wd / "points"))
  assert len(folders) == 2, folders
  names = {json.load(open(wd / "points" / f / "report" / "results.json"))["name"] for f in folders}
  assert names == {"a/b", "a_b"}
