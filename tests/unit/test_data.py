"""The input pipelines: epochs are permutations, every image is a pad-crop-flip of its
source, processes split global batches exactly, the stream restarts at any global batch
(``start_batch``, what a resumed training run uses) on any process count, the iterator
resumes at the same position, an undecodable labelled image stops training with its id,
and evaluation / scoring ranges see every record once."""

import numpy as np
import pytest

from bssl.data import pipelines, sources
from bssl.data.sources import BadImageError

N, S = 37, 6  # an odd source size: batches straddle epochs


class _Source:

  def __init__(self, n=N, bad=()):
    self.x = np.random.default_rng(0).integers(0, 256, (n, S, S, 1), dtype=np.uint8)
    self.bad = set(bad)

  def __len__(self):
    return len(self.x)

  def __getitem__(self, i):
    return {
        "image": self.x[i],
        "label": np.int32(i % 3),
        "id": np.int64(1000 + i),
        "valid": i not in self.bad,
    }


def _batches(n_batches, *, lbs=8, pi=0, pc=1, seed=3, spec=None, src=None):
  spec = spec or pipelines.ImageSpec(size=S, channels=1, pad=2)
  it = iter(
      pipelines.train_dataset(
          src or _Source(),
          spec,
          local_batch_size=lbs,
          seed=seed,
          process_index=pi,
          process_count=pc,
      )
  )
  return [next(it) for _ in range(n_batches)]


def _variants(img, pad):
  padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      crop = padded[dy : dy + S, dx : dx + S]
      yield crop
      yield crop[:, ::-1]


def test_each_epoch_is_a_permutation_and_seeds_differ():
  ids = np.concatenate([b["id"] for b in _batches(4 * N // 8 + 1)])
  for e in range(4):
    assert sorted(ids[e * N : (e + 1) * N] - 1000) == list(range(N))
  other = np.concatenate([b["id"] for b in _batches(5, seed=4)])
  assert not np.array_equal(other, ids[: len(other)])


def test_every_image_is_a_pad_crop_flip_of_its_source_with_varied_draws():
  src = _Source()
  seen = set()
  for b in _batches(12, src=src):
    assert b["image"].dtype == np.uint8 and b["image"].shape == (8, S, S, 1)
    for img, i, lab in zip(b["image"], b["id"], b["label"]):
      variants = list(_variants(src.x[i - 1000], 2))
      hits = [k for k, v in enumerate(variants) if np.array_equal(v, img)]
      assert hits, f"image {i} is not a pad-crop-flip of its source"
      seen.add(hits[0])
      assert lab == (i - 1000) % 3
  assert len(seen) > 20  # offsets and flips really vary (50 possible)
  plain = _batches(3, spec=pipelines.ImageSpec(size=S, channels=1, augment="none"), src=src)
  for b in plain:
    np.testing.assert_array_equal(b["image"], src.x[b["id"] - 1000])


@pytest.mark.parametrize("pc", [2, 4])
def test_processes_split_the_global_batch_exactly(pc):
  whole = _batches(10, lbs=8)
  parts = [_batches(10, lbs=8 // pc, pi=i, pc=pc) for i in range(pc)]
  for k, g in enumerate(whole):
    for key in ("image", "label", "id"):
      local = np.stack([parts[i][k][key] for i in range(pc)], axis=1)
      np.testing.assert_array_equal(local.reshape(g[key].shape), g[key])


@pytest.mark.parametrize("pc", [1, 2, 4])
def test_start_batch_restarts_at_that_global_batch_on_any_process_count(pc):
  """A run resumed at step k reads global batch k on, whatever the number of processes
  (no iterator state is checkpointed)."""
  whole = _batches(10, lbs=8)
  spec = pipelines.ImageSpec(size=S, channels=1, pad=2)
  for start in (1, 6):
    parts = []
    for i in range(pc):
      it = iter(
          pipelines.train_dataset(
              _Source(),
              spec,
              local_batch_size=8 // pc,
              seed=3,
              process_index=i,
              process_count=pc,
              start_batch=start,
          )
      )
      parts.append([next(it) for _ in range(10 - start)])
    for k, g in enumerate(whole[start:]):
      for key in ("image", "label", "id"):
        local = np.stack([parts[i][k][key] for i in range(pc)], axis=1)
        np.testing.assert_array_equal(
            local.reshape(g[key].shape), g[key], err_msg=f"{key} of batch {start + k}"
        )


def test_iterator_state_resumes_at_the_same_position():
  spec = pipelines.ImageSpec(size=S, channels=1, pad=2)
  ds = pipelines.train_dataset(_Source(), spec, local_batch_size=8, seed=3)
  it = iter(ds)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  it2 = iter(ds)
  it2.set_state(state)
  for e, got in zip(expected, (next(it2) for _ in range(5))):
    for key in e:
      np.testing.assert_array_equal(e[key], got[key])


def test_an_undecodable_labelled_image_stops_training_with_its_id():
  with pytest.raises(BadImageError, match="1005"):
    _batches(20, src=_Source(bad={5}))


@pytest.mark.parametrize("pc", [1, 2, 3])
def test_evaluation_sees_every_record_once_in_order_with_masked_padding(pc):
  src = _Source(bad={4})
  spec = pipelines.ImageSpec(size=S, channels=1, augment="none")
  per_process = [
      list(pipelines.eval_dataset(src, spec, local_batch_size=4, process_index=i, process_count=pc))
      for i in range(pc)
  ]
  nb = pipelines.num_eval_batches(N, 4 * pc)
  assert all(len(p) == nb for p in per_process)
  # Global batch b = the processes' slices side by side.
  ids = np.concatenate([np.concatenate([p[b]["id"] for p in per_process]) for b in range(nb)])
  mask = np.concatenate([np.concatenate([p[b]["mask"] for p in per_process]) for b in range(nb)])
  images = np.concatenate([np.concatenate([p[b]["image"] for p in per_process]) for b in range(nb)])
  assert len(ids) == nb * 4 * pc >= N
  np.testing.assert_array_equal(ids[:N], 1000 + np.arange(N))  # in order, each once
  assert np.all(ids[N:] == -1) and not mask[N:].any()  # padding
  assert not mask[4] and mask[:N].sum() == N - 1  # the undecodable one
  np.testing.assert_array_equal(images[:N][mask[:N]], src.x[mask[:N]])
  # Resuming at a batch gives the same later batches.
  later = list(
      pipelines.eval_dataset(
          src, spec, local_batch_size=4, process_index=pc - 1, process_count=pc, start_batch=nb - 2
      )
  )
  assert len(later) == 2
  for got, want in zip(later, per_process[pc - 1][nb - 2 :]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


class _VariableSizeSource:
  """Images of different sizes and channel counts, as an image folder gives them."""

  def __init__(self, n=13):
    rng = np.random.default_rng(1)
    self.x = [
        rng.integers(0, 256, (10 + 3 * i, 16 + i, 3 if i % 2 else 1), dtype=np.uint8)
        for i in range(n)
    ]

  def __len__(self):
    return len(self.x)

  def __getitem__(self, i):
    return {"image": self.x[i], "label": np.int32(i % 2), "id": np.int64(i)}


def test_random_resized_crop_path_gives_fixed_size_batches_split_exactly():
  spec = pipelines.ImageSpec(size=8, channels=3, augment="random_resized_crop_flip")
  src = _VariableSizeSource()

  def batches(lbs, pi, pc):
    it = iter(
        pipelines.train_dataset(
            src, spec, local_batch_size=lbs, seed=0, process_index=pi, process_count=pc
        )
    )
    return [next(it) for _ in range(4)]

  whole = batches(4, 0, 1)
  halves = [batches(2, i, 2) for i in range(2)]
  # Restarted at global batch 2 (a resumed run), on one process: the same batches.
  it = iter(pipelines.train_dataset(src, spec, local_batch_size=4, seed=0, start_batch=2))
  for g in whole[2:]:
    np.testing.assert_array_equal(next(it)["image"], g["image"])
  for k, g in enumerate(whole):
    assert g["image"].shape == (4, 8, 8, 3) and g["image"].dtype == np.uint8
    local = np.stack([halves[0][k]["image"], halves[1][k]["image"]], axis=1)
    np.testing.assert_array_equal(local.reshape(g["image"].shape), g["image"])
  ids = np.concatenate([b["id"] for b in whole])
  assert sorted(ids[:13]) == list(range(13))


def test_training_input_in_worker_processes_is_the_same_stream():
  """num_workers (grain mp_prefetch) decodes and augments in other processes: the batches
  must be the ones of the threads-only stream, in order, for both augmentation paths and
  from a resumed position."""
  rrc = pipelines.ImageSpec(size=8, channels=3, augment="random_resized_crop_flip")
  pcf = pipelines.ImageSpec(size=S, channels=1, augment="pad_crop_flip", pad=2)
  for spec, src in ((rrc, _VariableSizeSource()), (pcf, _Source())):
    for start in (3,):

      def batches(workers):
        it = iter(
            pipelines.train_dataset(
                src, spec, local_batch_size=4, seed=5, start_batch=start, num_workers=workers
            )
        )
        return [next(it) for _ in range(5)]

      want, got = batches(0), batches(2)
      for w, g in zip(want, got):
        for key in ("image", "label", "id"):
          np.testing.assert_array_equal(g[key], w[key])


def test_training_input_workers_outlive_a_sigterm_to_the_process_group():
  """Slurm's --signal and a VM's shutdown send SIGTERM to every process: the input's
  worker processes must keep making batches so the trainer can finish its step and save
  (a dead worker made the next batch a RuntimeError, so no checkpoint)."""
  import os
  import signal
  import time

  import psutil

  spec = pipelines.ImageSpec(size=S, channels=1, augment="pad_crop_flip", pad=2)
  earlier = {k.pid for k in psutil.Process().children(recursive=True)}  # other tests'
  it = iter(pipelines.train_dataset(_Source(), spec, local_batch_size=4, seed=1, num_workers=2))
  head = [next(it)["image"] for _ in range(2)]  # one batch from each worker: both started
  kids = [k for k in psutil.Process().children(recursive=True) if k.pid not in earlier]
  assert len(kids) >= 2
  names = {k.pid: " ".join(k.cmdline())[-120:] for k in kids}
  for k in kids:
    os.kill(k.pid, signal.SIGTERM)
  time.sleep(1.0)
  dead = [names[k.pid] for k in kids if not k.is_running() or k.status() == psutil.STATUS_ZOMBIE]
  assert not dead, dead
  got = head + [next(it)["image"] for _ in range(10)]  # past the buffers
  ref = iter(pipelines.train_dataset(_Source(), spec, local_batch_size=4, seed=1))
  for g in got:
    np.testing.assert_array_equal(g, next(ref)["image"])


def test_worker_count_minus_one_is_the_cores_but_one():
  import os

  cores = len(os.sched_getaffinity(0))
  assert pipelines.resolve_workers(-1) == max(0, cores - 1)
  assert pipelines.resolve_workers(3) == 3 and pipelines.resolve_workers(0) == 0
  assert pipelines.read_threads(8, 2) == 1 and pipelines.read_threads(8, 0) == 8


def test_range_batches_cover_a_range_once():
  np.testing.assert_array_equal(pipelines.range_batches(5, 23, 8), [[5, 13], [13, 21], [21, 23]])
  np.testing.assert_array_equal(pipelines.range_batches(0, 16, 8), [[0, 8], [8, 16]])
  assert pipelines.range_batches(7, 7, 8).shape == (0, 2)


def test_ranges_dataset_reads_exactly_the_given_ranges_with_masked_padding():
  src = _Source(bad={4, 20})
  spec = pipelines.ImageSpec(size=S, channels=1, augment="none")
  bounds = np.concatenate([pipelines.range_batches(0, 10, 4), pipelines.range_batches(18, 25, 4)])
  got = list(pipelines.ranges_dataset(src, spec, batch_size=4, bounds=bounds))
  assert len(got) == len(bounds) == 5
  for b, (first, stop) in zip(got, bounds):
    n = stop - first
    assert b["image"].shape == (4, S, S, 1) and b["image"].dtype == np.uint8
    np.testing.assert_array_equal(b["id"][:n], 1000 + np.arange(first, stop))
    assert np.all(b["id"][n:] == -1) and not b["mask"][n:].any() and not b["valid"][n:].any()
    for r, i in enumerate(range(first, stop)):
      ok = i not in src.bad
      assert b["mask"][r] == ok and b["valid"][r] == ok
      if ok:
        np.testing.assert_array_equal(b["image"][r], src.x[i])


@pytest.mark.parametrize("augment", ["pad_crop_flip", "none"])
def test_images_as_tall_as_the_model_input_but_wider_train_and_evaluate(tmp_path, augment):
  """28 x 40 images with image_size=28 (the height already fits): made square for training
  as for evaluation (training used to keep them 40 wide and stop on their shape)."""
  from PIL import Image

  from bssl.data import sources

  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (28, 40), dtype=np.uint8)).save(
          tmp_path / c / f"{i}.png"
      )
  src = sources.LabelledFolderSource(str(tmp_path), channels=1)
  assert src[0]["image"].shape == (28, 40, 1)
  spec = pipelines.ImageSpec(size=28, channels=1, augment=augment, pad=2)
  b = next(iter(pipelines.train_dataset(src, spec, local_batch_size=4, seed=0)))
  assert b["image"].shape == (4, 28, 28, 1) and b["image"].dtype == np.uint8
  ev = list(pipelines.eval_dataset(src, spec, local_batch_size=4))
  assert all(e["image"].shape == (4, 28, 28, 1) for e in ev)
  assert sum(int(e["mask"].sum()) for e in ev) == 6


def test_batched_rows_of_in_memory_sources_equal_the_per_record_path():
  """In-memory sources (ArraySource, SubsetView of one, U with excluded copies) give a
  scoring batch in one gather; it must be the per-record batch, bit for bit, hidden
  labels, renumbered ids, unreadable and excluded rows included."""
  from bssl.stages import eval_copies

  rng = np.random.default_rng(0)
  base = sources.ArraySource(
      rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 50)
  )
  view = sources.SubsetView(base, rng.permutation(50)[:37], hide_labels=True, reindex=True)
  marked = sources.SubsetView(base, np.arange(20), reindex=True)
  marked.unreadable[3] = "bad"
  excl = eval_copies.Excluding(view, {5: "copy", 30: "copy"})
  import pickle  # to decode worker processes (score.num_workers > 0)

  back = pickle.loads(pickle.dumps(excl))
  assert back.reasons == excl.reasons and not back[5]["valid"] and back.reason_of(5) == "copy"

  class PerRecord:  # the same records without ``take``

    def __init__(self, s):
      self.s = s

    def __len__(self):
      return len(self.s)

    def __getitem__(self, i):
      return self.s[i]

  spec = pipelines.ImageSpec(size=8, channels=1, augment="none")
  for src in (base, view, marked, excl):
    assert getattr(src, "take", None) is not None
    bounds = pipelines.range_batches(0, len(src), 16)
    fast = list(pipelines.ranges_dataset(src, spec, batch_size=16, bounds=bounds))
    slow = list(pipelines.ranges_dataset(PerRecord(src), spec, batch_size=16, bounds=bounds))
    for a, b in zip(fast, slow):
      for k in ("label", "id", "mask", "valid"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
      np.testing.assert_array_equal(a["image"][a["mask"]], b["image"][b["mask"]])
  assert not [
      b
      for b in pipelines.ranges_dataset(
          excl, spec, batch_size=64, bounds=pipelines.range_batches(0, 37, 64)
      )
  ][0]["valid"][[5, 30]].any()
