"""Reuse only what is truly the same (issue #21): files identified by content, evaluations
naming the artifact they measured, one refusal naming every stale folder, and
--recompute_stale. Each case here passed silently (exit 0, old results reused) before the
engine recorded what stages read."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from test_pipeline import _copy_stages as _copy

from bssl import deps, engine
from bssl.configs import demo
from bssl.data import sources

pytestmark = pytest.mark.skipif(
    not os.path.exists(
        os.path.join(sources.FASHION_MNIST_DEFAULT_DIRS[0], "train-images-idx3-ubyte.gz")
    ),
    reason="needs Debian's dataset-fashion-mnist",
)


def _done(wd, stage):
  return json.load(open(os.path.join(wd, stage, "done.json")))


def test_teacher_init_from_is_identified_by_content(demo_tiny_run, tmp_path, capsys):
  """Other variables put at teacher.init_from's path make the teacher stale."""
  _, ref = demo_tiny_run
  ckpt = str(tmp_path / "vars")
  shutil.copytree(os.path.join(ref, "baseline", "final"), ckpt)
  cfg = demo.get_config("tiny")
  cfg.teacher.init_from, cfg.teacher.steps = ckpt, 0
  cfg.stages = "teacher"
  wd = str(tmp_path / "w")
  engine.run_recipe(cfg, wd)
  rec = _done(wd, "teacher")["record"]
  assert rec["files"]["teacher.init_from"]["path"] == ckpt
  engine.run_recipe(cfg, wd)
  assert "[teacher] complete" in capsys.readouterr().out
  shutil.rmtree(ckpt)  # other variables behind the same path
  shutil.copytree(os.path.join(ref, "finetune", "final"), ckpt)
  with pytest.raises(
      engine.RefusedError,
      match=re.escape(ckpt) + r" \(teacher\.init_from\): " r"its contents changed",
  ):
    engine.run_recipe(cfg, wd)


def test_report_never_shows_a_replaced_model(demo_tiny_run, tmp_path, capsys):
  """Deleting finetune/ and running finetune,report: the evaluation of the old student is
  not shown; the new student is measured (evaluate is run with report)."""
  _, ref = demo_tiny_run
  wd = str(tmp_path / "w")
  _copy(ref, wd, ("baseline", "teacher", "score", "select", "pretrain", "finetune", "evaluate"))
  old = _done(wd, "evaluate")["student"]
  shutil.rmtree(os.path.join(wd, "finetune"))
  cfg = demo.get_config("tiny")
  cfg.finetune.lr = 0.5  # another student
  cfg.stages = "finetune,report"
  engine.run_recipe(cfg, wd)
  out = capsys.readouterr().out
  new_aid = _done(wd, "finetune")["artifact_id"]
  ev = _done(wd, "evaluate")
  assert ev["student"]["artifact_id"] == new_aid != old["artifact_id"]
  assert "baseline: measured before" in out  # unchanged models are not measured again
  res = json.load(open(os.path.join(wd, "report", "results.json")))
  assert res["student"]["artifact_id"] == new_aid
  assert res["gain_top1"] == pytest.approx(res["student"]["top1"] - res["baseline"]["top1"])


def test_one_refusal_names_every_stale_folder_and_recompute_stale(demo_tiny_run, tmp_path, capsys):
  """A change that makes two roots stale (the baseline and a trained teacher both read D)
  is refused once, naming every stale folder in deletion order; deleting exactly those
  lets the run through; --recompute_stale does that itself and keeps what is valid."""
  _, ref = demo_tiny_run
  cfg = demo.get_config("tiny")
  cfg.teacher.init_from, cfg.teacher.steps = None, 3
  cfg.stages = "baseline,teacher,score,select"
  wd = str(tmp_path / "w")
  engine.run_recipe(cfg, wd)
  cfg.data.labelled_per_class = cfg.data.labelled_per_class + 1  # D changes: both roots
  with pytest.raises(engine.RefusedError) as e:
    engine.run_recipe(cfg, wd)
  msg = str(e.value)
  named = re.search(r"delete (.*) \(in this order\)", msg).group(1).split(", ")
  assert [os.path.basename(p) for p in named] == ["select", "score", "teacher", "baseline"]
  assert "baseline: data.labelled_per_class" in msg and "teacher: data.labelled_per_class" in msg
  # a change of select.k only: select and score (which keeps K without score.max_k) are
  # recomputed, the baseline and the teacher kept
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.data.labelled_per_class -= 1
  cfg2.select.k = 20
  before = {s: _done(wd, s)["artifact_id"] for s in ("baseline", "teacher", "score")}
  capsys.readouterr()
  engine.run_recipe(cfg2, wd, recompute_stale=True)
  out = capsys.readouterr().out
  assert "recomputing select" in out and "recomputing score" in out
  assert "recomputing teacher" not in out and "recomputing baseline" not in out
  kept = ("baseline", "teacher")
  assert {s: _done(wd, s)["artifact_id"] for s in kept} == {s: before[s] for s in kept}
  assert _done(wd, "select")["k"] == 20
  # and the two-root change with --recompute_stale: every stage made afresh
  engine.run_recipe(cfg, wd, recompute_stale=True)
  out = capsys.readouterr().out
  for s in ("baseline", "teacher", "score", "select"):
    assert f"recomputing {s}" in out
  assert _done(wd, "baseline")["artifact_id"] != before["baseline"]


def test_tags_file_is_identified_by_content(tmp_path):
  from bssl.data import weak

  img = tmp_path / "imgs"
  img.mkdir()
  from PIL import Image

  for i in range(3):
    Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(img / f"{i}.png")
  tags = tmp_path / "tags.txt"
  tags.write_text("a b\nb\na\n")
  cfg = demo.get_config("tiny")
  cfg.weak.kind, cfg.weak.path, cfg.weak.tags_file = "tags_file", str(img), str(tags)
  rec = deps.Recorder()
  from bssl.data import recipe

  data = recipe.build_data(cfg)
  with deps.recording(rec):
    weak.build(deps.Tracked(cfg), data)
  assert rec.files["weak.tags_file"]["id"] == deps.file_identity(str(tags))
  record = dict(rec.to_dict(), version=deps.RECORD_VERSION, inputs={}, backend="jax")
  assert deps.check_record(record, cfg, data, {}, "jax") == []
  tags.write_text("b a\nb\na\n")  # other tags, same size, same path
  deps.forget_identities()
  assert any("weak.tags_file" in c for c in deps.check_record(record, cfg, data, {}, "jax"))
  (img / "1.png").unlink()  # an image of weak.path gone
  Image.fromarray(np.zeros((5, 5), np.uint8)).save(img / "1.png")
  deps.forget_identities()
  assert any("(weak.path)" in c for c in deps.check_record(record, cfg, data, {}, "jax"))


def test_tracked_config_records_reads_and_is_read_only():
  cfg = demo.get_config("tiny")
  rec = deps.Recorder()
  t = deps.Tracked(cfg)
  with deps.recording(rec):
    assert t.select.k == cfg.select.k
    assert t.baseline.get("no_such") is None
    assert dict(t.baseline.model_kwargs) == dict(cfg.baseline.model_kwargs)
    _ = t.baseline.log_every  # cosmetic: not recorded
  assert rec.fields["select.k"] == cfg.select.k
  assert rec.fields["baseline.no_such"] == deps.ABSENT
  assert "baseline.model_kwargs" in rec.fields and "baseline.log_every" not in rec.fields
  with pytest.raises(TypeError, match="read-only"):
    t.select.k = 3
  # a cached computation replays what it read into the stage that uses it
  memo = deps.Memo.compute(lambda: t.data.image_size)
  rec2 = deps.Recorder()
  with deps.recording(rec2):
    memo.get()
  assert rec2.fields == {"data.image_size": cfg.data.image_size}
