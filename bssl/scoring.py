"""Scoring U with the teacher: a jitted step over the mesh turns images into the top-P
(class, score) pairs of each image on the device, and the host streams them into a
per-class top-K accumulator (:class:`bssl.selection.TopKPerClass`).

Each process scores its own disjoint shard of U and checkpoints (accumulator state,
next batch, bad-image list) every N batches, atomically, so a killed run resumes
without scoring an image twice into the result or skipping one.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bssl import parallel
from bssl.data import pipelines
from bssl.selection import TopKPerClass
from bssl.train import normalize


class NonFiniteLogitsError(FloatingPointError):
  """The teacher produced NaN/inf logits."""


def make_score_step(model, mesh, *, top_p: int, mean, std):
  """``score(variables, images uint8 [B,H,W,C]) -> (classes int32 [B,P], scores f32 [B,P],
  finite bool [B])``: softmax probabilities of the P best classes, computed on device."""

  def step(variables, images):
    logits = model.apply(variables, normalize(images, mean, std), train=False)
    logits = logits.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    scores, classes = jax.lax.top_k(probs, top_p)
    return classes.astype(jnp.int32), scores, finite

  out = parallel.batch_sharding(mesh)
  return jax.jit(step, out_shardings=(out, out, out))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in local batch order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, parts = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start in seen:  # replicated over another mesh axis
      continue
    seen.add(start)
    parts.append(np.asarray(s.data))
  return np.concatenate(parts, axis=0)


def _atomic_savez(path: str, **arrays) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _state_path(score_dir: str, process: int) -> str:
  return os.path.join(score_dir, f"process_{process}.state.npz")


def final_path(score_dir: str, process: int) -> str:
  return os.path.join(score_dir, f"process_{process}.final.npz")


def save_accumulator(path: str, acc: TopKPerClass, **extra) -> None:
  sd = {f"acc__{k}": v for k, v in acc.state_dict().items()}
  sd.update({k: np.asarray(v) for k, v in extra.items()})
  _atomic_savez(path, **sd)


def load_accumulator(path: str) -> tuple[TopKPerClass, dict]:
  with np.load(path, allow_pickle=False) as z:
    d = {k: z[k] for k in z.files}
  acc = TopKPerClass.from_state_dict({k[5:]: v for k, v in d.items() if k.startswith("acc__")})
  extra = {k: v for k, v in d.items() if not k.startswith("acc__")}
  return acc, extra


def score_shard(*, model, variables, source, spec: pipelines.ImageSpec, mesh, num_classes: int,
                top_p: int, k: int, mean, std, global_batch_size: int, score_dir: str,
                checkpoint_every: int = 50, num_threads: int = 1, log_every: int = 20,
                stop_after_batches: int | None = None) -> dict:
  """Scores this process's shard of ``source`` into a TopKPerClass; resumable.

  Returns stats (images scored, bad image ids). Writes ``process_<i>.final.npz``.
  ``stop_after_batches`` (tests) simulates a crash after that many batches.
  """
  os.makedirs(score_dir, exist_ok=True)
  pi, pc = jax.process_index(), jax.process_count()
  lbs = parallel.local_batch_size(global_batch_size, mesh)
  nb = pipelines.num_eval_batches(len(source), global_batch_size)
  state_path = _state_path(score_dir, pi)
  if os.path.exists(state_path):
    acc, extra = load_accumulator(state_path)
    start = int(extra["next_batch"])
    bad = [int(x) for x in extra["bad_ids"]]
    scored = int(extra["num_scored"])
    if acc.num_classes != num_classes or acc.k != k:
      raise ValueError(f"{state_path} was written with num_classes={acc.num_classes}, "
                       f"k={acc.k}; this run has num_classes={num_classes}, k={k}. Delete "
                       f"{score_dir} to rescore.")
  else:
    acc, start, bad, scored = TopKPerClass(num_classes, k), 0, [], 0
  step = make_score_step(model, mesh, top_p=top_p, mean=mean, std=std)
  ds = pipelines.eval_dataset(source, spec, local_batch_size=lbs, process_index=pi,
                              process_count=pc, start_batch=start, num_threads=num_threads)
  main = pi == 0
  if main:
    print(f"[score] {len(source)} images, {nb} batches of {global_batch_size}, "
          f"top-{top_p} classes, starting at batch {start}", flush=True)
  t0, b = time.time(), start
  done_here = 0

  def checkpoint():
    save_accumulator(state_path, acc, next_batch=b, bad_ids=np.asarray(bad, np.int64),
                     num_scored=scored)

  def consume(batch, out) -> bool:
    """Folds one scored batch into the accumulator; True when the test stop is reached."""
    nonlocal b, scored, done_here
    classes, scores, finite = (local_rows(x) for x in out)
    ids, mask = batch["id"], batch["mask"]
    invalid = (~batch["valid"]) & (ids >= 0)
    bad.extend(int(i) for i in ids[invalid])
    if np.any(mask & ~finite):
      bad_ids = ids[mask & ~finite][:20].tolist()
      raise NonFiniteLogitsError(f"[score] the teacher's logits are NaN/inf for image ids "
                                 f"{bad_ids}; the teacher checkpoint is likely diverged.")
    keep = mask.astype(bool)
    n = int(keep.sum())
    acc.update(np.repeat(ids[keep], top_p), classes[keep].reshape(-1),
               scores[keep].reshape(-1))
    scored += n
    b += 1
    done_here += 1
    if checkpoint_every and b % checkpoint_every == 0:
      checkpoint()
    if main and (b % log_every == 0 or b == nb):
      rate = done_here * global_batch_size / max(time.time() - t0, 1e-9)
      eta = (nb - b) * global_batch_size / max(rate, 1e-9)
      print(f"[score] batch {b}/{nb} ({100 * b / nb:.0f}%) {rate:.0f} img/s "
            f"eta {int(eta) // 60}m{int(eta) % 60:02d}s", flush=True)
    return stop_after_batches is not None and done_here >= stop_after_batches

  # One batch in flight: batch b+1 is sent and dispatched before batch b's results are
  # fetched, so the device works while the host folds results and reads images.
  in_flight = None
  for batch in ds:
    out = step(variables, parallel.global_batch_from_local(mesh, batch["image"]))
    if in_flight is not None and consume(*in_flight):
      checkpoint()
      return {"interrupted_at_batch": b}
    in_flight = (batch, out)
  if in_flight is not None and consume(*in_flight):
    checkpoint()
    return {"interrupted_at_batch": b}
  checkpoint()
  save_accumulator(final_path(score_dir, pi), acc, bad_ids=np.asarray(bad, np.int64),
                   num_scored=scored)
  return {"num_scored": scored, "bad_ids": bad, "seconds": time.time() - t0}


def merge_processes(score_dir: str, num_processes: int) -> tuple[TopKPerClass, dict]:
  """Exact merge of the per-process accumulators, one at a time (memory 2 x C x K)."""
  acc, bad, scored = None, [], 0
  for i in range(num_processes):
    path = final_path(score_dir, i)
    if not os.path.exists(path):
      raise FileNotFoundError(f"scoring output of process {i} is missing: {path}")
    a, extra = load_accumulator(path)
    bad.extend(int(x) for x in extra["bad_ids"])
    scored += int(extra["num_scored"])
    acc = a if acc is None else acc.merge(a)
  return acc, {"num_scored": scored, "bad_ids": sorted(bad)}
