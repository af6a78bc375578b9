"""The whole recipe on a tiny Fashion-MNIST subset through the engine, its bookkeeping
(skip, refuse, resume) and config errors raised before any training starts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bssl import config as config_lib
from bssl import engine, selection
from bssl.configs import demo
from bssl.data import recipe, sources

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist (the README's commands install it)",
)


@pytest.fixture
def tiny_run(demo_tiny_run):
  return demo_tiny_run  # tests/conftest.py: one tiny demo run per session


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
  data = recipe.build_data(cfg)
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
  engine.run_recipe(cfg2, workdir)
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
    engine.run_recipe(cfg, workdir)


def test_check_record_names_fields_inputs_and_backend():
  from bssl import deps

  cfg = demo.get_config("tiny")
  rec = {
      "version": deps.RECORD_VERSION,
      "fields": {"seed": 0, "pretrain.lr": cfg.pretrain.lr},
      "files": {},
      "inputs": {"select": "a1"},
      "backend": "jax",
  }
  assert engine.check_record(rec, cfg, None, {"select": "a1"}, "jax") == []
  cfg.pretrain.lr = 0.5
  assert engine.check_record(rec, cfg, None, {"select": "b2"}, "torch") == [
      f"pretrain.lr: {rec['fields']['pretrain.lr']!r} -> 0.5",
      "input 'select' was recomputed since (artifact a1 -> b2)",
      "backend: 'jax' -> 'torch'",
  ]
  # a field the config does not have (any more) is a change, never ignored
  rec["fields"]["unlabelled.no_such_field"] = True
  assert "unlabelled.no_such_field: True -> (absent)" in engine.check_record(
      rec, cfg, None, {"select": "a1"}, "jax"
  )
  # a record of the old format (declared sections) is refused as such
  assert "older bssl" in engine.check_record({"config": {}}, cfg)[0]


def test_self_training_teacher_is_the_baseline_and_depends_on_it(tiny_run):
  cfg, workdir = tiny_run
  done = lambda s: json.load(open(os.path.join(workdir, s, "done.json")))
  # The teacher's artifact points at the baseline's variables: no copy, one evaluation.
  assert done("teacher")["variables_from"] == "baseline"
  assert done("teacher")["record"]["inputs"] == {"baseline": done("baseline")["artifact_id"]}
  assert not os.path.exists(os.path.join(workdir, "teacher", "final"))
  # A teacher (and so D̂, the student) made from one baseline is not reused for another.
  cfg = demo.get_config("tiny")
  cfg.baseline.lr = 0.123
  cfg.stages = "teacher"
  with pytest.raises(config_lib.ConfigError, match=r"baseline: .*baseline\.lr"):
    engine.run_recipe(cfg, workdir)


@pytest.mark.parametrize(
    "stage,kwargs,message",
    [
        (
            "teacher",
            dict(depths=(2, 2, 2)),
            r"teacher.init_from='baseline' needs the teacher's "
            r"architecture to be the baseline's",
        ),
        ("pretrain", None, r"pretrain.init_from='baseline': only the teacher may start from"),
    ],
)
def test_init_from_a_stage_is_checked(tmp_path, stage, kwargs, message):
  cfg = demo.get_config("tiny")
  cfg[stage].init_from = "baseline"
  if kwargs:
    cfg[stage].model_kwargs = dict(cfg.baseline.model_kwargs, **kwargs)
  with pytest.raises(config_lib.ConfigError, match=message):
    engine.run_recipe(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("select.k", 0, r"select.k must be a positive integer, got 0"),
        ("select.k", -3, r"select.k must be a positive integer, got -3"),
        (
            "select.p",
            11,
            r"select.p must be an integer between 1 and data.num_classes \(10\), got 11",
        ),
        (
            "teacher.model",
            "resnet_huge",
            r"teacher.model: unknown model 'resnet_huge'; accepted: .*resnet50",
        ),
        ("stages", "teacher,distill", r"stages: unknown stage\(s\) \['distill'\]"),
        (
            "baseline.bn_mode",
            "global",
            r"baseline.bn_mode must be 'sync' or 'per_device', got 'global'",
        ),
        ("unlabelled.limit", 0, r"unlabelled.limit must be a positive integer, got 0"),
        ("data.subset", 0, r"data.subset must be a positive integer, got 0"),
        (
            "pretrain.batch_size",
            12,
            r"pretrain.batch_size=12 must be a multiple of the number of "
            r"devices \(8 on 1 process",
        ),
        (
            "score.batch_size",
            100,
            r"score.batch_size=100 must be a multiple of the number of devices",
        ),
        ("finetune.init_from", "/x", r"finetune.init_from must be None"),
        ("teacher.steps", 0, r"teacher.steps=0 trains nothing, so teacher.init_from must name"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, field, value, message):
  cfg = demo.get_config("tiny")
  section, _, name = field.rpartition(".")
  if field == "teacher.steps":
    cfg.teacher.init_from = None
  (cfg[section] if section else cfg)[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    engine.run_recipe(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # nothing written, nothing trained


def test_missing_data_folder_names_the_field(tmp_path):
  cfg = demo.get_config("tiny")
  cfg.data.folder = str(tmp_path / "nowhere")
  with pytest.raises(sources.DataError, match=r"data.folder: .*nowhere.*dataset-fashion-mnist"):
    engine.run_recipe(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_resnext_config_without_imagenet_fails_fast_and_says_how(tmp_path):
  from bssl.configs import resnext

  cfg = resnext.get_config()
  with pytest.raises(config_lib.ConfigError, match="unlabelled.path"):
    engine.run_recipe(cfg, str(tmp_path / "w"))
  cfg.unlabelled.path = str(tmp_path)
  (tmp_path / "a.png").write_bytes(b"not really")
  cfg.data.tfds_data_dir = str(tmp_path / "tfds")
  with pytest.raises(sources.DataError, match=r"imagenet2012.*manual"):
    engine.run_recipe(cfg, str(tmp_path / "w"))


@pytest.mark.parametrize("config_name", ["demo", "resnext"])
@pytest.mark.parametrize("preset", ["", "tiny"])
def test_every_field_that_defaults_to_none_can_be_set_from_the_command_line(config_name, preset):
  """ml_collections refuses ``--config.x=...`` for a plain None field (no type to parse
  into), which made e.g. --config.unlabelled.path unusable: such fields must be typed
  placeholders (config_lib.optional)."""
  import importlib

  import ml_collections

  cfg = importlib.import_module(f"bssl.configs.{config_name}").get_config(preset)

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
  (tmp_path / "u").mkdir()
  (tmp_path / "u" / "a.png").write_bytes(b"not really")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "bssl.main",
          "--config=configs/resnext.py",
          f"--workdir={tmp_path / 'w'}",
          f"--config.unlabelled.path={tmp_path / 'u'}",
          f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
          "--config.pretrain.steps=10",
          "--config.teacher.init_from=None",
      ],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert r.returncode == 2, r.stdout + r.stderr
  assert "imagenet2012" in r.stderr and "manual" in r.stderr, r.stderr
  assert "Flags parsing error" not in r.stderr


def test_kill_9_while_scoring_then_rerun_gives_the_same_dhat(tiny_run, tmp_path):
  """A real SIGKILL at an arbitrary moment of the score stage (after its first checkpoint);
  rerunning the same command must give exactly the D̂ of the uninterrupted run (same
  batch size: a different one changes the forward pass's float rounding, hence scores in
  their last bit)."""
  import shutil
  import time

  cfg, ref_dir = tiny_run
  wd = tmp_path / "killed"
  wd.mkdir()
  for name in ("config.json", "splits.json"):
    shutil.copy(os.path.join(ref_dir, name), wd / name)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for stage in ("baseline", "teacher"):
    shutil.copytree(os.path.join(ref_dir, stage), wd / stage)
  cmd = [
      sys.executable,
      "-m",
      "bssl.main",
      "--config=configs/demo.py:tiny",
      f"--workdir={wd}",
      "--config.stages=score,select",
      "--config.score.checkpoint_every=1",
  ]
  state = wd / "score" / "parts" / "g0001_p00000.json"
  p = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 180
    while not state.exists() and p.poll() is None and time.monotonic() < deadline:
      time.sleep(0.02)
    time.sleep(float(np.random.default_rng().uniform(0, 0.1)))
  finally:
    p.kill()
  out = p.communicate()[0]
  assert p.returncode == -9, out  # it was killed, not finished
  assert not (wd / "score" / "done.json").exists(), "killed too late to test a resume"
  r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  import re

  start = re.search(r"(\d+) scored by earlier runs", r.stdout)
  assert start and int(start.group(1)) >= 80, r.stdout  # resumed, not restarted
  with open(wd / "score" / "done.json") as f:
    assert json.load(f)["num_scored"] == len(recipe.build_data(cfg).unlabelled)
  got = selection.read_selection(str(wd / "select" / "dhat"))
  want = selection.read_selection(os.path.join(ref_dir, "select", "dhat"))
  for field in ("ids", "classes", "scores", "ranks"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def _copy_stages(src, dst, stages):
  import shutil

  os.makedirs(dst, exist_ok=True)
  for name in ("config.json", "splits.json"):
    shutil.copy(os.path.join(src, name), os.path.join(dst, name))
  for s in stages:
    shutil.copytree(os.path.join(src, s), os.path.join(dst, s))


def test_changing_p_after_scoring_is_refused_then_rescored_correctly(tiny_run, tmp_path):
  """The score stage's artifact depends on select.k and select.p: changing P must refuse
  (naming score), and after deleting what the message names, D̂ is rebuilt from a new
  scoring pass: with P = 1 no image appears twice."""
  import re
  import shutil

  _, ref = tiny_run
  wd = str(tmp_path / "w")
  _copy_stages(ref, wd, ("baseline", "teacher", "score", "select"))
  before = open(os.path.join(wd, "config.json")).read()
  cfg = demo.get_config("tiny")
  cfg.select.p = 1
  cfg.stages = "score,select"
  with pytest.raises(config_lib.ConfigError, match=r"score: .*select\.p: 2 -> 1") as e:
    engine.run_recipe(cfg, wd)
  assert open(os.path.join(wd, "config.json")).read() == before  # a refusal writes nothing
  named = re.search(r"delete (.*) \(in this order\)", str(e.value)).group(1).split(", ")
  assert {os.path.basename(p) for p in named} == {"score", "select"}
  for p in named:
    shutil.rmtree(p)
  engine.run_recipe(cfg, wd)
  sel = selection.read_selection(os.path.join(wd, "select", "dhat"))
  assert len(np.unique(sel.ids)) == len(sel.ids)
  assert json.load(open(os.path.join(wd, "select", "done.json")))["p"] == 1


def test_recomputed_input_makes_downstream_stale(tiny_run, tmp_path):
  """Deleting only the teacher and rerunning it would give the score stage a new teacher:
  the old scores are refused, not reused."""
  _, ref = tiny_run
  wd = str(tmp_path / "w")
  _copy_stages(ref, wd, ("baseline", "score"))
  cfg = demo.get_config("tiny")
  cfg.stages = "teacher,score"
  with pytest.raises(config_lib.ConfigError, match=r"score: .*input 'teacher' was " r"recomputed"):
    engine.run_recipe(cfg, wd)


def test_partial_state_of_another_config_is_refused(tiny_run, tmp_path):
  """A started (not done) stage keeps partial state; resuming it under another config
  would mix two runs, so it is refused."""
  _, ref = tiny_run
  wd = str(tmp_path / "w")
  _copy_stages(ref, wd, ("baseline", "teacher"))
  done = json.load(open(os.path.join(wd, "baseline", "done.json")))
  os.remove(os.path.join(wd, "baseline", "done.json"))  # as if killed before the end
  rec = done["record"]
  with open(os.path.join(wd, "baseline", "started.json"), "w") as f:
    json.dump({"version": rec["version"], "inputs": rec["inputs"], "backend": rec["backend"]}, f)
  os.makedirs(os.path.join(wd, "baseline", "reads"))
  with open(os.path.join(wd, "baseline", "reads", "p0.json"), "w") as f:
    json.dump({"fields": rec["fields"], "files": rec["files"]}, f)
  cfg = demo.get_config("tiny")
  cfg.baseline.steps = 7
  cfg.stages = "baseline"
  with pytest.raises(config_lib.ConfigError, match=r"baseline: .*" r"baseline\.steps: 6 -> 7"):
    engine.run_recipe(cfg, wd)


def _cli(args, env=None, timeout=300):
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return subprocess.run(
      [sys.executable, "-m", "bssl.main", *args],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=timeout,
      env={**os.environ, **(env or {})},
  )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config=configs/demo.py:tiny", "--config.nonexistent_field=1"], "nonexistent_field"),
        (["--config=configs/nowhere.py"], "nowhere.py"),
        (["--config=configs/demo.py:huge"], "unknown preset"),
        # seeds are a field: the removed seedN presets say what replaces them
        (["--config=configs/demo.py:seed1"], "preset 'seed1' was removed: pass --config.seed=1"),
        (["--config=configs/video.py:seed2"], "use the preset 'demo' and pass --config.seed=2"),
        (["--config=configs/demo.py:tiny", "--config.select.k=zero"], "select.k"),
        (
            ["--config=configs/demo.py:tiny", "--config.unlabelled.limit=0"],
            "unlabelled.limit must be a positive integer, got 0",
        ),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, message):
  r = _cli([*args, f"--workdir={tmp_path / 'w'}"])
  assert r.returncode == 2, r.stdout + r.stderr
  assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
  assert not (tmp_path / "w").exists()


def test_cli_workdir_that_is_a_file(tmp_path):
  (tmp_path / "f").write_text("x")
  r = _cli(["--config=configs/demo.py:tiny", f"--workdir={tmp_path / 'f'}"])
  assert r.returncode == 2 and "is an existing file" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr
  assert (tmp_path / "f").read_text() == "x"


def test_init_from_variables_saved_on_another_device_count(tiny_run, tmp_path):
  """The tiny run saved its baseline on 8 devices; a 2-device process uses it as a teacher."""
  _, ref = tiny_run
  r = _cli(
      [
          "--config=configs/demo.py:tiny",
          f"--workdir={tmp_path / 'w'}",
          f"--config.teacher.init_from={os.path.join(ref, 'baseline', 'final')}",
          "--config.stages=teacher,evaluate",
      ],
      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
  )
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  ev = json.load(open(tmp_path / "w" / "evaluate" / "done.json"))
  ref_ev = json.load(open(os.path.join(ref, "evaluate", "done.json")))
  assert ev["teacher"]["top1"] == pytest.approx(ref_ev["baseline"]["top1"], abs=1e-3)


def test_resnext_tiny_runs_every_stage_on_gcs(tmp_path, gcs):
  """The user's command for the tiny preset of the paper's recipe, with the work directory
  on a gs:// bucket (the local emulator): grouped bottlenecks, random-resized crops,
  per-device BatchNorm, a teacher of its own; every stage completes."""
  wd = gcs.url(f"resnext_tiny/{tmp_path.name}")
  env = {
      **os.environ,
      **gcs.env,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  }
  r = subprocess.run(
      [sys.executable, "-m", "bssl.main", "--config=configs/resnext.py:tiny", f"--workdir={wd}"],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
  )
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  r = subprocess.run(
      [
          sys.executable,
          "-c",
          "from etils import epath; import sys; " "print(epath.Path(sys.argv[1]).read_text())",
          f"{wd}/report/results.json",
      ],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads(r.stdout)
  for key in ("baseline", "teacher", "student_pretrained", "student"):
    assert res[key]["num_examples"] == 40
  assert "same_as" not in res["teacher"]
  assert res["scoring"]["num_scored"] == 200


@pytest.mark.parametrize("preset", ["", "compare", "tiny", "own_teacher"])
def test_every_demo_preset_validates(preset):
  config_lib.validate(demo.get_config(preset), num_devices=8)


def test_two_rounds_keep_both_and_round_two_scores_with_the_round_one_student(tiny_run, tmp_path):
  """rounds=2 over a complete 1-round work directory: round 1 is reused, round 2 scores U
  with round 1's student (its D̂ equals scoring U with that model directly), both rounds'
  models and D̂ are kept and reported."""
  cfg, src = tiny_run
  wd = str(tmp_path / "w")
  _copy_stages(src, wd, ("baseline", "teacher", "score", "select", "pretrain", "finetune"))
  cfg2 = demo.get_config("tiny")
  cfg2.rounds = 2
  engine.run_recipe(cfg2, wd)
  for s in ("select", "select_r2"):
    assert os.path.exists(os.path.join(wd, s, "dhat"))
  fin = json.load(open(os.path.join(wd, "finetune", "done.json")))
  assert (
      json.load(open(os.path.join(src, "finetune", "done.json")))["artifact_id"]
      == fin["artifact_id"]
  )  # round 1 was reused, not retrained
  sc2 = json.load(open(os.path.join(wd, "score_r2", "done.json")))
  assert sc2["record"]["inputs"] == {"finetune": fin["artifact_id"]}
  res = json.load(open(os.path.join(wd, "report", "results.json")))
  assert [r["round"] for r in res["rounds"]] == [1, 2]
  assert res["rounds"][1]["student_top1"] == res["student_r2"]["top1"]
  assert "Rounds of self-training" in open(os.path.join(wd, "report", "results.md")).read()

  # round 2's D̂ = the exact top-K of U scored by round 1's student, computed here directly
  from bssl import parallel, scoring
  from bssl.backends import jax as backend
  from bssl.data import recipe

  data = recipe.build_data(cfg2)
  model = backend.make_model(cfg2.finetune, cfg2.data.num_classes)
  from bssl import train as train_lib

  v = train_lib.load_variables(
      os.path.join(wd, "finetune", "final"),
      parallel.make_mesh(),
      backend.variable_shapes(model, data.spec),
  )
  scorer = backend.JaxScorer(model, v, cfg2.select.p, cfg2.data.mean, cfg2.data.std)
  parts = tmp_path / "direct"
  gen, chunks = scoring.plan_chunks(parts, len(data.unlabelled), 10**9)
  scoring.score_process(
      scorer=scorer,
      source=data.unlabelled,
      spec=data.spec,
      parts_dir=parts,
      gen=gen,
      chunks=chunks,
      process_index=0,
      process_count=1,
      num_classes=cfg2.data.num_classes,
      k=cfg2.select.k,
      p=cfg2.select.p,
      local_batch_size=cfg2.score.batch_size,
      log=lambda m: None,
  )
  want = scoring.merge_parts(parts, len(data.unlabelled))[0].result()
  got = selection.read_selection(os.path.join(wd, "select_r2", "dhat"))
  np.testing.assert_array_equal(got.ids, want.ids)
  np.testing.assert_array_equal(got.classes, want.classes)


def test_score_max_k_serves_other_k_and_p_without_rescoring(tiny_run, tmp_path, capsys):
  """score.max_k/max_p: scored once; a work directory that changes select.k and select.p
  (below them) reuses the score stage and its D̂ equals a run scored at that K and P."""
  cfg, src = tiny_run
  a = str(tmp_path / "a")
  _copy_stages(src, a, ("baseline", "teacher"))
  c = demo.get_config("tiny")
  c.stages = "score,select"
  c.score.max_k, c.score.max_p = 60, 2
  engine.run_recipe(c, a)
  b = str(tmp_path / "b")
  _copy_stages(a, b, ("baseline", "teacher", "score"))
  c.select.k, c.select.p = 25, 1
  capsys.readouterr()
  engine.run_recipe(c, b)
  assert "[score] complete in" in capsys.readouterr().out  # not rescored
  got = selection.read_selection(os.path.join(b, "select", "dhat"))
  d = str(tmp_path / "direct")
  _copy_stages(src, d, ("baseline", "teacher"))
  c2 = demo.get_config("tiny")
  c2.stages, c2.select.k, c2.select.p = "score,select", 25, 1
  engine.run_recipe(c2, d)
  want = selection.read_selection(os.path.join(d, "select", "dhat"))
  for f in ("ids", "classes", "scores", "ranks"):
    np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
  c.select.k = 61
  with pytest.raises(config_lib.ConfigError, match="above score.max_k=60"):
    engine.run_recipe(c, b)
