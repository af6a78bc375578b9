"""Scoring U: top-P on device, bad images skipped and listed, NaN logits stop the
stage, and an interrupted scoring run resumes to exactly the same D̂."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bssl import parallel, scoring, selection, train
from bssl.data import pipelines, sources
from bssl.models import create_model

SPEC = pipelines.ImageSpec(size=8, channels=1, augment="none")
C, P, K = 4, 2, 6
MEAN, STD = (100.0,), (60.0,)


@pytest.fixture(scope="module")
def setup():
  model = create_model("resnet_small", C, widths=(4,), depths=(1,))
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 8, 8, 1)), train=False))(
      jax.random.key(1, impl="rbg"))
  # Make BN statistics non-trivial so scores vary a lot between images.
  src = sources.fake_source(90, (8, 8, 1), C, seed=5)
  unl = sources.SubsetView(src, np.arange(len(src)), hide_labels=True, reindex=True)
  return model, variables, unl, parallel.make_mesh()


def _score(setup, score_dir, **kw):
  model, variables, unl, mesh = setup
  return scoring.score_shard(model=model, variables=variables, source=kw.pop("source", unl),
                             spec=SPEC, mesh=mesh, num_classes=C, top_p=P, k=K, mean=MEAN,
                             std=STD, global_batch_size=16, score_dir=score_dir,
                             checkpoint_every=kw.pop("checkpoint_every", 1), **kw)


def _brute_force(setup):
  model, variables, unl, _ = setup
  images = np.stack([unl[i]["image"] for i in range(len(unl))])
  logits = model.apply(jax.device_get(variables), train.normalize(images, MEAN, STD),
                       train=False)
  probs = np.asarray(jax.nn.softmax(logits, -1))
  top = np.argsort(-probs, axis=1, kind="stable")[:, :P]
  ids = np.repeat(np.arange(len(unl)), P)
  classes = top.reshape(-1)
  scores = np.take_along_axis(probs, top, 1).reshape(-1)
  rows = []
  for c in range(C):
    m = classes == c
    order = np.lexsort((ids[m], -scores[m]))[:K]
    rows += [(c, int(i)) for i in ids[m][order]]
  return rows


def test_scoring_then_selection_matches_brute_force(setup, tmp_path):
  out = _score(setup, str(tmp_path))
  assert out["num_scored"] == 90 and out["bad_ids"] == []
  acc, merged = scoring.merge_processes(str(tmp_path), 1)
  sel = acc.result()
  got = list(zip(sel.classes.tolist(), sel.ids.tolist()))
  want = _brute_force(setup)
  # Same classes and sizes; ids equal except where float32 scores tie differently
  # between the device softmax and numpy (not expected on this data).
  assert got == want


def test_interrupted_scoring_resumes_to_the_same_selection(setup, tmp_path):
  full = str(tmp_path / "full")
  _score(setup, full)
  ref = scoring.merge_processes(full, 1)[0].result()
  part = str(tmp_path / "part")
  out = _score(setup, part, stop_after_batches=3)
  assert out == {"interrupted_at_batch": 3}
  assert not os.path.exists(scoring.final_path(part, 0))
  res = _score(setup, part)
  assert res["num_scored"] == 90  # no image scored twice, none skipped
  got = scoring.merge_processes(part, 1)[0].result()
  for f in ("ids", "classes", "scores", "ranks"):
    np.testing.assert_array_equal(getattr(got, f), getattr(ref, f))


def test_bad_images_are_skipped_counted_and_listed(setup, tmp_path):
  folder = tmp_path / "u"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(20):
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
  (folder / "img05.png").write_bytes(b"\x89PNG broken")          # undecodable
  Image.fromarray(rng.integers(0, 255, (5, 9), dtype=np.uint8)).save(folder / "img11.png")
  unl = sources.ImageFileSource(str(folder), channels=1)
  out = _score(setup, str(tmp_path / "s"), source=unl)
  assert sorted(out["bad_ids"]) == [5, 11]
  assert out["num_scored"] == 18
  sel = scoring.merge_processes(str(tmp_path / "s"), 1)[0].result()
  assert not set(sel.ids.tolist()) & {5, 11}
  assert unl.name_of(5).endswith("img05.png")


def test_nan_logits_stop_with_the_image_ids(setup, tmp_path):
  model, variables, unl, mesh = setup
  bad = jax.tree.map(lambda x: x, jax.device_get(variables))
  bad["params"]["fc"]["bias"] = np.full_like(bad["params"]["fc"]["bias"], np.nan)
  with pytest.raises(scoring.NonFiniteLogitsError, match=r"image ids \[0, 1, 2"):
    _score((model, bad, unl, mesh), str(tmp_path))


def test_accumulator_checkpoint_round_trip(tmp_path):
  acc = selection.TopKPerClass(3, 2)
  acc.update(np.arange(6), np.array([0, 1, 2, 0, 1, 2]), np.linspace(0, 1, 6, dtype=np.float32))
  scoring.save_accumulator(str(tmp_path / "a.npz"), acc, next_batch=4)
  acc2, extra = scoring.load_accumulator(str(tmp_path / "a.npz"))
  assert int(extra["next_batch"]) == 4
  r1, r2 = acc.result(), acc2.result()
  np.testing.assert_array_equal(r1.ids, r2.ids)
  np.testing.assert_array_equal(r1.scores, r2.scores)
