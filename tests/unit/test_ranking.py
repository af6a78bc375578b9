"""Scores that rank (issue #21, item 5): D̂ is ranked by the teacher's log-odds, computed
from the logits, not by its float32 probability, which is exactly 1.0 for about half the
images of a confident teacher; exact ties go to a seeded hash of the image id, not to the
smaller id (ids follow U's path order). Also: the per-class top-K with >= 131,072 classes.

The teachers here are lookup tables: the first two pixels of an image hold the row of a
logits table, so the scorer (JaxScorer, the backend's real top-P step) sees exactly the
logits a test chose, through the real scoring pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bssl import parallel, ranking, scoring, selection
from bssl.backends.jax import JaxScorer
from bssl.data import pipelines, sources

SPEC = pipelines.ImageSpec(size=8, channels=1, augment="none")
MEAN, STD = (0.0,), (1.0,)
# jitted: run eagerly, every jnp op is compiled on its own (seconds on a small CPU)
top_log_odds = jax.jit(ranking.top_log_odds, static_argnums=1)
video_top_log_odds = jax.jit(ranking.video_top_log_odds, static_argnums=1)
softmax = jax.jit(lambda z: jax.nn.softmax(z.astype(jnp.float32), axis=-1))


class _Lookup:
  """``apply(variables, x)``: row ``256 * x[0, 0] + x[0, 1]`` of ``variables['table']``."""

  def apply(self, variables, x, train=False):
    row = (x[:, 0, 0, 0] * 256 + x[:, 0, 1, 0]).astype(jnp.int32)
    return variables["table"][row]


def _table_teacher(logits: np.ndarray, p: int) -> JaxScorer:
  variables = jax.device_put(
      {"table": jnp.asarray(logits, jnp.float32)}, parallel.replicated(parallel.make_mesh())
  )
  return JaxScorer(_Lookup(), variables, p, MEAN, STD)


def _images(rows: np.ndarray) -> sources.ArraySource:
  """8x8 grey images whose first two pixels hold ``rows`` (< 65536)."""
  img = np.zeros((len(rows), 8, 8, 1), np.uint8)
  img[:, 0, 0, 0], img[:, 0, 1, 0] = rows // 256, rows % 256
  return sources.ArraySource(img)


def _score(scorer, source, parts, *, num_classes, k, p, seed=0, lbs=256, chunk=512, pc=1):
  """Every process of one generation, one after the other; the merged, published D̂."""
  gen, chunks = scoring.plan_chunks(parts, len(source), chunk)
  for pi in range(pc):
    scoring.score_process(
        scorer=scorer,
        source=source,
        spec=SPEC,
        parts_dir=parts,
        gen=gen,
        chunks=chunks,
        process_index=pi,
        process_count=pc,
        num_classes=num_classes,
        k=k,
        p=p,
        local_batch_size=lbs,
        seed=seed,
        log=lambda m: None,
    )
  acc, info = scoring.merge_parts(parts, len(source))
  assert info["num_scored"] == len(source)
  return selection.with_probabilities(acc.result())


def _log_odds64(z: np.ndarray) -> np.ndarray:
  """float64 reference: ``z_c - logsumexp_{j != c} z_j`` of every class, [B, C]."""
  z = np.asarray(z, np.float64)
  return np.stack(
      [z[:, c] - np.logaddexp.reduce(np.delete(z, c, axis=1), axis=1) for c in range(z.shape[1])],
      axis=1,
  )


# ----------------------------------------------------------------------------- saturation
def test_a_saturated_teacher_selects_no_bias_toward_small_ids(tmp_path):
  """Half the images have a top-logit margin of 25..60: their float32 softmax is exactly
  1.0. With K well below the saturated candidates of each class, D̂ must be a uniform draw
  among them (the largest margins, which do not follow the id); ranking by the probability
  and breaking ties by id took the smallest ids."""
  rng = np.random.default_rng(0)
  n, c, k = 2400, 3, 120
  label = rng.integers(0, c, n)
  sure = rng.random(n) < 0.5
  margin = np.where(sure, rng.uniform(25, 60, n), rng.uniform(0, 4, n))
  logits = rng.normal(0, 0.5, (n, c)).astype(np.float32)
  logits[np.arange(n), label] += margin.astype(np.float32)
  probs32 = np.asarray(softmax(logits))
  saturated = probs32[np.arange(n), label] == 1.0
  assert saturated.sum() > n // 3  # the premise: many exact 1.0 probabilities
  sel = _score(
      _table_teacher(logits, 1),
      _images(np.arange(n)),
      tmp_path / "parts",
      num_classes=c,
      k=k,
      p=1,
      seed=3,
  )
  assert len(sel) == k * c
  mean, var, got = 0.0, 0.0, []
  for cls in range(c):
    cand = np.flatnonzero(saturated & (label == cls)).astype(np.float64)
    ids = sel.ids[sel.classes == cls]
    assert len(cand) > 3 * k and set(ids.tolist()) <= set(cand.astype(int).tolist())
    assert np.all(sel.scores[sel.classes == cls] == 1.0)  # as probabilities, all tied...
    assert np.all(np.diff(sel.rank_scores[sel.classes == cls]) < 0)  # ...not as log-odds
    # a uniform draw of len(ids) out of cand without replacement: mean and variance of the sum
    m = len(ids)
    mean += m * cand.mean()
    var += m * cand.var() * (len(cand) - m) / (len(cand) - 1)
    got.append(ids)
  total = np.concatenate(got).astype(np.float64).sum()
  assert abs(total - mean) <= 3 * np.sqrt(var), (total / (k * c), mean / (k * c))


# ----------------------------------------------------------------------------- log-odds
def _agrees_with_float64(r32: np.ndarray, r64: np.ndarray, p64: np.ndarray, tol=1e-3):
  """Pairs that float64 tells apart (distinct probabilities, log-odds more than ``tol``
  apart) are ordered the same by ``r32``; returns how many pairs were compared."""
  d64 = r64[:, None] - r64[None, :]
  apart = (p64[:, None] != p64[None, :]) & (np.abs(d64) > tol)
  d32 = r32[:, None].astype(np.float64) - r32[None, :]
  bad = apart & (np.sign(d32) != np.sign(d64))
  assert not bad.any(), (np.argwhere(bad)[:5], r32[np.argwhere(bad)[:5]])
  return int(apart.sum())


def test_scorer_ranks_like_the_exact_probability_where_float32_saturates():
  """The scorer's scores of each class order its candidates as the float64 probability does
  (wherever float64 still tells two apart), on random logits of three scales, the largest
  far past float32 softmax saturation; the top-P classes are float64's top-P."""
  rng = np.random.default_rng(1)
  n, c, p = 912, 6, 3
  scale = np.repeat([1.0, 8.0, 30.0], n // 3)[:, None]
  logits = (rng.normal(0, 1, (n, c)) * scale).astype(np.float32)
  scorer = _table_teacher(logits, p)
  x = _images(np.arange(n)).images
  classes, scores, finite = scorer.fetch(scorer.dispatch(x))
  assert classes.dtype == np.int32 and scores.dtype == np.float32 and finite.all()
  r64 = _log_odds64(logits)
  with np.errstate(under="ignore"):
    p64 = np.exp(logits - np.logaddexp.reduce(logits.astype(np.float64), axis=1)[:, None])
  np.testing.assert_array_equal(classes, np.argsort(-r64, axis=1, kind="stable")[:, :p])
  np.testing.assert_allclose(scores, np.take_along_axis(r64, classes, 1), rtol=1e-5, atol=1e-4)
  compared = 0
  for cls in range(c):
    img, rank = np.nonzero(classes == cls)
    compared += _agrees_with_float64(scores[img, rank], r64[img, cls], p64[img, cls])
  assert compared > 10_000
  # the float32 probability cannot do this: it ties many pairs float64 tells apart
  assert (np.asarray(softmax(logits)) == 1.0).sum() > n // 10


def test_top_log_odds_edge_cases():
  f = top_log_odds
  # ties at the top, one class, huge and tiny margins, equal logits everywhere
  z = np.float32([[5, 5, 0, 0], [1e3, -1e3, 0, 1], [0, 0, 0, 0], [-50, 80, 79.5, -3]])
  classes, r, finite = (np.asarray(a) for a in f(z, 2))
  np.testing.assert_allclose(
      r, np.take_along_axis(_log_odds64(z), classes, 1), rtol=1e-6, atol=1e-6
  )
  assert finite.all() and np.isfinite(r).all()
  assert r[1, 0] > 900  # log-odds of a 1e3 margin, not a saturated 0
  _, r1, _ = f(np.float32([[3.0], [-2.0]]), 1)  # one class: certain
  assert np.all(np.asarray(r1) == np.inf)
  _, _, fin = f(np.float32([[0, np.nan], [0, np.inf], [0, 1]]), 1)
  np.testing.assert_array_equal(np.asarray(fin), [False, False, True])


def test_video_log_odds_of_the_averaged_softmax_in_log_space():
  """Videos: the log-odds of the clips' averaged softmax, computed in log space, equals the
  float64 one (including clips that saturate), and orders like it; clip_logits gives each
  clip's logits as the per-clip model does."""
  rng = np.random.default_rng(2)
  b, n, c, p = 64, 4, 5, 2
  scale = np.repeat([1.0, 40.0], b // 2)[:, None, None]
  z = (rng.normal(0, 1, (b, n, c)) * scale).astype(np.float32)
  z[:8, :, 0] += 60  # every clip of 8 videos sure of class 0
  classes, r, finite = (np.asarray(a) for a in video_top_log_odds(z, p))
  z64 = z.astype(np.float64)
  log_p = z64 - np.logaddexp.reduce(z64, axis=-1)[..., None]  # [B, N, C]
  log_pbar = np.logaddexp.reduce(log_p, axis=1) - np.log(n)
  log_1m = (
      np.stack([np.logaddexp.reduce(np.delete(z64, j, axis=-1), axis=-1) for j in range(c)], -1)
      - np.logaddexp.reduce(z64, axis=-1)[..., None]
  )
  r64 = log_pbar - (np.logaddexp.reduce(log_1m, axis=1) - np.log(n))
  # the p most probable classes (float32 ties those float64 sees 1e-10 apart: either one)
  chosen = np.take_along_axis(log_pbar, classes, 1)
  assert np.all(chosen >= np.sort(log_pbar, axis=1)[:, -p:][:, :1] - 1e-5)
  assert np.all(np.diff(chosen, axis=1) <= 1e-5)
  np.testing.assert_allclose(r, np.take_along_axis(r64, classes, 1), rtol=1e-5, atol=1e-4)
  assert finite.all() and np.all(r[:8, 0] > 50)  # saturated videos still apart
  pbar32 = np.asarray(softmax(z)).mean(axis=1)
  assert np.all(pbar32[:8, 0] == 1.0)
  # one clip: the image formula
  _, r_one, _ = video_top_log_odds(z[:, :1], p)
  np.testing.assert_allclose(
      np.asarray(r_one), np.asarray(top_log_odds(z[:, 0], p)[1]), rtol=1e-5, atol=1e-5
  )
  # clip_logits: the scan over clips gives each clip's logits
  w = rng.normal(0, 1, (3 * 4 * 4 * 1, c)).astype(np.float32)
  videos = rng.integers(0, 255, (2, 3, 3, 4, 4, 1)).astype(np.uint8)  # [B, N, T, H, W, C]

  def apply(x):
    return jnp.reshape(x.astype(jnp.float32), (x.shape[0], -1)) @ w / 100

  got = np.asarray(jax.jit(lambda v: ranking.clip_logits(apply, v))(videos))
  want = np.stack([np.asarray(apply(videos[:, i])) for i in range(3)], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_torch_scorer_gives_the_same_log_odds():
  torch = pytest.importorskip("torch")
  from bssl.backends import torch as torch_backend

  rng = np.random.default_rng(3)
  z = rng.normal(0, 1, (300, 7)) * np.repeat([1.0, 10.0, 40.0], 100)[:, None]
  z = z.astype(np.float32)
  z[0] = [5, 5, 0, 0, 0, 0, 0]
  jc, jr, jf = (np.asarray(a) for a in top_log_odds(z, 3))
  tc, tr, tf = (a.numpy() for a in torch_backend.top_log_odds(torch.from_numpy(z), 3))
  np.testing.assert_array_equal(tc[1:], jc[1:])  # row 0: a tie, either order
  np.testing.assert_allclose(tr, jr, rtol=1e-6, atol=1e-5)
  assert tf.all() and jf.all()


# ----------------------------------------------------------------------------- exact ties
def _brute_force(logits, ids, k, p, seed):
  """Per class, the k best of every image's top-p classes: float64 log-odds descending,
  then the smaller tie hash of the id (the scorer's float32 ties are exact here: equal rows
  of the table give bit-equal scores)."""
  r = _log_odds64(logits)
  top = np.argsort(-r, axis=1, kind="stable")[:, :p]
  out = []
  for cls in range(logits.shape[1]):
    img, _ = np.nonzero(top == cls)
    order = np.lexsort((selection.tie_hash(ids[img], seed), -r[img, cls]))[:k]
    out += [(cls, int(i)) for i in ids[img][order]]
  return out


def test_exact_ties_go_to_the_seeded_hash_whatever_the_batches_and_processes(tmp_path):
  """A teacher with 5 distinct logit rows: every score ties with hundreds of others. D̂ is
  the brute force (ties by tie_hash(id, seed)) for one process and batch 256 and for three
  processes and batch 24; another seed picks other images among the tied ones."""
  rng = np.random.default_rng(4)
  n, c, k, p = 1500, 4, 40, 2
  table = rng.normal(0, 3, (5, c)).astype(np.float32)
  table[0, 1] += 40  # a saturating row
  rows = rng.integers(0, 5, n)
  logits = table[rows]
  source = _images(rows)
  scorer = _table_teacher(table, p)
  ids = np.arange(n)
  sels = {}
  for seed, pc, lbs, chunk in ((7, 1, 256, 512), (7, 3, 24, 96), (8, 2, 64, 128)):
    sel = _score(
        scorer,
        source,
        tmp_path / f"{seed}_{pc}",
        num_classes=c,
        k=k,
        p=p,
        seed=seed,
        lbs=lbs,
        chunk=chunk,
        pc=pc,
    )
    assert list(zip(sel.classes.tolist(), sel.ids.tolist())) == _brute_force(
        logits, ids, k, p, seed
    )
    sels[seed, pc] = sel
  a, b = sels[7, 1], sels[7, 3]
  for name in ("ids", "classes", "scores", "rank_scores", "ranks"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert set(zip(a.classes, a.ids)) != set(zip(sels[8, 2].classes, sels[8, 2].ids))
  # the tied winners are spread over U, not its first ids
  assert a.ids.max() > n // 2


# ----------------------------------------------------------------------------- many classes
@pytest.mark.parametrize("num_classes", [131_072, 200_003])
def test_top_k_per_class_with_131072_classes_and_more(num_classes):
  """The grouping sort's values hold ``class << position_bits``; with 131,072 classes the
  bound ``num_classes << 15`` passed 32 bits and wrapped. Small K, few images: fast."""
  rng = np.random.default_rng(5)
  n, k = 3000, 2
  ids = rng.permutation(10 * n)[:n].astype(np.int64)
  classes = rng.integers(0, num_classes, n)
  classes[:40] = num_classes - 1  # the last classes, full and beyond
  classes[40:60] = num_classes - 2
  classes[60:70] = 0
  scores = rng.integers(0, 4, n).astype(np.float32)  # ties
  acc = selection.TopKPerClass(num_classes, k, pending_slots=3, seed=1)
  for part in np.array_split(np.arange(n), 5):
    acc.update(ids[part], classes[part], scores[part])
  sel = acc.result()
  want = []
  for cls in np.unique(classes):
    m = np.flatnonzero(classes == cls)
    order = np.lexsort((selection.tie_hash(ids[m], 1), -scores[m]))[:k]
    want += [(int(cls), int(i)) for i in ids[m][order]]
  assert list(zip(sel.classes.tolist(), sel.ids.tolist())) == want
