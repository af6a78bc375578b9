"""Web copies (issue 30): every family of bssl/data/webcopy.py (caption band, text,
sticker, letterbox, padding, 60% crop, stretch, rotation, perspective, JPEG 10-20, 0.3x,
strong colour, grey + mirror, blur, sharpening) and pairs of them are found by
``neardup.Index`` on tiles of real photographs, other tiles of the same photographs
(transformed) are not, and near-duplicates within one set are paired. The full measurement
is benchmarks/webcopies.py (docs/webdataset.md); this is its small, fast form."""

import os
import sys

import numpy as np
import pytest

from bssl.data import neardup, planted, webcopy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
webcopies = pytest.importorskip("webcopies")  # (scikit-image: a dev requirement)


@pytest.fixture(scope="module")
def data():
  return webcopies.make_set(24, 240, 2, 10, seed=3, per_family=1)


@pytest.fixture(scope="module")
def matched(data):
  index = neardup.Index(data["ev"])
  n = len(data["copies"])
  m = index.match(data["copies"] + data["clean"])
  found = m.copy[:n] & (m.index[:n] == data["source"])
  return found, m.copy[n:], m


def test_every_family_is_found(data, matched):
  found, _, _ = matched
  fam = data["family"]
  by = {f: found[fam == f].mean() for f in np.unique(fam)}
  assert set(by) == set(webcopy.FAMILIES) | {"combo"}
  # 24 images a family: the benchmark's figures (docs/webdataset.md) are the measurement;
  # here each family must be found mostly, and all of them together at the benchmark's level
  assert min(by.values()) >= 0.6, by
  assert found.mean() >= 0.88, by


def test_look_alikes_are_not_copies(matched):
  _, fp, _ = matched
  assert fp.mean() <= 0.01, fp.sum()


def test_what_the_old_method_missed_is_found(data, matched):
  """The overlay, band, padding, crop and geometry families the correlation method
  (ThumbIndex) missed are found: the new paths are what finds them."""
  found, _, _ = matched
  fam = data["family"]
  old = neardup.ThumbIndex(data["ev"]).match(data["copies"])
  old_found = (old.similarity >= neardup.DEFAULT_THRESHOLD) & (old.index == data["source"])
  for f in ("caption", "letterbox", "pad_square", "rotate", "perspective"):
    sel = fam == f
    assert found[sel].mean() >= old_found[sel].mean() + 0.5, (f, found[sel].mean())


def test_pairs_within_a_set(data):
  rng = np.random.default_rng(0)
  ev = data["ev"][:10]
  extra = [webcopy.web_copy(ev[2], "crop", rng), webcopy.web_copy(ev[5], "caption", rng)]
  pairs = neardup.near_duplicate_pairs(ev + extra)
  got = {tuple(p) for p in pairs.tolist()}
  assert (2, 10) in got and (5, 11) in got, got
  assert all(j >= 10 for _, j in got), got  # the distinct tiles are not paired


def test_blocks_searched_in_any_order_merge_to_the_same(data):
  """The stage's search is a function of one block plus a merge (any executor)."""
  from bssl.stages import eval_copies

  ev = data["ev"][:12]
  indexes = [(0, np.arange(100, 112), neardup.Index(ev))]
  rng = np.random.default_rng(1)
  u = [
      (i, webcopy.web_copy(ev[i % 12], "crop", rng) if i % 3 == 0 else planted.scene(i, 128))
      for i in range(30)
  ]
  blocks = [u[a : a + 7] for a in range(0, 30, 7)]
  one = eval_copies.merge(eval_copies.search_block(indexes, b) for b in blocks)
  other = eval_copies.merge(eval_copies.search_block(indexes, b) for b in blocks[::-1])
  for k in one:
    np.testing.assert_array_equal(one[k], other[k])
  copies = set(range(0, 30, 3))
  assert set(one["id"].tolist()) <= copies and len(one["id"]) >= 8, one["id"]
  assert (one["match"] == 100 + one["id"] % 12).all()
