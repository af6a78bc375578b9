"""Scoring U: top-P on device, bad images skipped and listed, NaN logits stop the
stage, and scoring interrupted at any point resumes -- with another batch size and
another number of processes -- to exactly the selection of one uninterrupted pass.
Parts that miss or overlap ids, and parts that cannot be read, are clear errors."""

import os
import re
import zipfile  # noqa: F401

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bssl import parallel, scoring, selection, storage, train
from bssl.backends.jax import JaxScorer
from bssl.data import pipelines, sources
from bssl.models import create_model

SPEC = pipelines.ImageSpec(size=8, channels=1, augment="none")
C, P, K = 4, 2, 6
MEAN, STD = (100.0,), (60.0,)
N = 90


def _unlabelled(n=N):
  src = sources.fake_source(n, (8, 8, 1), C, seed=5)
  return sources.SubsetView(src, np.arange(len(src)), hide_labels=True, reindex=True)


@pytest.fixture(scope="module")
def setup():
  model = create_model("resnet_small", C, widths=(4,), depths=(1,))
  mesh = parallel.make_mesh()
  variables = jax.jit(
      lambda r: model.init(r, jnp.zeros((1, 8, 8, 1)), train=False),
      out_shardings=parallel.replicated(mesh),
  )(jax.random.key(1, impl="rbg"))
  return model, variables, _unlabelled(), mesh


def _jax_scorer(setup, variables=None):
  model, v, _, _ = setup
  return JaxScorer(model, v if variables is None else variables, P, MEAN, STD)


def _score(scorer, source, parts, *, lbs=16, chunk=32, pc=1, only=None, **kw):
  """One generation: plans the chunks left in ``parts`` and runs processes ``only`` (default
  all ``pc`` of them, one after the other, as separate processes would)."""
  gen, chunks = scoring.plan_chunks(parts, len(source), chunk)
  # one batch in flight unless asked: the simulated kills count dispatches
  kw.setdefault("in_flight", 1)
  outs = []
  for pi in (range(pc) if only is None else only):
    outs.append(
        scoring.score_process(
            scorer=scorer,
            source=source,
            spec=SPEC,
            parts_dir=parts,
            gen=gen,
            chunks=chunks,
            process_index=pi,
            process_count=pc,
            num_classes=C,
            k=K,
            p=P,
            local_batch_size=lbs,
            log=lambda m: None,
            **kw,
        )
    )
  return gen, chunks, outs


def _same_selection(got: selection.Selection, want: selection.Selection):
  assert len(want.ids) > 0
  for f in ("ids", "classes", "scores", "ranks"):
    np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)


def _top_k_by_class(ids, classes, scores, seed=0):
  """Brute force: per class, the K best (score descending, then smaller tie hash of the id;
  the hash itself is checked against a plain-Python reference in tests/unit/test_selection.py)."""
  rows = []
  for c in range(C):
    m = classes == c
    order = np.lexsort((selection.tie_hash(ids[m], seed), -scores[m].astype(np.float64)))[:K]
    rows += [(c, int(i), float(s)) for i, s in zip(ids[m][order], scores[m][order])]
  return rows


def _rows(sel):
  return list(zip(sel.classes.tolist(), sel.ids.tolist(), sel.scores.tolist()))


class Killed(Exception):
  """A simulated kill of the scoring process."""


class FakeScorer:
  """A deterministic numpy 'teacher': each image's top-P classes and scores are a function
  of its pixels alone (integer arithmetic, no reduction whose order could depend on the
  batch), so any batch size and any split of U must give bit-identical candidates.
  ``fail_after`` dispatches, it raises (a crash in the middle of a chunk)."""

  def __init__(self, fail_after=None):
    self.w = np.random.default_rng(0).integers(0, 1 << 20, (64, C), dtype=np.int64)
    self.fail_after = fail_after
    self.batch_sizes = []

  def rows(self, images):
    x = np.asarray(images, np.int64).reshape(len(images), -1)
    h = (x @ self.w) % 1_000_003
    s = (h.astype(np.float64) / 1_000_003).astype(np.float32)
    classes = np.argsort(-s, axis=1, kind="stable")[:, :P].astype(np.int32)
    return classes, np.take_along_axis(s, classes, 1), np.ones(len(images), bool)

  def dispatch(self, images):
    if self.fail_after is not None and len(self.batch_sizes) >= self.fail_after:
      raise Killed("simulated kill in the middle of scoring")
    self.batch_sizes.append(len(images))
    return self.rows(images)

  def fetch(self, out):
    return out


# ----------------------------------------------------------------------------- the real teacher


def _log_odds64(logits):
  """float64 log-odds ``z_c - logsumexp_{j != c} z_j`` of every class, [B, C]."""
  z = np.asarray(logits, np.float64)
  out = np.empty_like(z)
  for c in range(z.shape[1]):
    out[:, c] = z[:, c] - np.logaddexp.reduce(np.delete(z, c, axis=1), axis=1)
  return out


def _brute_force(setup):
  model, variables, unl, _ = setup
  images = np.stack([unl[i]["image"] for i in range(len(unl))])
  logits = model.apply(jax.device_get(variables), train.normalize(images, MEAN, STD), train=False)
  r = _log_odds64(logits)
  top = np.argsort(-r, axis=1, kind="stable")[:, :P]
  ids = np.repeat(np.arange(len(unl)), P)
  return [
      (c, i)
      for c, i, _ in _top_k_by_class(
          ids, top.reshape(-1), np.take_along_axis(r, top, 1).reshape(-1)
      )
  ]


def test_scoring_then_selection_matches_brute_force(setup, tmp_path):
  unl = setup[2]
  parts = tmp_path / "parts"
  _, chunks, outs = _score(_jax_scorer(setup), unl, parts, in_flight=3)
  assert [o["num_scored"] for o in outs] == [N]
  assert chunks == [(0, 32), (32, 64), (64, 90)]
  acc, merged = scoring.merge_parts(parts, N)
  assert merged["num_scored"] == N and merged["bad_ids"] == [] and merged["num_parts"] == 1
  got = [(c, i) for c, i, _ in _rows(acc.result())]
  # Same classes and sizes; ids equal except where float32 scores tie differently
  # between the device softmax and numpy (not expected on this data).
  assert got == _brute_force(setup)
  # One checkpoint per chunk, each replacing the previous: one npz per part remains.
  names = sorted(os.listdir(parts))
  assert names == ["g0001_p00000.json", "g0001_p00000.s000003.npz"], names
  # A complete scoring leaves nothing to do for a rerun.
  assert scoring.plan_chunks(parts, N, 32) == (2, [])


def test_interrupted_scoring_resumes_to_the_same_selection(setup, tmp_path):
  unl = setup[2]
  _score(_jax_scorer(setup), unl, tmp_path / "full")
  ref = scoring.merge_parts(tmp_path / "full", N)[0].result()

  part = tmp_path / "part"
  scorer = _jax_scorer(setup)
  real_dispatch, calls = scorer.dispatch, []

  def dispatch_then_die(images):
    if len(calls) == 3:  # batches 0, 1 done (chunk 0 saved), batch 2 in flight
      raise Killed("simulated kill")
    calls.append(1)
    return real_dispatch(images)

  scorer.dispatch = dispatch_then_die
  with pytest.raises(Killed):
    _score(scorer, unl, part)
  # Only the chunk whose every batch was folded in counts; nothing claims the rest.
  with pytest.raises(scoring.IncompleteScoringError, match=r"miss ids \[\(32, 90\)\]"):
    scoring.coverage(part, N)
  gen, chunks = scoring.plan_chunks(part, N, 32)
  assert (gen, chunks) == (2, [(32, 64), (64, 90)])

  _, _, outs = _score(_jax_scorer(setup), unl, part)
  assert outs[0]["num_scored"] == N - 32  # no image scored twice, none skipped
  acc, info = scoring.merge_parts(part, N)
  assert info["num_scored"] == N and info["num_parts"] == 2
  _same_selection(acc.result(), ref)


def test_bad_images_are_skipped_counted_and_listed(setup, tmp_path):
  folder = tmp_path / "u"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(20):
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
  (folder / "img05.png").write_bytes(b"\x89PNG broken")  # undecodable
  # another size is still an image (resized, as the issue asks), not a bad one
  Image.fromarray(rng.integers(0, 255, (5, 9), dtype=np.uint8)).save(folder / "img11.png")
  unl = sources.ImageFileSource(str(folder), channels=1)
  parts = tmp_path / "s"
  _, _, outs = _score(_jax_scorer(setup), unl, parts, chunk=16)
  assert outs[0]["num_scored"] == 19
  cov = scoring.coverage(parts, 20)
  assert cov["num_scored"] == 19 and cov["num_bad"] == 1
  acc, info = scoring.merge_parts(parts, 20)
  assert info["bad_ids"] == [5] and info["num_scored"] == 19
  sel = acc.result()
  assert len(sel.ids) and 5 not in set(sel.ids.tolist())
  assert unl.name_of(5).endswith("img05.png")
  assert unl.reason_of(5) == "not an image (Pillow cannot identify the format)"


def test_nan_logits_stop_with_the_image_ids(setup, tmp_path):
  model, variables, unl, mesh = setup
  bad = jax.device_get(variables)
  bad["params"]["fc"]["bias"] = np.full_like(bad["params"]["fc"]["bias"], np.nan)
  bad = jax.device_put(bad, parallel.replicated(mesh))
  parts = tmp_path / "parts"
  with pytest.raises(scoring.NonFiniteLogitsError, match=r"image ids \[0, 1, 2"):
    _score(_jax_scorer(setup, bad), unl, parts)
  # Nothing was recorded as scored.
  with pytest.raises(scoring.IncompleteScoringError, match="no scoring parts"):
    scoring.coverage(parts, N)


def test_accumulator_checkpoint_round_trip(tmp_path):
  acc = selection.TopKPerClass(3, 2)
  acc.update(np.arange(6), np.array([0, 1, 2, 0, 1, 2]), np.linspace(0, 1, 6, dtype=np.float32))
  storage.write_npz(tmp_path / "a.npz", **acc.state_dict())
  acc2 = selection.TopKPerClass.from_state_dict(storage.read_npz(tmp_path / "a.npz"))
  assert acc2.num_candidates_seen == 6
  r1, r2 = acc.result(), acc2.result()
  for f in ("ids", "classes", "scores", "ranks"):
    np.testing.assert_array_equal(getattr(r1, f), getattr(r2, f))


# ----------------------------------------------------------------------------- resume, exactly


def test_fake_scorer_full_pass_matches_brute_force(tmp_path):
  unl, fake = _unlabelled(), FakeScorer()
  _score(fake, unl, tmp_path / "p", lbs=16, chunk=32)
  images = np.stack([unl[i]["image"] for i in range(N)])
  classes, scores, _ = fake.rows(images)
  want = _top_k_by_class(np.repeat(np.arange(N), P), classes.reshape(-1), scores.reshape(-1))
  assert _rows(scoring.merge_parts(tmp_path / "p", N)[0].result()) == want


@pytest.mark.parametrize(
    "first,then",
    [
        # (process count, local batch, chunk, processes that run, dispatches before the kill)
        ((1, 8, 24, [0], 5), (2, 16, 40)),
        ((2, 16, 16, [0, 1], 2), (3, 8, 8)),  # process 1 is killed, process 0 completes
    ],
    ids=["1proc-b8-then-2proc-b16", "2proc-b16-then-3proc-b8"],
)
def test_interrupted_then_resharded_rerun_gives_the_single_pass_selection(tmp_path, first, then):
  unl = _unlabelled()
  _score(FakeScorer(), unl, tmp_path / "ref", lbs=16, chunk=32)
  ref = scoring.merge_parts(tmp_path / "ref", N)[0].result()

  parts = tmp_path / "parts"
  pc, lbs, chunk, procs, fail_after = first
  gen1, chunks1 = scoring.plan_chunks(parts, N, chunk)
  assert gen1 == 1
  for pi in procs:
    # the last process listed is killed after ``fail_after`` dispatches; others complete
    fake = FakeScorer(fail_after=fail_after if pi == procs[-1] else None)
    run = lambda: scoring.score_process(
        scorer=fake,
        source=unl,
        spec=SPEC,
        parts_dir=parts,
        gen=gen1,
        chunks=chunks1,
        process_index=pi,
        process_count=pc,
        num_classes=C,
        k=K,
        p=P,
        local_batch_size=lbs,
        log=lambda m: None,
    )
    if pi == procs[-1]:
      with pytest.raises(Killed):
        run()
    else:
      run()
  with pytest.raises(scoring.IncompleteScoringError, match="miss ids"):
    scoring.merge_parts(parts, N)
  gen2, chunks2 = scoring.plan_chunks(parts, N, then[2])
  done_before = N - sum(b - a for a, b in chunks2)
  assert gen2 == 2 and 0 < done_before < N

  # The new generation: another process count, another batch size, another chunk size.
  pc2, lbs2, _ = then
  fakes = [FakeScorer() for _ in range(pc2)]
  scored = []
  for pi in range(pc2):
    scored.append(
        scoring.score_process(
            scorer=fakes[pi],
            source=unl,
            spec=SPEC,
            parts_dir=parts,
            gen=gen2,
            chunks=chunks2,
            process_index=pi,
            process_count=pc2,
            num_classes=C,
            k=K,
            p=P,
            local_batch_size=lbs2,
            log=lambda m: None,
        )["num_scored"]
    )
  assert all(set(f.batch_sizes) == {lbs2} for f in fakes if f.batch_sizes)
  assert sum(bool(f.batch_sizes) for f in fakes) >= 2  # the work really was split
  assert sum(scored) == N - done_before  # only what was missing was scored
  acc, info = scoring.merge_parts(parts, N)
  assert info["num_scored"] == N and info["bad_ids"] == []
  _same_selection(acc.result(), ref)
  assert scoring.plan_chunks(parts, N, 7)[1] == []


# ----------------------------------------------------------------------------- damaged parts


def _complete_parts(tmp_path, pc=2):
  parts = tmp_path / "parts"
  _score(FakeScorer(), _unlabelled(), parts, lbs=8, chunk=16, pc=pc)
  scoring.merge_parts(parts, N)  # complete and consistent
  return parts


def test_a_missing_part_is_incomplete_scoring(tmp_path):
  parts = _complete_parts(tmp_path)
  os.unlink(parts / "g0001_p00001.json")
  for check in (scoring.coverage, scoring.merge_parts):
    with pytest.raises(scoring.IncompleteScoringError, match=r"miss ids \[\(16, 32\)"):
      check(parts, N)
  # ... and a rerun scores exactly what that part held.
  gen, chunks = scoring.plan_chunks(parts, N, 16)
  assert gen == 2 and chunks == [(16, 32), (48, 64), (80, 90)]


def test_overlapping_parts_are_incomplete_scoring(tmp_path):
  parts = _complete_parts(tmp_path)
  # A later generation that scored ids 40..56 again (e.g. files copied in by hand).
  scoring.score_process(
      scorer=FakeScorer(),
      source=_unlabelled(),
      spec=SPEC,
      parts_dir=parts,
      gen=2,
      chunks=[(40, 56)],
      process_index=0,
      process_count=1,
      num_classes=C,
      k=K,
      p=P,
      local_batch_size=8,
      log=lambda m: None,
  )
  for check in (scoring.coverage, scoring.merge_parts):
    with pytest.raises(
        scoring.IncompleteScoringError, match=r"overlap: ids \[\d+, \d+\] and \[40, 56\]"
    ):
      check(parts, N)


def test_parts_of_another_k_are_refused(tmp_path):
  parts = _complete_parts(tmp_path, pc=1)
  scoring.check_parts(parts, num_images=N, num_classes=C, k=K, p=P)
  with pytest.raises(scoring.IncompleteScoringError, match="was made for"):
    scoring.check_parts(parts, num_images=N, num_classes=C, k=K + 1, p=P)
  with pytest.raises(scoring.IncompleteScoringError, match="was made for.*'seed': 0"):
    scoring.check_parts(parts, num_images=N, num_classes=C, k=K, p=P, seed=1)


def test_parts_of_the_old_format_are_refused_on_resume_and_merge(tmp_path):
  """Parts written before the log-odds ranking (no "format" in their JSON: float32
  probabilities, ties by id) are refused with a message naming the folder to delete, both
  where a resumed score stage checks them and where select merges them, never mixed."""
  parts = _complete_parts(tmp_path, pc=2)
  scoring.check_parts(parts, num_images=N, num_classes=C, k=K, p=P)
  name = "g0001_p00001.json"
  meta = storage.read_json(parts / name)
  assert meta["format"] == scoring.PARTS_FORMAT == 2
  old = {key: v for key, v in meta.items() if key not in ("format", "seed")}
  storage.write_json(parts / name, old)
  for check in (
      lambda: scoring.check_parts(parts, num_images=N, num_classes=C, k=K, p=P),
      lambda: scoring.merge_parts(parts, N),
  ):
    with pytest.raises(
        scoring.IncompleteScoringError,
        match=rf"g1_p1 .* format 1, this version writes format 2.*ranked by "
        rf"the float32 probability.*delete {re.escape(str(tmp_path))} \(the "
        rf"score stage's folder\) to rescore",
    ):
      check()
  # a format this version does not know (a newer bssl's) is refused the same way
  storage.write_json(parts / name, dict(meta, format=3))
  with pytest.raises(scoring.IncompleteScoringError, match="format 3.*delete"):
    scoring.check_parts(parts, num_images=N, num_classes=C, k=K, p=P)


def _npz_of(parts, name="g0001_p00000.json"):
  return parts / storage.read_json(parts / name)["npz"]


def test_a_corrupt_part_npz_is_a_corrupt_artifact_naming_the_file(tmp_path):
  parts = _complete_parts(tmp_path)
  npz = _npz_of(parts)
  npz.write_bytes(os.urandom(64) + b"garbage, not an npz" * 8)
  with pytest.raises(storage.CorruptArtifactError, match=os.path.basename(npz)):
    scoring.merge_parts(parts, N)


def test_a_truncated_part_npz_is_a_corrupt_artifact_naming_the_file(tmp_path):
  parts = _complete_parts(tmp_path)
  npz = _npz_of(parts)
  data = npz.read_bytes()
  npz.write_bytes(data[: len(data) // 2])  # a kill mid-copy on a store without renames
  with pytest.raises(storage.CorruptArtifactError, match=os.path.basename(npz)):
    scoring.merge_parts(parts, N)


def test_a_corrupt_part_json_is_a_corrupt_artifact_naming_the_file(tmp_path):
  parts = _complete_parts(tmp_path)
  (parts / "g0001_p00001.json").write_bytes(b"{not json")
  with pytest.raises(storage.CorruptArtifactError, match="g0001_p00001.json"):
    scoring.coverage(parts, N)


def test_one_ranked_scoring_pass_serves_every_smaller_k_and_p_exactly(setup, tmp_path):
  """Scored once keeping a top-K per rank (score.max_k): the D̂ of (K/2, 1), (K, 1) and
  (K/2, P) derived from it equal the D̂ of runs scored directly at those K and P."""
  model, variables, unl, _ = setup
  parts = tmp_path / "ranked"
  gen, chunks = scoring.plan_chunks(parts, N, 32)
  for pi in range(2):  # two processes' parts, merged
    scoring.score_process(
        scorer=JaxScorer(model, variables, P, MEAN, STD),
        source=unl,
        spec=SPEC,
        parts_dir=parts,
        gen=gen,
        chunks=chunks,
        process_index=pi,
        process_count=2,
        num_classes=C,
        k=K,
        p=P,
        local_batch_size=16,
        ranked=True,
        log=lambda m: None,
    )
  scoring.check_parts(parts, num_images=N, num_classes=C, k=K, p=P, ranked=True)
  with pytest.raises(scoring.IncompleteScoringError, match="made for"):
    scoring.check_parts(parts, num_images=N, num_classes=C, k=K, p=P)  # not ranked
  acc, _ = scoring.merge_parts(parts, N)
  for k, p in ((K // 2, 1), (K, 1), (K // 2, P)):
    direct = tmp_path / f"direct_{k}_{p}"
    gen, chunks = scoring.plan_chunks(direct, N, 32)
    scoring.score_process(
        scorer=JaxScorer(model, variables, p, MEAN, STD),
        source=unl,
        spec=SPEC,
        parts_dir=direct,
        gen=gen,
        chunks=chunks,
        process_index=0,
        process_count=1,
        num_classes=C,
        k=k,
        p=p,
        local_batch_size=16,
        log=lambda m: None,
    )
    want = scoring.merge_parts(direct, N)[0].result()
    _same_selection(acc.result(k, p), want)
  with pytest.raises(ValueError, match="k and p must be"):
    acc.result(K + 1, 1)


def test_unbalanced_scoring_keeps_the_global_top_pairs_of_two_processes(setup, tmp_path):
  """select.balanced=False through the scorer: two processes' parts merge into the global
  top K x C pairs, equal to sorting every (image, class, score) the teacher gave."""
  model, variables, unl, _ = setup
  parts = tmp_path / "unbalanced"
  gen, chunks = scoring.plan_chunks(parts, N, 32)
  for pi in range(2):
    scoring.score_process(
        scorer=JaxScorer(model, variables, P, MEAN, STD),
        source=unl,
        spec=SPEC,
        parts_dir=parts,
        gen=gen,
        chunks=chunks,
        process_index=pi,
        process_count=2,
        num_classes=C,
        k=K,
        p=P,
        local_batch_size=16,
        balanced=False,
        log=lambda m: None,
    )
  with pytest.raises(scoring.IncompleteScoringError, match="made for"):
    scoring.check_parts(parts, num_images=N, num_classes=C, k=K, p=P)  # balanced
  acc, _ = scoring.merge_parts(parts, N)
  assert isinstance(acc, selection.GlobalTopK)
  everything = tmp_path / "all"  # per-class top-N of every rank keeps every pair
  gen, chunks = scoring.plan_chunks(everything, N, 32)
  scoring.score_process(
      scorer=JaxScorer(model, variables, P, MEAN, STD),
      source=unl,
      spec=SPEC,
      parts_dir=everything,
      gen=gen,
      chunks=chunks,
      process_index=0,
      process_count=1,
      num_classes=C,
      k=N,
      p=P,
      local_batch_size=16,
      log=lambda m: None,
  )
  full = scoring.merge_parts(everything, N)[0].result()
  assert len(full) == N * P
  best = sorted(zip(-full.scores.astype(np.float64), full.ids, full.classes))[: K * C]
  got = acc.result()
  assert sorted(zip(got.classes.tolist(), got.ids.tolist())) == sorted(
      (int(c), int(i)) for _, i, c in best
  )
  assert len(set(np.bincount(got.classes, minlength=C).tolist())) > 1  # not K per class
