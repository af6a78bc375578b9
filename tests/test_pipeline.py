"""The whole recipe on a tiny Fashion-MNIST subset, and config errors raised before
any training starts."""
import json
import os

import jax
import numpy as np
import pytest

import demo
from bssl import config_lib, pipeline, selection
from bssl.data import sources

pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist (the README's commands install it)")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo_tiny"))
  cfg = demo.get_config("tiny")  # the demo's path: the teacher is the baseline
  pipeline.run(cfg, workdir)
  return cfg, workdir


def test_results_json_has_the_promised_fields(tiny_run):
  cfg, workdir = tiny_run
  with open(os.path.join(workdir, "report", "results.json")) as f:
    res = json.load(f)
  for key in ("baseline", "teacher", "student_pretrained", "student"):
    assert 0.0 <= res[key]["top1"] <= res[key]["top5"] <= 1.0
    assert res[key]["num_examples"] == 500  # the tiny preset's test subset, each counted once
  # Self-training: the teacher is the baseline, reported as such, with its test metrics.
  assert res["teacher"]["same_as"] == "baseline"
  assert res["teacher"]["top1"] == res["baseline"]["top1"]
  sel = res["selection"]
  assert sel["k"] == cfg.select.k and sel["p"] == cfg.select.p
  assert 0 < sel["num_selected"] <= cfg.select.k * cfg.data.num_classes
  assert 0.0 <= sel["label_precision"] <= 1.0
  for name in ("results.md", "selected_images.png", "class_histogram.png"):
    assert os.path.getsize(os.path.join(workdir, "report", name)) > 0
  assert os.path.exists(os.path.join(workdir, "config.json"))


def test_selection_artifact_matches_report_and_hidden_labels(tiny_run):
  cfg, workdir = tiny_run
  dhat = selection.read_selection(os.path.join(workdir, "select", "dhat"))
  with open(os.path.join(workdir, "report", "results.json")) as f:
    res = json.load(f)
  assert len(dhat.ids) == res["selection"]["num_selected"]
  # Label precision recomputed from the D̂ file and the hidden labels of U.
  data = pipeline.build_data(cfg)
  prec = float(np.mean(data.unlabelled_true_labels[dhat.ids] == dhat.classes))
  assert prec == pytest.approx(res["selection"]["label_precision"])
  # At most K per class, ranks 0..n-1 within each class, scores non-increasing.
  for c in range(cfg.data.num_classes):
    rows = dhat.classes == c
    n = int(rows.sum())
    assert n <= cfg.select.k
    assert np.array_equal(np.sort(dhat.ranks[rows]), np.arange(n))
    order = np.argsort(dhat.ranks[rows])
    assert np.all(np.diff(dhat.scores[rows][order]) <= 0)
  # D and U are disjoint, and U holds neither D nor the validation images.
  with open(os.path.join(workdir, "splits.json")) as f:
    splits = json.load(f)
  assert not set(splits["labelled"]) & set(splits["val"])
  assert len(data.unlabelled) == 2000 - len(splits["labelled"]) - len(splits["val"])


def test_rerun_skips_completed_stages(tiny_run, capsys):
  cfg, workdir = tiny_run
  before = os.path.getmtime(os.path.join(workdir, "teacher", "done.json"))
  cfg2 = demo.get_config("tiny")
  cfg2.stages = "baseline,teacher,score,select,pretrain,finetune"
  pipeline.run(cfg2, workdir)
  out = capsys.readouterr().out
  for stage in ("baseline", "teacher", "score", "select", "pretrain", "finetune"):
    assert f"[{stage}] complete" in out
  assert os.path.getmtime(os.path.join(workdir, "teacher", "done.json")) == before


def test_changed_config_is_refused_not_silently_reused(tiny_run):
  _, workdir = tiny_run
  cfg = demo.get_config("tiny")
  cfg.select.k = 7
  cfg.stages = "select"
  with pytest.raises(config_lib.ConfigError, match=r"select\.k: 50 -> 7"):
    pipeline.run(cfg, workdir)


def test_fingerprint_changes_name_leaves_and_accept_new_default_fields():
  old = {"seed": 0, "pretrain": {"lr": 0.05, "steps": 10}}
  assert pipeline._fingerprint_changes(old, old) == []
  new = {"seed": 0, "pretrain": {"lr": 0.1, "steps": 10, "warmup_steps": None}}
  # a field added later with its default is not a change; a changed value is
  assert pipeline._fingerprint_changes(old, new) == ["pretrain.lr: 0.05 -> 0.1"]
  new["pretrain"]["warmup_steps"] = 5
  assert pipeline._fingerprint_changes(old, new) == [
      "pretrain.lr: 0.05 -> 0.1", "pretrain.warmup_steps: (absent) -> 5"]
  assert pipeline._fingerprint_changes(old, {"seed": 1, "pretrain": old["pretrain"]}) == [
      "seed: 0 -> 1"]


def test_self_training_teacher_is_the_baseline_and_depends_on_it(tmp_path, capsys):
  cfg = demo.get_config("tiny")
  cfg.stages = "baseline,teacher"
  cfg.teacher.model_kwargs = dict(cfg.baseline.model_kwargs)
  cfg.teacher.init_from = "baseline"
  cfg.teacher.steps = 0
  workdir = str(tmp_path / "w")
  pipeline.run(cfg, workdir)
  assert "side process" not in capsys.readouterr().out  # the teacher needs it first
  from bssl import train
  base = train.load_variables(os.path.join(workdir, "baseline", "final"))
  teach = train.load_variables(os.path.join(workdir, "teacher", "final"))
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(teach)):
    np.testing.assert_array_equal(a, b)
  done = lambda s: json.load(open(os.path.join(workdir, s, "done.json")))
  assert done("teacher")["val"] == done("baseline")["val"]
  # A teacher (and so D̂, the student) made from one baseline is not reused for another.
  cfg.baseline.lr = 0.123
  cfg.stages = "teacher"
  with pytest.raises(config_lib.ConfigError, match=r"stage 'teacher'.*baseline\.lr"):
    pipeline.run(cfg, workdir)


def test_a_separate_teacher_trains_while_the_baseline_trains_in_a_side_process(tmp_path,
                                                                              capfd):
  cfg = demo.get_config("tiny")
  cfg.teacher.init_from = None  # a deeper teacher of its own, as in the paper's main setting
  cfg.teacher.model_kwargs.depths = (2, 2, 2)
  cfg.teacher.steps = 6
  cfg.stages = "baseline,teacher"
  cfg.side_baseline = True
  workdir = str(tmp_path / "w")
  pipeline.run(cfg, workdir)
  assert "[baseline] training in a side process" in capfd.readouterr().out
  for s in ("baseline", "teacher"):
    done = json.load(open(os.path.join(workdir, s, "done.json")))
    assert done["steps"] == cfg[s].steps and "val" in done


@pytest.mark.parametrize("stage,kwargs,message", [
    ("teacher", dict(depths=(2, 2, 2)), r"teacher.init_from='baseline' needs the teacher's "
     r"architecture to be the baseline's"),
    ("pretrain", None, r"pretrain.init_from='baseline': only the teacher may start from"),
])
def test_init_from_a_stage_is_checked(tmp_path, stage, kwargs, message):
  cfg = demo.get_config("tiny")
  cfg[stage].init_from = "baseline"
  if kwargs:
    cfg[stage].model_kwargs = dict(cfg.baseline.model_kwargs, **kwargs)
  with pytest.raises(config_lib.ConfigError, match=message):
    pipeline.run(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("field,value,message", [
    ("select.k", 0, r"select.k must be a positive integer, got 0"),
    ("select.k", -3, r"select.k must be a positive integer, got -3"),
    ("select.p", 11, r"select.p must be an integer between 1 and data.num_classes \(10\), got 11"),
    ("teacher.model", "resnet_huge", r"teacher.model: unknown model 'resnet_huge'; accepted: .*resnet50"),
    ("stages", "teacher,distill", r"stages: unknown stage\(s\) \['distill'\]"),
    ("baseline.bn_mode", "global", r"baseline.bn_mode must be 'sync' or 'per_device', got 'global'"),
])
def test_bad_config_fails_before_any_work(tmp_path, field, value, message):
  cfg = demo.get_config("tiny")
  section, _, name = field.rpartition(".")
  (cfg[section] if section else cfg)[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    pipeline.run(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # nothing written, nothing trained


def test_missing_data_folder_names_the_field(tmp_path):
  cfg = demo.get_config("tiny")
  cfg.data.folder = str(tmp_path / "nowhere")
  with pytest.raises(sources.DataError, match=r"data.folder: .*nowhere.*dataset-fashion-mnist"):
    pipeline.run(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_resnext_config_without_imagenet_fails_fast_and_says_how(tmp_path):
  import resnext
  cfg = resnext.get_config()
  with pytest.raises(config_lib.ConfigError, match="unlabelled.path"):
    pipeline.run(cfg, str(tmp_path / "w"))
  cfg.unlabelled.path = str(tmp_path)
  (tmp_path / "a.png").write_bytes(b"not really")
  cfg.data.tfds_data_dir = str(tmp_path / "tfds")
  with pytest.raises(sources.DataError, match=r"imagenet2012.*manual"):
    pipeline.run(cfg, str(tmp_path / "w"))


@pytest.mark.parametrize("config_name", ["demo", "resnext"])
@pytest.mark.parametrize("preset", ["", "tiny"])
def test_every_field_that_defaults_to_none_can_be_set_from_the_command_line(config_name, preset):
  """ml_collections refuses ``--config.x=...`` for a plain None field (no type to parse
  into), which made e.g. --config.unlabelled.path unusable: such fields must be typed
  placeholders (config_lib.optional)."""
  import importlib
  import ml_collections
  cfg = importlib.import_module(config_name).get_config(preset)

  def none_leaves(c, prefix=""):
    for k in c.keys():
      v = c[k]
      if isinstance(v, ml_collections.ConfigDict):
        yield from none_leaves(v, f"{prefix}{k}.")
      elif v is None:
        yield f"{prefix}{k}", c.get_ref(k).get_type()

  leaves = dict(none_leaves(cfg))
  assert leaves, "expected some optional fields"
  untyped = sorted(name for name, t in leaves.items() if t is type(None))
  assert not untyped, f"fields not settable from the command line: {untyped}"


def test_command_line_sets_optional_fields_and_resnext_says_what_is_missing(tmp_path):
  import subprocess
  import sys
  (tmp_path / "u").mkdir()
  (tmp_path / "u" / "a.png").write_bytes(b"not really")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(
      [sys.executable, "-m", "bssl.main", "--config=configs/resnext.py",
       f"--workdir={tmp_path / 'w'}", f"--config.unlabelled.path={tmp_path / 'u'}",
       f"--config.data.tfds_data_dir={tmp_path / 'tfds'}", "--config.pretrain.steps=10",
       "--config.teacher.init_from=/nowhere"],
      cwd=repo, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stdout + r.stderr
  assert "imagenet2012" in r.stderr and "manual" in r.stderr, r.stderr
  assert "Flags parsing error" not in r.stderr


def test_kill_9_while_scoring_then_rerun_gives_the_same_dhat(tiny_run, tmp_path):
  """A real SIGKILL at an arbitrary moment of the score stage (after its first checkpoint);
  rerunning the same command must give exactly the D̂ of the uninterrupted run (same
  batch size: a different one changes the forward pass's float rounding, hence scores in
  their last bit)."""
  import shutil
  import subprocess
  import sys
  import time
  cfg, ref_dir = tiny_run
  wd = tmp_path / "killed"
  wd.mkdir()
  for name in ("config.json", "splits.json"):
    shutil.copy(os.path.join(ref_dir, name), wd / name)
  shutil.copytree(os.path.join(ref_dir, "teacher"), wd / "teacher")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "bssl.main", "--config=configs/demo.py:tiny", f"--workdir={wd}",
         "--config.stages=score,select", "--config.score.checkpoint_every=1",
         "--config.side_baseline=False"]
  state = wd / "score" / "process_0.state.npz"
  p = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 180
    while not state.exists() and p.poll() is None and time.monotonic() < deadline:
      time.sleep(0.02)
    time.sleep(float(np.random.default_rng().uniform(0, 0.1)))
  finally:
    p.kill()
  out = p.communicate()[0]
  assert p.returncode == -9, out          # it was killed, not finished
  assert not (wd / "score" / "done.json").exists(), "killed too late to test a resume"
  r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  import re
  start = re.search(r"starting at batch (\d+)", r.stdout)
  assert start and int(start.group(1)) >= 1, r.stdout  # resumed, not restarted
  with open(wd / "score" / "done.json") as f:
    assert json.load(f)["num_scored"] == len(pipeline.build_data(cfg).unlabelled)
  got = selection.read_selection(str(wd / "select" / "dhat"))
  want = selection.read_selection(os.path.join(ref_dir, "select", "dhat"))
  for field in ("ids", "classes", "scores", "ranks"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
