"""Scoring U with the teacher into per-class top-K accumulators, resumable on any process
count and batch size.

Work is kept in **images, not batches**: U's ids ``[0, N)`` not yet covered are cut into
chunks of ``chunk_images``; process ``i`` of ``n`` scores chunks ``i, i+n, ...`` on its own
devices (scoring needs no collective) and, after each chunk, checkpoints its accumulator
together with the exact id ranges it covers. A rerun -- after ``kill -9``, with another
batch size or another number of processes -- is a new *generation*: it reads the ranges
every earlier part covers and scores only the rest. Merging every part gives exactly the
single-pass answer, since parts cover disjoint ids and selection is exact
(:class:`bssl.selection.TopKPerClass`).

Files, under the score stage's folder::

  parts/g<gen>_p<process>.json          {"seq", "ranges", "num_scored", "num_bad", ...}
  parts/g<gen>_p<process>.s<seq>.npz    the accumulator and bad ids after chunk ``seq``

The JSON is written after its npz and names it, so a part is always self-consistent
(a kill between the two leaves the previous, still present, npz in force). Its ``format``
(:data:`PARTS_FORMAT`) says what the accumulators rank by; parts of another format are
refused (:func:`check_parts`, :func:`merge_parts`), never mixed.

**What is ranked.** The scorer gives each image's top-P classes with the teacher's
*log-odds* of each, ``r_c = log p_c - log(1 - p_c) = z_c - logsumexp_{j != c} z_j``
computed stably from the logits ``z`` on the device (:mod:`bssl.ranking`), and the selection
ranks by it. It is monotone in the exact probability, so the ranking is the probability's, but
it does not saturate: the float32 softmax is exactly 1.0 once the top logit leads by about 17
(``log_softmax`` is exactly 0.0 there too), and on a confident teacher about half of U tied at
1.0, which the per-class top-K then broke by image id, i.e. by U's path order. Exact ties
left are broken by a seeded hash of the id (:func:`bssl.selection.tie_hash`, the config's
``seed``).
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Callable

import numpy as np

from bssl import prefetch, progress, storage
from bssl.data import pipelines
from bssl.selection import GlobalTopK, RankedTopK, TopKPerClass

_PART = re.compile(r"^g(\d+)_p(\d+)\.json$")

# What a part's accumulator ranks by, recorded in each part's JSON as "format":
#   1 (no "format" key): the float32 softmax probability, ties by the smaller image id;
#   2: the log-odds (bssl.ranking.top_log_odds), ties by tie_hash(id, seed) ("seed" recorded too).
PARTS_FORMAT = 2


class NonFiniteLogitsError(FloatingPointError):
  """The teacher produced NaN/inf logits."""


class IncompleteScoringError(RuntimeError):
  """The parts do not cover every image of U exactly once."""


def _parts(parts_dir) -> list[tuple[int, int, dict]]:
  out = []
  for name in storage.listdir(parts_dir):
    m = _PART.match(name)
    if m:
      out.append(
          (
              int(m.group(1)),
              int(m.group(2)),
              storage.read_json(storage.path(parts_dir) / name),
          )
      )
  return out


def _npz_name(gen: int, proc: int, seq: int) -> str:
  return f"g{gen:04d}_p{proc:05d}.s{seq:06d}.npz"


def _covered(parts) -> np.ndarray:
  r = [np.asarray(meta["ranges"], np.int64).reshape(-1, 2) for _, _, meta in parts]
  return np.concatenate(r) if r else np.zeros((0, 2), np.int64)


def _gaps(covered: np.ndarray, n: int) -> list[tuple[int, int]]:
  """The sub-ranges of [0, n) that ``covered`` [m, 2] misses."""
  gaps, pos = [], 0
  for a, b in covered[np.argsort(covered[:, 0], kind="stable")]:
    if a > pos:
      gaps.append((pos, int(a)))
    pos = max(pos, int(b))
  if pos < n:
    gaps.append((pos, n))
  return gaps


def plan_chunks(parts_dir, num_images: int, chunk_images: int) -> tuple[int, list]:
  """(next generation, chunks [(start, stop)] still to score, in id order)."""
  parts = _parts(parts_dir)
  gen = 1 + max((g for g, _, _ in parts), default=0)
  chunks = []
  for a, b in _gaps(_covered(parts), num_images):
    chunks += [(s, min(s + chunk_images, b)) for s in range(a, b, chunk_images)]
  return gen, chunks


def _accumulator_kind(ranked: bool, balanced: bool):
  """The top-K accumulator a scoring pass keeps, and its parts hold: the global top K x C
  (unbalanced), a per-class top-K per rank (ranked), or the plain per-class top-K."""
  if not balanced:
    return GlobalTopK
  return RankedTopK if ranked else TopKPerClass


def _check_format(parts_dir, g: int, i: int, meta: dict) -> None:
  """Refuses a part of another format than this version's (its scores rank differently)."""
  got = meta.get("format", 1)
  if got != PARTS_FORMAT:
    why = (
        " (format 1 ranked by the float32 probability, which saturates at 1.0, and broke "
        "ties by image id; format 2 ranks by the log-odds and breaks ties by a seeded hash "
        "of the id)"
        if got == 1
        else ""
    )
    stage_dir = storage.path(parts_dir).parent  # a done stage must go too, not its parts
    raise IncompleteScoringError(
        f"scoring part g{g}_p{i} in {parts_dir} has format {got}, this version writes format "
        f"{PARTS_FORMAT}{why}: the two cannot be mixed; delete {stage_dir} (the score stage's "
        f"folder) to rescore"
    )


def check_parts(
    parts_dir,
    *,
    num_images: int,
    num_classes: int,
    k: int,
    p: int,
    ranked: bool = False,
    balanced: bool = True,
    seed: int = 0,
) -> None:
  """Every part is of this version's format (:data:`PARTS_FORMAT`: what it ranks by) and was
  made for this U, K, P and tie seed (the engine's fingerprint guards the config; this
  catches parts of an older bssl, and files copied in by hand)."""
  absent = {"ranked": False, "balanced": True}  # parts older than these keys
  for g, i, meta in _parts(parts_dir):
    _check_format(parts_dir, g, i, meta)
    want = dict(
        num_images=num_images,
        num_classes=num_classes,
        k=k,
        p=p,
        ranked=ranked,
        balanced=balanced,
        seed=int(seed),
    )
    got = {key: meta.get(key, absent.get(key)) for key in want}
    if got != want:
      raise IncompleteScoringError(
          f"scoring part g{g}_p{i} in {parts_dir} was made for {got}, this run is {want}; "
          f"delete {parts_dir} to rescore"
      )


def score_process(
    *,
    scorer,
    source,
    spec: pipelines.ImageSpec,
    parts_dir,
    gen: int,
    chunks: list,
    process_index: int,
    process_count: int,
    num_classes: int,
    k: int,
    p: int,
    local_batch_size: int,
    num_threads: int = 1,
    num_workers: int = 0,
    in_flight: int = 2,
    ranked: bool = False,
    balanced: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
    log_every: int = 20,
) -> dict:
  """Scores this process's share (chunks ``process_index::process_count``) of ``chunks``
  with ``scorer`` (a :class:`bssl.backends.base.Scorer`), checkpointing after each chunk into
  part ``g<gen>_p<process_index>``.

  The parts overlap: grain reads and decodes batches ahead (``num_threads`` threads, or
  ``num_workers`` processes), each batch's host->device copy and step are dispatched
  asynchronously as soon as it is read, up to ``in_flight`` batches run ahead of the one
  whose results are being folded into the top-K on the host. ``ranked`` keeps a top-K per
  rank (:class:`bssl.selection.RankedTopK`): any smaller K and P is then derived exactly.
  ``balanced=False`` keeps the global top ``K x num_classes`` pairs instead
  (:class:`bssl.selection.GlobalTopK`, per rank as well). ``seed`` orders exact ties
  (:func:`bssl.selection.tie_hash`; the recipe passes the config's ``seed``)."""
  parts_dir = storage.path(parts_dir)
  mine = chunks[process_index::process_count]
  kind = _accumulator_kind(ranked, balanced)
  acc = (
      TopKPerClass(num_classes, k, seed=seed)
      if kind is TopKPerClass
      else kind(num_classes, k, p, seed=seed)
  )
  ranges, bad, scored, seq = [], [], 0, 0
  stem = f"g{gen:04d}_p{process_index:05d}"
  bounds, chunk_of = [], []
  for c, (a, b) in enumerate(mine):
    bb = pipelines.range_batches(a, b, local_batch_size)
    bounds.append(bb)
    chunk_of += [c] * len(bb)
  if not mine:
    return {"num_scored": 0, "seconds": 0.0}
  bounds = np.concatenate(bounds)
  left = [int(np.sum(np.asarray(chunk_of) == c)) for c in range(len(mine))]
  total_images = sum(b - a for a, b in mine)
  ds = pipelines.ranges_dataset(
      source,
      spec,
      batch_size=local_batch_size,
      bounds=bounds,
      num_threads=num_threads,
      num_workers=num_workers,
  )
  t0, done_images = time.time(), 0

  def checkpoint(chunk: int):
    nonlocal seq
    seq += 1
    ranges.append(list(mine[chunk]))
    storage.write_npz(
        parts_dir / _npz_name(gen, process_index, seq),
        bad_ids=np.asarray(bad, np.int64),
        **{f"acc__{key}": v for key, v in acc.state_dict().items()},
    )
    storage.write_json(
        parts_dir / f"{stem}.json",
        {
            "seq": seq,
            "npz": _npz_name(gen, process_index, seq),
            "ranges": ranges,
            "num_scored": scored,
            "num_bad": len(bad),
            "num_images": len(source),
            "num_classes": num_classes,
            "k": k,
            "p": p,
            "ranked": bool(ranked),
            "balanced": bool(balanced),
            "format": PARTS_FORMAT,
            "seed": int(seed),
        },
    )
    if seq > 1:
      old = parts_dir / _npz_name(gen, process_index, seq - 1)
      if old.exists():
        old.unlink()

  def consume(j: int, batch, out):
    nonlocal scored, done_images
    classes, scores, finite = scorer.fetch(out)
    ids, mask = batch["id"], batch["mask"].astype(bool)
    bad.extend(int(i) for i in ids[(~batch["valid"]) & (ids >= 0)])
    if np.any(mask & ~finite):
      raise NonFiniteLogitsError(
          f"[score] the teacher's logits are NaN/inf for image ids "
          f"{ids[mask & ~finite][:20].tolist()}; the teacher "
          f"checkpoint is likely diverged."
      )
    if kind is TopKPerClass:
      acc.update(np.repeat(ids[mask], p), classes[mask].reshape(-1), scores[mask].reshape(-1))
    else:
      acc.update_ranked(ids[mask], classes[mask], scores[mask])
    scored += int(mask.sum())
    done_images += int(bounds[j, 1] - bounds[j, 0])
    c = chunk_of[j]
    left[c] -= 1
    if left[c] == 0:
      checkpoint(c)
    if (j + 1) % log_every == 0 or j + 1 == len(bounds):
      elapsed = time.time() - t0
      rate = done_images / max(elapsed, 1e-9)
      log(
          f"{done_images}/{total_images} images of this process "
          f"({100 * done_images / total_images:.0f}%) {rate * process_count:.0f} img/s "
          f"(all processes, est.) eta {progress.eta(done_images, total_images, elapsed)}"
      )

  # A bounded queue of dispatched batches: the device works on the next ones while the
  # host folds the oldest one's results; the prefetch thread (bssl.prefetch, as training
  # and evaluation) reads batches from grain and starts their host->device copies
  # (the scorer's ``put``) ahead of the steps.
  put = getattr(scorer, "put", None)
  pending = collections.deque()
  with prefetch.Ahead(
      ds, lambda b: put(b["image"]) if put else b["image"], in_flight, name="bssl-score-feed"
  ) as fed:
    for j, (batch, placed) in enumerate(fed):
      pending.append((j, batch, scorer.dispatch(placed)))
      while len(pending) > max(1, in_flight):
        consume(*pending.popleft())
  while pending:
    consume(*pending.popleft())
  return {"num_scored": scored, "seconds": time.time() - t0}


def coverage(parts_dir, num_images: int, parts=None) -> dict:
  """Counts from the parts' JSON alone (cheap); raises unless they cover ``[0,
  num_images)`` exactly once, every image either scored or listed as bad. ``parts``:
  :func:`_parts` of the folder when already read."""
  parts = _parts(parts_dir) if parts is None else parts
  if not parts:
    raise IncompleteScoringError(f"no scoring parts in {parts_dir}")
  cov = _covered(parts)
  cov = cov[np.argsort(cov[:, 0], kind="stable")]
  overlap = np.flatnonzero(cov[1:, 0] < cov[:-1, 1])
  if len(overlap):
    a, b = cov[overlap[0]], cov[overlap[0] + 1]
    raise IncompleteScoringError(
        f"scoring parts in {parts_dir} overlap: ids {a.tolist()} "
        f"and {b.tolist()}; delete the folder to rescore"
    )
  gaps = _gaps(cov, num_images)
  if gaps:
    raise IncompleteScoringError(
        f"scoring parts in {parts_dir} miss ids {gaps[:5]} of "
        f"[0, {num_images}); rerun the score stage"
    )
  scored = sum(int(m["num_scored"]) for _, _, m in parts)
  bad = sum(int(m["num_bad"]) for _, _, m in parts)
  if scored + bad != num_images:
    raise IncompleteScoringError(
        f"scoring parts in {parts_dir} count {scored} scored + "
        f"{bad} bad images, expected {num_images}"
    )
  return {"num_scored": scored, "num_bad": bad, "num_parts": len(parts)}


def merge_parts(parts_dir, num_images: int) -> tuple[TopKPerClass | RankedTopK | GlobalTopK, dict]:
  """Exact merge of every part, after :func:`coverage` has checked them (and that every part
  is of this version's format)."""
  parts = _parts(parts_dir)
  for g, i, meta in parts:
    _check_format(parts_dir, g, i, meta)
  info = coverage(parts_dir, num_images, parts)
  acc, bad = None, []
  for _, _, meta in parts:
    d = storage.read_npz(storage.path(parts_dir) / meta["npz"])
    state = {k[5:]: v for k, v in d.items() if k.startswith("acc__")}
    a = _accumulator_kind(
        bool(meta.get("ranked", False)), bool(meta.get("balanced", True))
    ).from_state_dict(state)
    bad.extend(int(x) for x in d["bad_ids"])
    acc = a if acc is None else acc.merge(a)
  if len(bad) != info["num_bad"]:
    raise IncompleteScoringError(
        f"scoring parts in {parts_dir}: {len(bad)} bad ids stored, " f"{info['num_bad']} counted"
    )
  return acc, {
      "num_scored": info["num_scored"],
      "bad_ids": sorted(bad),
      "num_parts": info["num_parts"],
  }
