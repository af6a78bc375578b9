"""Near-duplicates of evaluation images (bssl/data/neardup.py, issue 22): planted copies
(crop of up to 20% of the area, resize, JPEG quality 30-50, mirror, brightness / contrast /
saturation) are found and clean look-alikes are not, on photo-like synthetic scenes; on
Fashion-MNIST the planted copies are found too, but its garments are so alike that clean
images match as well (measured in benchmarks/neardup.py, docs/webdataset.md). And the
recipe keeps the copies out of D̂ and lists them."""

import json
import os

import numpy as np
import pytest

from bssl.data import neardup, planted


def test_planted_copies_found_and_look_alikes_not_on_photo_like_scenes():
  """500 evaluation scenes in 100 families (look-alikes share background and two shapes);
  U1 = transformed copies of all 500, resized to 64..128 px; U2 = 1,000 other scenes of
  the same families. Targets of the issue: recall >= 0.98, false positives <= 0.5%
  (measured at them; the bounds below have slack for float rounding)."""
  rng = np.random.default_rng(0)
  ev = [planted.scene(i, family=i % 100) for i in range(500)]
  index = neardup.Index(ev)
  copies = [planted.transform(e, rng, out_size=int(rng.integers(64, 129))) for e in ev]
  clean = [planted.scene(10_000 + i, family=i % 100) for i in range(1000)]
  m = index.match(copies)
  hit = m.copy & (m.index == np.arange(500))
  recall = hit.mean()
  fp = index.match(clean).copy.mean()
  # the targets: measured 0.990 and 0.5% (5 of 1,000) on 2026-12-08 (0.982 and 1.5%
  # before every thumbnail match was checked at 64 px and the local path's 30th percentile,
  # 0.980 while that check counted cells a copy's JPEG had flattened; 3.1% before the pixel
  # check at 64 px); what is left are look-alikes sharing two shapes and the background
  # pixel for pixel (partial copies by construction: docs/webdataset.md).
  # Bounds with two images of slack for another machine's float rounding
  assert recall >= 0.986, recall
  thumb = index.thumb.match(clean)
  assert (thumb.similarity >= neardup.DEFAULT_THRESHOLD).mean() <= 0.005
  assert fp <= 0.007, fp
  paths = m.path[hit]
  assert set(paths) <= set(neardup.PATHS) and (paths == "thumb").mean() > 0.9, set(paths)


def test_each_transform_alone_is_found():
  rng = np.random.default_rng(1)
  ev = [planted.scene(i, family=i % 10) for i in range(40)]
  index = neardup.Index(ev)
  from PIL import Image

  for name, f in (
      ("flip", lambda a: a[:, ::-1]),
      ("crop 20%", lambda a: a[5:91, 5:91]),
      ("resize", lambda a: np.asarray(Image.fromarray(a).resize((200, 200)))),
      ("jpeg 30", lambda a: planted.transform(a, rng, min_area=1.0, min_quality=30)),
      ("darker", lambda a: (a * 0.85).astype(np.uint8)),
  ):
    m = index.match([f(e) for e in ev])
    assert (m.index == np.arange(40)).all() and (m.similarity >= 0.95).all(), name


@pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist",
)
def test_recipe_keeps_copies_of_test_images_out_of_dhat(tmp_path, monkeypatch):
  """demo:tiny with copies of 40 test images planted into U (an image folder): none of
  them is scored or selected; each is listed with the test image it copies; the report
  counts them by split. The stages that keep the matcher's answers (score's eval copies,
  select's near-duplicates) are stale once the matcher's method changes: a rerun refuses,
  naming it, instead of keeping or mixing answers of two methods."""
  from PIL import Image

  from bssl import engine
  from bssl.configs import demo
  from bssl.data import recipe, sources

  cfg = demo.get_config("tiny")
  test = recipe.build_data(cfg).test  # the run's test split: matched ids are its positions
  rng = np.random.default_rng(0)
  folder = tmp_path / "u"
  folder.mkdir()
  train, _ = sources.load_fashion_mnist()
  for i in range(120):  # clean: training images
    Image.fromarray(train.images[50_000 + i, ..., 0]).save(folder / f"a{i:04d}.png")
  src = rng.choice(len(test), 40, replace=False)
  for j, t in enumerate(src):
    Image.fromarray(planted.transform(test[int(t)]["image"], rng)[..., 0]).save(
        folder / f"b{j:04d}.jpg"
    )
  cfg.unlabelled.kind, cfg.unlabelled.path = "image_folder", str(folder)
  cfg.score.eval_copies = "exclude"
  cfg.select.near_duplicates = "collapse"
  cfg.stages = "baseline,teacher,score,select,report"
  wd = str(tmp_path / "w")
  engine.run_recipe(cfg, wd)
  copies = json.load(open(os.path.join(wd, "select", "eval_copies.json")))
  removed = {c["id"]: c for c in copies if c["removed"]}
  planted_ids = set(range(120, 160))  # b* after a* in the sorted paths
  found = {
      i
      for i in planted_ids
      if i in removed
      and removed[i]["split"] == "test"
      and removed[i]["matched_id"] == int(src[i - 120])
  }
  # Fashion-MNIST: about 80% of the copies are matched to their own source (the rest to a
  # look-alike, or below the threshold; measured in benchmarks/neardup.py), and clean
  # garments match too: the method's figures come from photo-like scenes (above)
  assert len(found) >= 26, len(found)
  assert len(planted_ids & set(removed)) >= 34, len(planted_ids & set(removed))
  from bssl import selection

  sel = selection.read_selection(os.path.join(wd, "select", "dhat"), mmap=False)
  assert not set(sel.ids.tolist()) & set(removed)
  bad = json.load(open(os.path.join(wd, "select", "bad_images.json")))
  assert set(removed) <= set(bad["ids"])
  assert all(
      "near-duplicate of test image" in r or "validation" in r
      for i, r in zip(bad["ids"], bad["reasons"])
      if i in removed
  )
  res = json.load(open(os.path.join(wd, "report", "results.json")))
  assert res["selection"]["eval_copies"]["num_removed"] == len(removed)
  md = open(os.path.join(wd, "report", "results.md")).read()
  assert f"near-duplicates of evaluation images kept out of D̂: {len(removed):,}" in md

  from bssl import deps, stages, workdir

  w, data = workdir.Workdir(wd), recipe.build_data(cfg)
  assert engine.stale_stages(stages.table(cfg), cfg, w, "jax", data) == {}  # as it ran
  monkeypatch.setitem(deps.METHODS, "neardup", "another")
  deps.forget_identities()
  stale = engine.stale_stages(stages.table(cfg), cfg, w, "jax", data)
  assert {"score", "select"} <= set(stale) <= {"score", "select", "evaluate", "report"}, stale
  for name in ("score", "select"):  # the two that matched, by the method's name
    assert any(x.startswith("method.neardup: ") and "another" in x for x in stale[name])
  with pytest.raises(engine.RefusedError, match="method.neardup"):
    engine.run_recipe(cfg, wd)
  monkeypatch.undo()
  deps.forget_identities()
  # a score stage made by a bssl that did not note the method (before 2026-12-08): stale too
  done = os.path.join(wd, "score", "done.json")
  info = json.load(open(done))
  del info["record"]["files"]["method.neardup"]
  json.dump(info, open(done, "w"))
  stale = engine.stale_stages(stages.table(cfg), cfg, w, "jax", data)
  assert any("did not record its method" in x for x in stale["score"]), stale
  assert "select" in stale  # (it reads the score stage)
  # the same check decides whether a sweep may share the stage from another point
  methods = stages.table(cfg)["score"].methods(cfg)
  assert methods == ("neardup",)
  inputs = {"teacher": w.done("teacher")["artifact_id"]}
  assert deps.check_record(info["record"], cfg, data, inputs, "jax", methods=methods)
  assert not deps.check_record(info["record"], cfg, data, inputs, "jax")  # (the control)


def test_matching_is_resumable_in_parts_and_reads_the_old_single_part(tmp_path, monkeypatch):
  """The eval-copies search writes a part per 16 blocks of U: a process killed mid-way
  (here: parts removed) recomputes only the missing parts, and the result is the one of
  an uninterrupted run; progress lines come with a rate and an ETA; the single part per
  process of earlier versions is still read."""
  import types

  from bssl import storage
  from bssl.data import sources
  from bssl.stages import eval_copies

  monkeypatch.setattr(eval_copies, "BLOCK", 4)
  monkeypatch.setattr(eval_copies, "CHUNK", 2)
  rng = np.random.default_rng(3)
  ev = [planted.scene(i, size=48, family=i % 6) for i in range(30)]
  u = [
      planted.transform(ev[i // 3], rng) if i % 3 == 0 else planted.scene(500 + i, size=48)
      for i in range(37)
  ]
  logs = []
  ctx = types.SimpleNamespace(
      cfg=types.SimpleNamespace(score=types.SimpleNamespace(copy_threshold=0.95)),
      data=types.SimpleNamespace(
          test=sources.ArraySource(np.stack(ev)),
          val=None,
          labelled=None,
          unlabelled=sources.ArraySource(np.stack(u)),
      ),
      log=logs.append,
  )
  calls = []
  real = neardup.Index.match
  monkeypatch.setattr(
      neardup.Index,
      "match",
      lambda self, imgs, **kw: (calls.append(len(imgs)), real(self, imgs, **kw))[1],
  )
  folder = storage.path(tmp_path / "ec")
  want = eval_copies.find(ctx, folder)
  parts = sorted(os.listdir(folder))
  assert len(parts) == 5 and all("-of-00001-c" in p for p in parts), parts  # 10 blocks
  assert sum(calls) == 37 and set(want["id"].tolist()) >= {0, 3, 6}
  assert any("img/s eta" in m for m in logs), logs
  calls.clear()
  for p in (parts[1], parts[4]):  # killed: these parts never written
    os.unlink(folder / p)
  got = eval_copies.find(ctx, folder)
  assert sum(calls) == 8 + 5, calls  # blocks 2-3 and 8-9 (37 images: the last holds 1)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  calls.clear()
  assert all(np.array_equal(eval_copies.find(ctx, folder)[k], want[k]) for k in want)
  assert not calls  # all parts there: nothing matched again
  for p in os.listdir(folder):  # a run of bssl <= 0.4.0: one part per process
    os.unlink(folder / p)
  storage.write_npz(folder / "p00000-of-00001.npz", **want)
  got = eval_copies.read_done(folder, 1)
  assert all(np.array_equal(got[k], want[k]) for k in want)


def test_matching_split_between_processes_equals_one_and_survives_a_count_change(
    tmp_path, monkeypatch
):
  """Two processes each search their share of U (simulated one after the other): the
  union is the one-process answer; rerun on one process, the two-process parts are
  dropped and the answer is the same."""
  import types

  from bssl import parallel, storage
  from bssl.data import sources
  from bssl.stages import eval_copies

  monkeypatch.setattr(eval_copies, "BLOCK", 4)
  monkeypatch.setattr(eval_copies, "CHUNK", 2)
  monkeypatch.setattr(parallel, "sync", lambda name: None)
  rng = np.random.default_rng(4)
  ev = [planted.scene(i, size=48, family=i % 6) for i in range(20)]
  u = [
      planted.transform(ev[i // 2], rng) if i % 2 == 0 else planted.scene(700 + i, size=48)
      for i in range(29)
  ]
  ctx = types.SimpleNamespace(
      cfg=types.SimpleNamespace(score=types.SimpleNamespace(copy_threshold=0.95)),
      data=types.SimpleNamespace(
          test=sources.ArraySource(np.stack(ev)),
          val=None,
          labelled=None,
          unlabelled=sources.ArraySource(np.stack(u)),
      ),
      log=lambda m: None,
  )
  one = eval_copies.find(ctx, storage.path(tmp_path / "one"))
  assert len(one["id"]) >= 12
  folder = storage.path(tmp_path / "two")
  monkeypatch.setattr(parallel, "process_count", lambda: 2)
  for pi in (0, 1):
    monkeypatch.setattr(parallel, "process_index", lambda pi=pi: pi)
    two = eval_copies.find(ctx, folder)
  assert all(np.array_equal(two[k], one[k]) for k in one)
  assert {n.split("-c")[0] for n in os.listdir(folder)} == {"p00000-of-00002", "p00001-of-00002"}
  monkeypatch.setattr(parallel, "process_count", lambda: 1)
  monkeypatch.setattr(parallel, "process_index", lambda: 0)
  again = eval_copies.find(ctx, folder)
  assert all(np.array_equal(again[k], one[k]) for k in one)
  assert all("-of-00001-" in n for n in os.listdir(folder))
