"""Tests of bssl.selection: exact streaming per-class top-K and the D̂ file format."""

import importlib.util
import json
import os

import numpy as np
import pytest

from bssl import selection
from bssl.selection import MAX_ID, Selection, TopKPerClass

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- helpers
def ref_tie_hash(i: int, seed: int) -> int:
  """The tie hash written out in plain Python integers (splitmix64 of the seed, lowbias32
  twice), independent of the numpy implementation."""
  m64, m32 = (1 << 64) - 1, (1 << 32) - 1
  z = (seed + 0x9E3779B97F4A7C15) & m64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
  z ^= z >> 31
  a, b = z & m32, z >> 32

  def mix(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m32
    x ^= x >> 15
    x = (x * 0x846CA68B) & m32
    return x ^ (x >> 16)

  return mix((mix(i ^ a) + b) & m32)


def brute_force(ids, classes, scores, num_classes, k, seed=0):
  """Reference: per class, sort all candidates by (-score, tie_hash(id, seed)) and keep the
  first k."""
  ids, classes, scores = (
      np.asarray(ids, np.int64),
      np.asarray(classes, np.int64),
      np.asarray(scores, np.float32),
  )
  out = {"ids": [], "classes": [], "scores": [], "ranks": []}
  for c in range(num_classes):
    m = classes == c
    rows = sorted(
        (-float(s), ref_tie_hash(i, seed), i) for s, i in zip(scores[m].tolist(), ids[m].tolist())
    )[:k]
    out["ids"] += [i for _, _, i in rows]
    out["scores"] += [-s for s, _, _ in rows]
    out["classes"] += [c] * len(rows)
    out["ranks"] += list(range(len(rows)))
  return out


def assert_matches(sel: Selection, ref: dict):
  assert sel.ids.dtype == np.int64 and sel.classes.dtype == np.int32
  assert sel.scores.dtype == np.float32 and sel.ranks.dtype == np.int32
  np.testing.assert_array_equal(sel.classes, ref["classes"])
  np.testing.assert_array_equal(sel.ids, ref["ids"])
  np.testing.assert_array_equal(sel.scores, np.asarray(ref["scores"], np.float32))
  np.testing.assert_array_equal(sel.ranks, ref["ranks"])


def assert_same(a: Selection, b: Selection):
  for name in ("ids", "classes", "scores", "ranks", "rank_scores"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
  assert (a.num_classes, a.k) == (b.num_classes, b.k)


def make_stream(rng, n_images, num_classes, p, num_distinct_scores=None, negative=False):
  """Each image gets p distinct classes; scores from few distinct values -> many ties."""
  p = min(p, num_classes)
  ids = rng.choice(10 * n_images + 10, size=n_images, replace=False).astype(np.int64)
  classes = np.argsort(rng.random((n_images, num_classes)), axis=1)[:, :p]
  if num_distinct_scores:
    scores = rng.integers(0, num_distinct_scores, (n_images, p)).astype(np.float32)
    scores /= num_distinct_scores
  else:
    scores = rng.random((n_images, p), dtype=np.float32)
  if negative:
    scores -= np.float32(0.5)
  return np.repeat(ids, p), classes.reshape(-1).astype(np.int32), scores.reshape(-1)


def feed(acc, ids, classes, scores, rng, max_batches=8):
  """Feeds the stream in a random order, split into random batches (some empty)."""
  perm = rng.permutation(len(ids))
  cuts = np.sort(rng.integers(0, len(ids) + 1, rng.integers(0, max_batches)))
  for part in np.split(perm, cuts):
    acc.update(ids[part], classes[part], scores[part])
  return acc


# ----------------------------------------------------------------------------- key encoding
def test_score_keys_are_strictly_decreasing_and_invertible():
  v = np.array(
      [
          -np.inf,
          -3e38,
          -2.5,
          -1e-30,
          -1e-45,
          0.0,
          1e-45,
          1e-38,
          1e-30,
          0.25,
          0.5,
          0.5000001,
          1.0,
          3e38,
          np.inf,
      ],
      np.float32,
  )
  d = selection._desc_bits(v)
  assert np.all(np.diff(d.astype(np.int64)) < 0)
  np.testing.assert_array_equal(selection._scores_from_desc(d), v)
  # -0.0 and +0.0 are the same score
  assert selection._desc_bits(np.float32([-0.0]))[0] == selection._desc_bits(np.float32([0.0]))[0]
  # keys: desc(score) in the high half, id in the low half; the in-place writer used by
  # update() and its non-negative fast path agree with the general formula
  ids = np.array([0, 5, MAX_ID, 7, 1, 2], np.int64)
  nn = np.float32([0.0, -0.0, 1e-45, 0.3, 1.0, np.inf])
  ref = selection._make_keys(ids, nn)
  np.testing.assert_array_equal(ref >> np.uint64(32), selection._desc_bits(nn))
  np.testing.assert_array_equal(ref & np.uint64(MAX_ID), ids.astype(np.uint64))
  np.testing.assert_array_equal(selection._make_keys(ids, nn, nonneg=True), ref)
  for nonneg, sc in ((True, nn), (False, nn), (False, v[:6])):
    keys = ids.astype(np.uint64)
    selection._set_score_halves(keys, sc, nonneg)
    np.testing.assert_array_equal(keys, selection._make_keys(ids, sc))
  out_ids, out_scores = np.empty(6, np.int64), np.empty(6, np.float32)
  selection._decode_keys(selection._make_keys(ids, v[:6]), out_ids, out_scores)
  np.testing.assert_array_equal(out_ids, ids)
  np.testing.assert_array_equal(out_scores, v[:6])


def _by_hash(ids, seed=0):
  """``ids`` in tie order: smaller tie hash first."""
  ids = list(ids)
  return sorted(ids, key=lambda i: ref_tie_hash(int(i), seed))


def test_tie_hash_is_a_seeded_bijection_matching_the_reference():
  ids = np.concatenate([np.arange(2000), [MAX_ID - 1, MAX_ID, 1 << 31, 12345678]])
  for seed in (0, 1, 2, -7, 2**40 + 3):
    h = selection.tie_hash(ids, seed)
    assert h.dtype == np.uint32
    assert h.tolist() == [ref_tie_hash(int(i), seed) for i in ids]
    np.testing.assert_array_equal(selection.untie_hash(h, seed), ids)
    assert len(np.unique(h)) == len(ids)
  # the order of ties follows neither the id nor another seed's order
  a, b = selection.tie_hash(np.arange(2000), 0), selection.tie_hash(np.arange(2000), 1)
  assert abs(np.corrcoef(np.arange(2000), a.astype(np.float64))[0, 1]) < 0.1
  assert abs(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1]) < 0.1


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_with_ties_random_batches_and_orders(seed):
  rng = np.random.default_rng(seed)
  num_classes = int(rng.integers(1, 9))
  k = int(rng.integers(1, 40))
  n = int(rng.integers(0, 300))
  p = int(rng.integers(1, 4))
  distinct = [2, 3, 7, None][seed % 4]
  ids, classes, scores = make_stream(rng, n, num_classes, p, distinct, negative=seed % 3 == 0)
  slots = [None, 1, 2, 5][seed % 4]  # tiny pending areas force many compactions
  tie_seed = [0, 1, -3, 10**12][seed % 4]
  acc = feed(
      TopKPerClass(num_classes, k, pending_slots=slots, seed=tie_seed), ids, classes, scores, rng
  )
  assert_matches(acc.result(), brute_force(ids, classes, scores, num_classes, k, tie_seed))
  assert acc.num_candidates_seen == len(ids)


@pytest.mark.parametrize("tie_seed", [0, 5])
def test_all_equal_scores_ranked_by_the_seeded_hash_of_the_id(tie_seed):
  rng = np.random.default_rng(0)
  ids = rng.permutation(1000).astype(np.int64)
  acc = TopKPerClass(2, 10, pending_slots=7, seed=tie_seed)
  for part in np.array_split(np.arange(1000), 13):
    acc.update(ids[part], ids[part] % 2, np.full(part.size, 0.5, np.float32))
  sel = acc.result()
  for c in (0, 1):
    np.testing.assert_array_equal(
        sel.ids[sel.classes == c], _by_hash(range(c, 1000, 2), tie_seed)[:10]
    )
  # not the smallest ids (the old rule, which made D̂ the alphabetically first files)
  assert sel.ids.max() > 100


def test_negative_zero_ties_with_zero_and_infinities():
  ids = np.array([5, 3, 4, 1, 2, 0], np.int64)
  scores = np.array([0.0, -0.0, np.inf, -np.inf, 0.0, -np.inf], np.float32)
  acc = TopKPerClass(1, 4)
  acc.update(ids, np.zeros(6, np.int32), scores)
  sel = acc.result()
  np.testing.assert_array_equal(sel.ids, [4] + _by_hash([5, 3, 2]))  # inf, then 0.0/-0.0
  np.testing.assert_array_equal(sel.scores, [np.inf, 0, 0, 0])


def test_classes_short_of_k_and_k_larger_than_stream():
  rng = np.random.default_rng(1)
  ids, classes, scores = make_stream(rng, 50, 6, 2, 4)
  classes[classes == 5] = 4  # class 5 gets nothing
  acc = feed(TopKPerClass(6, 1000), ids, classes, scores, rng)
  sel = acc.result()
  assert_matches(sel, brute_force(ids, classes, scores, 6, 1000))
  assert len(sel) == len(ids)  # K larger than the stream: everything kept
  assert sel.counts()[5] == 0
  np.testing.assert_array_equal(sel.counts(), np.bincount(classes, minlength=6))


def test_large_batch_many_candidates_per_class_exact():
  # one batch brings far more candidates per class than the pending area holds
  rng = np.random.default_rng(2)
  n = 20000
  ids = rng.permutation(n).astype(np.int64)
  classes = rng.integers(0, 3, n).astype(np.int32)
  scores = (rng.integers(0, 50, n) / 50).astype(np.float32)
  acc = TopKPerClass(3, 100, pending_slots=64)
  acc.update(ids, classes, scores)
  assert_matches(acc.result(), brute_force(ids, classes, scores, 3, 100))


def test_threshold_filter_rejects_without_storing():
  # once a class is full, candidates that cannot enter (lower score, or equal score and larger
  # tie hash than the K-th) are dropped by the filter and never take a pending slot
  acc = TopKPerClass(1, 3, pending_slots=100)
  acc.update(np.arange(10), np.zeros(10), np.full(10, 0.5))
  acc._compact(np.ones(1, bool))
  best = _by_hash(range(10))[:3]
  assert int(acc._fill[0]) == 3 and acc._thresh_score[0] == 0.5
  assert acc._thresh_hash[0] == ref_tie_hash(best[2], 0)
  later = [i for i in range(20, 2000) if ref_tie_hash(i, 0) > acc._thresh_hash[0]][:2]
  acc.update(later + [40], [0, 0, 0], [0.5, 0.5, 0.4])  # ties that lose, and a lower score
  assert int(acc._fill[0]) == 3
  acc.update([25, later[0] + 5000, 11], [0, 0, 0], [0.6, 0.5, -1.0])
  assert int(acc._fill[0]) == 4 + (ref_tie_hash(later[0] + 5000, 0) < acc._thresh_hash[0])
  np.testing.assert_array_equal(
      acc.result().ids, [25] + _by_hash(list(range(10)) + [later[0] + 5000])[:2]
  )


def test_empty_accumulator_and_empty_updates():
  acc = TopKPerClass(3, 5)
  acc.update([], [], [])
  acc.update(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
  sel = acc.result()
  assert len(sel) == 0 and sel.ids.dtype == np.int64
  np.testing.assert_array_equal(sel.counts(), [0, 0, 0])
  assert acc.num_candidates_seen == 0


def test_array_likes_and_dtypes_are_cast():
  acc = TopKPerClass(3, 2)
  acc.update([4, 1, 2], np.array([0, 0, 2], np.uint8), [0.5, 0.5, 1.0])  # lists, float64
  acc.update(np.array([3], np.int32), [1], np.array([2], np.int16))
  sel = acc.result()
  np.testing.assert_array_equal(sel.ids, _by_hash([1, 4]) + [3, 2])
  np.testing.assert_array_equal(sel.classes, [0, 0, 1, 2])
  np.testing.assert_array_equal(sel.scores, [0.5, 0.5, 2.0, 1.0])


def test_same_image_under_several_classes():
  acc = TopKPerClass(3, 1)
  acc.update([7, 7, 7, 8], [0, 1, 2, 2], [0.9, 0.05, 0.05, 0.01])
  sel = acc.result()
  np.testing.assert_array_equal(sel.ids, [7, 7, 7])
  np.testing.assert_array_equal(sel.classes, [0, 1, 2])


def test_largest_id_is_accepted():
  acc = TopKPerClass(1, 2)
  acc.update([MAX_ID, 0], [0, 0], [1.0, 1.0])
  np.testing.assert_array_equal(acc.result().ids, _by_hash([0, MAX_ID]))


@pytest.mark.parametrize("seed", range(8))
def test_merge_of_partitions_equals_single_accumulator(seed):
  rng = np.random.default_rng(100 + seed)
  num_classes, k = int(rng.integers(1, 7)), int(rng.integers(1, 30))
  ids, classes, scores = make_stream(
      rng, int(rng.integers(0, 250)), num_classes, 3, [2, 5, None][seed % 3]
  )
  tie_seed = seed * 11 - 20
  single = feed(TopKPerClass(num_classes, k, seed=tie_seed), ids, classes, scores, rng).result()
  parts = int(rng.integers(2, 6))
  owner = rng.integers(0, parts, len(ids))
  accs = [
      feed(
          TopKPerClass(num_classes, k, pending_slots=[None, 3][seed % 2], seed=tie_seed),
          ids[owner == i],
          classes[owner == i],
          scores[owner == i],
          rng,
      )
      for i in range(parts)
  ]
  before = [a.result() for a in accs]
  merged = accs[0]
  for other in rng.permutation(accs[1:]) if parts > 2 else accs[1:]:
    assert merged.merge(other) is merged
  assert_same(merged.result(), single)
  assert_matches(single, brute_force(ids, classes, scores, num_classes, k, tie_seed))
  assert merged.num_candidates_seen == len(ids)
  for a, b in zip(accs[1:], before[1:]):  # the merged-in accumulators are unchanged
    assert_same(a.result(), b)
  # merging keeps working: more data after a merge still gives the exact answer
  more = make_stream(rng, 40, num_classes, 2, 3)
  more = (more[0] + 10**6, more[1], more[2])
  merged.update(*more)
  allc = [np.concatenate([a, b]) for a, b in zip((ids, classes, scores), more)]
  assert_matches(merged.result(), brute_force(*allc, num_classes, k, tie_seed))


def test_merge_tree_order_does_not_matter():
  rng = np.random.default_rng(7)
  ids, classes, scores = make_stream(rng, 400, 4, 2, 3)
  quarters = np.array_split(rng.permutation(len(ids)), 4)
  accs = [TopKPerClass(4, 25) for _ in range(4)]
  for a, q in zip(accs, quarters):
    a.update(ids[q], classes[q], scores[q])
  left = accs[0].merge(accs[1])
  right = accs[3].merge(accs[2])
  assert_matches(left.merge(right).result(), brute_force(ids, classes, scores, 4, 25))


def test_merge_rejects_mismatch_and_self():
  a = TopKPerClass(3, 5)
  with pytest.raises(ValueError, match="different shapes"):
    a.merge(TopKPerClass(4, 5))
  with pytest.raises(ValueError, match="different shapes"):
    a.merge(TopKPerClass(3, 6))
  with pytest.raises(ValueError, match="itself"):
    a.merge(a)
  with pytest.raises(ValueError, match="different tie seeds"):
    a.merge(TopKPerClass(3, 5, seed=1))


@pytest.mark.parametrize("through_npz", [False, True])
def test_state_dict_round_trip_mid_stream(tmp_path, through_npz):
  rng = np.random.default_rng(3)
  ids, classes, scores = make_stream(rng, 600, 5, 3, 6)
  cut = 900
  full = TopKPerClass(5, 40, seed=9)
  half = TopKPerClass(5, 40, seed=9)
  for lo in range(0, len(ids), 97):
    sl = slice(lo, lo + 97)
    full.update(ids[sl], classes[sl], scores[sl])
    if lo < cut:
      half.update(ids[sl], classes[sl], scores[sl])
  done = (len(range(0, cut, 97))) * 97
  sd = half.state_dict()
  assert all(isinstance(v, np.ndarray) for v in sd.values())
  assert sd["ids"].size <= 5 * 40
  if through_npz:
    np.savez(tmp_path / "s.npz", **sd)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
      sd = {key: z[key] for key in z.files}
  restored = TopKPerClass.from_state_dict(sd)
  assert (restored.num_classes, restored.k, restored.seed) == (5, 40, 9)
  assert restored.num_candidates_seen == done
  assert_same(restored.result(), half.result())
  for lo in range(done, len(ids), 97):
    restored.update(ids[lo : lo + 97], classes[lo : lo + 97], scores[lo : lo + 97])
  assert_same(restored.result(), full.result())
  assert restored.num_candidates_seen == full.num_candidates_seen == len(ids)
  assert_matches(full.result(), brute_force(ids, classes, scores, 5, 40, 9))


def test_state_dict_and_merge_with_uncompacted_and_short_classes():
  # class 0 has pending keys beyond K (not yet compacted), class 1 fewer than K, class 2 none
  acc = TopKPerClass(3, 5, pending_slots=10)
  ids = np.arange(14)
  classes = np.array([0] * 12 + [1] * 2)
  scores = np.linspace(0, 1, 14).astype(np.float32)
  acc.update(ids, classes, scores)
  assert int(acc._fill[0]) == 12
  ref = brute_force(ids, classes, scores, 3, 5)
  assert_matches(acc.result(), ref)
  assert_matches(TopKPerClass.from_state_dict(acc.state_dict()).result(), ref)
  assert_matches(TopKPerClass(3, 5).merge(acc).result(), ref)


def test_state_dict_rejects_bad_input():
  sd = TopKPerClass(2, 3).state_dict()
  with pytest.raises(ValueError, match="missing"):
    TopKPerClass.from_state_dict({k: v for k, v in sd.items() if k != "ids"})
  bad = dict(sd, ids=np.arange(4), classes=np.zeros(4, np.int32), scores=np.ones(4, np.float32))
  with pytest.raises(ValueError, match="more than k=3"):
    TopKPerClass.from_state_dict(bad)
  # a state of the old format (ties by id, no seed) is refused, never read as the new one
  old = {k: v for k, v in sd.items() if k != "tie_seed"}
  old["format_version"] = np.asarray(1, np.int64)
  with pytest.raises(ValueError, match="format_version 1.*cannot be mixed"):
    TopKPerClass.from_state_dict(old)


def test_result_mid_stream_does_not_change_the_answer():
  rng = np.random.default_rng(4)
  ids, classes, scores = make_stream(rng, 500, 4, 2, 5)
  a, b = TopKPerClass(4, 30, pending_slots=8), TopKPerClass(4, 30, pending_slots=8)
  for part in np.array_split(np.arange(len(ids)), 9):
    a.update(ids[part], classes[part], scores[part])
    b.update(ids[part], classes[part], scores[part])
    first, second = a.result(), a.result()
    assert_same(first, second)
  assert_same(a.result(), b.result())
  assert_matches(a.result(), brute_force(ids, classes, scores, 4, 30))


# ----------------------------------------------------------------------------- validation
def test_constructor_validation():
  with pytest.raises(ValueError, match="k must be positive, got 0"):
    TopKPerClass(10, 0)
  with pytest.raises(ValueError, match="num_classes must be positive, got 0"):
    TopKPerClass(0, 5)
  with pytest.raises(ValueError, match="num_classes must be positive, got -2"):
    TopKPerClass(-2, 5)


def test_update_validation_messages():
  acc = TopKPerClass(10, 5)
  with pytest.raises(ValueError, match=r"equal lengths, got 3, 2 and 3"):
    acc.update([1, 2, 3], [0, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match=r"class 10 out of range.*0\.\.9"):
    acc.update([1, 2], [3, 10], [0.1, 0.2])
  with pytest.raises(ValueError, match=r"class -1 out of range.*0\.\.9"):
    acc.update([1, 2], [-1, 0], [0.1, 0.2])
  with pytest.raises(ValueError, match=r"NaN score for id\(s\) \[7, 9\]"):
    acc.update([5, 7, 8, 9], [0, 1, 2, 3], [0.1, np.nan, 0.3, np.nan])
  with pytest.raises(ValueError, match=r"ids must be a 1-D array, got shape \(2, 2\)"):
    acc.update([[1, 2], [3, 4]], [0, 1, 2, 3], [0.1] * 4)
  with pytest.raises(ValueError, match=r"scores must be a 1-D array, got shape \(\)"):
    acc.update([1], [0], 0.5)
  with pytest.raises(ValueError, match=r"classes must be a 1-D array"):
    acc.update([1], [[0]], [0.5])
  with pytest.raises(ValueError, match=r"id -1 out of range"):
    acc.update([-1], [0], [0.5])
  with pytest.raises(ValueError, match=r"id 4294967296 out of range"):
    acc.update([MAX_ID + 1], [0], [0.5])
  with pytest.raises(ValueError, match=r"classes must be integers"):
    acc.update([1], [0.5], [0.5])
  # nothing was added by the failed updates
  assert acc.num_candidates_seen == 0 and len(acc.result()) == 0


# ----------------------------------------------------------------------------- D̂ on disk
def _some_selection(num_classes=5, k=20, seed=5):
  rng = np.random.default_rng(seed)
  ids, classes, scores = make_stream(rng, 60, num_classes, 2, 8)
  acc = TopKPerClass(num_classes, k)
  acc.update(ids, classes, scores)
  return acc.result()


def test_write_read_round_trip(tmp_path):
  sel = _some_selection()
  d = tmp_path / "select" / "dhat"
  selection.write_selection(d, sel, extra_summary={"p": 2, "k": 20, "note": "x"})
  assert sorted(os.listdir(d)) == [
      "class_stats.json",
      "classes.npy",
      "ids.npy",
      "rank_scores.npy",
      "ranks.npy",
      "scores.npy",
      "summary.json",
  ]
  back = selection.read_selection(d)
  assert isinstance(back.ids, np.memmap)
  assert_same(back, sel)
  np.testing.assert_array_equal(back.counts(), sel.counts())
  eager = selection.read_selection(d, mmap=False)
  assert not isinstance(eager.ids, np.memmap)
  assert_same(eager, sel)
  summary = json.loads((d / "summary.json").read_text())
  assert summary["num_classes"] == 5 and summary["k"] == 20
  assert summary["num_selected"] == len(sel) and summary["p"] == 2 and summary["note"] == "x"
  short = [int(c) for c in np.flatnonzero(sel.counts() < 20)]
  assert summary["classes_short_of_k"] == short
  stats = json.loads((d / "class_stats.json").read_text())
  assert stats == json.loads(json.dumps(selection.class_statistics(sel)))
  # the arrays are plain .npy files, memory-mappable by anyone
  np.testing.assert_array_equal(np.load(d / "ids.npy", mmap_mode="r"), sel.ids)
  # writing again replaces the old D̂
  sel2 = _some_selection(seed=6)
  selection.write_selection(d, sel2)
  assert_same(selection.read_selection(d), sel2)
  assert [n for n in os.listdir(d.parent)] == ["dhat"]  # no temporary or old dirs left


def test_extra_summary_conflict_is_refused(tmp_path):
  sel = _some_selection()
  with pytest.raises(ValueError, match="conflicts"):
    selection.write_selection(tmp_path / "d", sel, extra_summary={"num_selected": 1})
  assert not (tmp_path / "d").exists()


def _leftovers(d):
  """Temporary files of bssl.workdir's atomic writes left behind."""
  return [n for n in os.listdir(d) if ".tmp-" in n] if d.exists() else []


def test_interrupted_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
  sel = _some_selection()
  d = tmp_path / "dhat"
  calls = []
  real_save = np.save

  def failing_save(f, arr, *a, **kw):
    calls.append(1)
    if len(calls) == 3:
      raise OSError("disk full")
    return real_save(f, arr, *a, **kw)

  monkeypatch.setattr(np, "save", failing_save)
  with pytest.raises(OSError, match="disk full"):
    selection.write_selection(d, sel)
  assert not (d / "summary.json").exists() and _leftovers(d) == []
  with pytest.raises(FileNotFoundError, match="summary.json"):
    selection.read_selection(d)
  # An interrupted rewrite leaves no complete D̂ either: neither the old one (its summary
  # is removed first) nor old and new columns paired under a summary. (D̂ is now written
  # file by file, each atomically, so that it works on object storage; the old write into
  # a temporary directory renamed over the previous D̂ kept the previous one instead.)
  monkeypatch.setattr(np, "save", real_save)
  selection.write_selection(d, sel)
  assert_same(selection.read_selection(d), sel)
  calls.clear()
  monkeypatch.setattr(np, "save", failing_save)
  with pytest.raises(OSError):
    selection.write_selection(d, _some_selection(seed=9))
  assert _leftovers(d) == []
  with pytest.raises(FileNotFoundError, match="summary.json"):
    selection.read_selection(d)
  # ... and the next complete write is whole again.
  monkeypatch.setattr(np, "save", real_save)
  sel9 = _some_selection(seed=9)
  selection.write_selection(d, sel9)
  assert_same(selection.read_selection(d), sel9)


def test_failed_rename_leaves_no_temporary_file_and_nothing_complete(tmp_path, monkeypatch):
  sel = _some_selection()
  d = tmp_path / "dhat"
  selection.write_selection(d, sel)
  real_replace = os.replace

  def replace(src, dst):
    if ".tmp-" in os.path.basename(str(src)):
      raise OSError("rename failed")
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", replace)
  with pytest.raises(OSError, match="rename failed"):
    selection.write_selection(d, _some_selection(seed=8))
  monkeypatch.setattr(os, "replace", real_replace)
  assert _leftovers(d) == []
  with pytest.raises(FileNotFoundError, match="summary.json"):
    selection.read_selection(d)
  assert os.listdir(tmp_path) == ["dhat"]


@pytest.mark.parametrize("rewrite", [False, True])
def test_summary_is_written_last(tmp_path, monkeypatch, rewrite):
  # while the arrays and stats are being written, no summary.json exists (not even the
  # previous D̂'s, when one is replaced)
  from bssl import storage

  sel = _some_selection()
  d = tmp_path / "dhat"
  if rewrite:
    selection.write_selection(d, _some_selection(seed=4))
  seen = []
  real_write_bytes = storage.write_bytes

  def spy(path, data):
    parent = os.fspath(path.parent)
    seen.append((path.name, sorted(os.listdir(parent)) if os.path.exists(parent) else []))
    return real_write_bytes(path, data)

  monkeypatch.setattr(storage, "write_bytes", spy)
  selection.write_selection(d, sel)
  names = [name for name, _ in seen]
  assert names[-2:] == ["class_stats.json", "summary.json"]
  assert sorted(names[:-2]) == [
      "classes.npy",
      "ids.npy",
      "rank_scores.npy",
      "ranks.npy",
      "scores.npy",
  ]
  assert all("summary.json" not in listing for _, listing in seen)
  assert {
      "ids.npy",
      "classes.npy",
      "scores.npy",
      "ranks.npy",
      "rank_scores.npy",
      "class_stats.json",
  } <= set(seen[-1][1])
  assert_same(selection.read_selection(d), sel)


def test_probability_and_rank_scores_on_disk_and_an_old_dhat_still_reads(tmp_path):
  """The recipe's D̂ keeps the probability in scores.npy (for people) and the log-odds it
  was ranked by in rank_scores.npy; a D̂ written before rank_scores.npy existed reads with
  rank_scores = scores."""
  acc = TopKPerClass(2, 3)
  acc.update([0, 1, 2, 3], [0, 0, 1, 1], [30.0, 2.0, -1.0, 0.0])  # log-odds
  sel = selection.with_probabilities(acc.result())
  np.testing.assert_array_equal(sel.rank_scores, [30.0, 2.0, 0.0, -1.0])
  np.testing.assert_allclose(
      sel.scores, 1 / (1 + np.exp(-sel.rank_scores.astype(float))), rtol=1e-7
  )
  assert sel.scores[0] == 1.0  # saturated as a float32 probability, not as log-odds
  d = tmp_path / "dhat"
  selection.write_selection(d, sel)
  assert_same(selection.read_selection(d), sel)
  np.testing.assert_array_equal(np.load(d / "scores.npy"), sel.scores)
  # format_version 1: no rank_scores.npy, not listed in the summary's files
  os.unlink(d / "rank_scores.npy")
  summary = json.loads((d / "summary.json").read_text())
  del summary["files"]["rank_scores.npy"]
  summary["format_version"] = 1
  (d / "summary.json").write_text(json.dumps(summary))
  old = selection.read_selection(d)
  np.testing.assert_array_equal(old.rank_scores, sel.scores)
  np.testing.assert_array_equal(old.ids, sel.ids)


def test_read_rejects_truncated_column(tmp_path):
  sel = _some_selection()
  d = tmp_path / "dhat"
  selection.write_selection(d, sel)
  np.save(d / "scores.npy", sel.scores[:-1])
  with pytest.raises(ValueError, match="scores.npy"):
    selection.read_selection(d)


def test_class_statistics():
  sel = _some_selection(num_classes=6, k=12)
  st = selection.class_statistics(sel)
  counts = sel.counts()
  assert st["count"] == counts.tolist()
  assert st["classes_short_of_k"] == [int(c) for c in np.flatnonzero(counts < 12)]
  for c in range(6):
    s = sel.scores[sel.classes == c].astype(np.float64)
    if s.size:
      assert st["min_score"][c] == pytest.approx(s.min())
      assert st["max_score"][c] == pytest.approx(s.max())
      assert st["median_score"][c] == pytest.approx(np.median(s))
    else:
      assert st["min_score"][c] is None and st["median_score"][c] is None
  # rows in any order give the same statistics
  perm = np.random.default_rng(0).permutation(len(sel))
  shuffled = Selection(
      sel.ids[perm], sel.classes[perm], sel.scores[perm], sel.ranks[perm], sel.num_classes, sel.k
  )
  assert selection.class_statistics(shuffled) == st
  empty = selection.class_statistics(TopKPerClass(3, 2).result())
  assert empty["count"] == [0, 0, 0] and empty["classes_short_of_k"] == [0, 1, 2]


def test_selection_validates_columns():
  with pytest.raises(ValueError, match="equal lengths"):
    Selection(np.arange(3), np.zeros(2), np.zeros(3), np.zeros(3), 2, 1)
  with pytest.raises(ValueError, match="rank_scores=2"):
    Selection(np.arange(3), np.zeros(3), np.zeros(3), np.zeros(3), 2, 1, np.zeros(2))


# ----------------------------------------------------------------------------- benchmark
def test_benchmark_quick_runs(capsys):
  spec = importlib.util.spec_from_file_location(
      "bench_selection", os.path.join(_ROOT, "benchmarks", "selection.py")
  )
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = bench.main(["--quick", "--classes", "100", "--k", "500", "--batch", "20000"])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  printed = json.loads(last)
  for key in ("images_per_s", "naive_images_per_s", "peak_rss_mb_10m", "peak_rss_mb_30m"):
    assert isinstance(printed[key], float) and printed[key] > 0, key
  assert printed["images_per_s"] == out["images_per_s"]


def _global_brute_force(ids, classes, scores, ranks, n, p, seed):
  """The n best (id, class) pairs of ranks < p: score descending, then the tie hash of the
  id's low 32 bits, then id, then class."""
  rows = sorted(
      (-float(s), ref_tie_hash(int(i) & MAX_ID, seed), int(i), int(c))
      for i, c, s, r in zip(ids, classes, scores, ranks)
      if r < p
  )[:n]
  return [
      (c, -s, i) for c, s, _, i in sorted((c, s, h, i) for s, h, i, c in rows)
  ]  # by class, then selection order


@pytest.mark.parametrize("seed", range(6))
def test_unbalanced_global_top_matches_brute_force_with_ties_merges_and_smaller_k_p(seed):
  """select.balanced=False: the K x C globally best pairs (ties: smaller tie hash, then id,
  then class), fed in random batches into two accumulators that are merged and round-tripped
  through a state dict; every smaller (k, p) derived from it equals the brute force."""
  from bssl.selection import GlobalTopK

  rng = np.random.default_rng(seed)
  n_img, num_classes, p, k = 300, 4, 3, 25
  logits = rng.integers(0, 12, size=(n_img, num_classes)).astype(np.float32)  # many ties
  cls = np.argsort(-logits, axis=1, kind="stable")[:, :p]
  sc = np.take_along_axis(logits, cls, 1) / 5.0
  ids = rng.permutation(10 * n_img)[:n_img].astype(np.int64) + (1 << 33)  # > 32-bit ids
  tie_seed = seed - 2
  a, b = GlobalTopK(num_classes, k, p, seed=tie_seed), GlobalTopK(num_classes, k, p, seed=tie_seed)
  order = rng.permutation(n_img)
  for part in np.array_split(order, 7):
    (a if rng.random() < 0.5 else b).update_ranked(ids[part], cls[part], sc[part])
  acc = GlobalTopK.from_state_dict(a.merge(b).state_dict())
  flat = dict(
      ids=np.repeat(ids, p),
      classes=cls.reshape(-1),
      scores=sc.reshape(-1),
      ranks=np.tile(np.arange(p), n_img),
  )
  for kk, pp in ((k, p), (k // 2, 1), (k, 1), (3, 2)):
    sel = acc.result(kk, pp)
    want = _global_brute_force(**flat, n=kk * num_classes, p=pp, seed=tie_seed)
    got = [(int(c), float(s), int(i)) for c, s, i in zip(sel.classes, sel.scores, sel.ids)]
    assert got == want
    assert len(sel) == kk * num_classes
    for c in range(num_classes):  # ranks restart at 0 in every class, in order
      assert sel.ranks[sel.classes == c].tolist() == list(range(int((sel.classes == c).sum())))
  assert acc.num_candidates_seen == n_img * p
  with pytest.raises(ValueError, match="k and p must be"):
    acc.result(k + 1, 1)
  with pytest.raises(ValueError, match="seed"):
    acc.merge(GlobalTopK(num_classes, k, p, seed=tie_seed + 1))
