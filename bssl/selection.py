"""Exact streaming per-class top-K selection (recipe step 3) and the D̂ file format.

Every unlabelled image arrives with its teacher's top-P ``(class, score)`` pairs. For each
class we keep the K candidates with the highest score; equal scores are ordered by a seeded
hash of the image id (:func:`tie_hash`), not by the id itself: ids follow U's path order, so
ordering ties by id would fill a class's tied places with the alphabetically first files. The
answer is exact and does not depend on batch sizes, on the order of the updates, or on how the
stream was split among accumulators that are later merged.

The score the scoring pass feeds is the teacher's **log-odds** ``log p - log(1 - p)`` of the
class, computed from the logits (:func:`bssl.ranking.top_log_odds`), not the probability: a
float32 softmax is exactly 1.0 once the top logit leads by about 17, which made about half the
images of a confident teacher tie. The log-odds is monotone in the exact probability and does
not saturate; the D̂ on disk keeps both (see below).

Design (pure numpy, no per-candidate Python work, no jax):

* A candidate is encoded as one ``uint64`` *key*, ``desc(score) << 32 | tie_hash(id)``,
  where ``desc`` maps float32 to uint32 so that a larger score gives a smaller number (``-0.0``
  is treated as ``+0.0``) and ``tie_hash`` is a seeded *bijection* of 32-bit ids (so no two
  ids collide and the id decodes back from it). Ascending key order is exactly the selection
  order (score descending, then hash ascending), so the key is both the sort key and the
  payload: the class is implicit in where the key is stored, and id and score decode from it.
  This is why ids must lie in ``0 .. 2**32 - 1`` (row indices into U: up to 4.29 billion
  images).
* State: one dense ``[C, K + S]`` uint64 matrix. Row ``c`` holds the kept keys of class ``c``
  followed by up to ``S`` pending keys; free slots hold a sentinel (all ones, never a valid key:
  it would be a NaN score) that sorts after every real key. Memory is ``8 * C * (K + S)`` bytes
  whatever the stream length (default S = max(K // 2, 256): 192 MB for C = 1000, K = 16000),
  plus a fixed ~2 MB workspace.
* Per-class thresholds: once class ``c`` has K kept keys, its K-th best key gives
  ``thresh_score[c]`` and ``thresh_hash[c]`` (``-inf`` and 2**32 before). ``update`` rejects
  most candidates with one gather + compare (``score > thresh_score[class]``); candidates whose
  score equals the threshold's are kept only if their id's hash is smaller (the tie rule), so
  the filter is exact, not just a prefilter.
* ``update`` works in chunks of 32k candidates with preallocated scratch arrays (``out=``):
  the working set stays in cache and no temporary is allocated per chunk (fresh allocations of
  that size cost page faults that took a third of the time).
* Survivors are grouped by class with one value sort of ``class << b | position`` (a value
  sort is SIMD-accelerated in numpy, several times faster than ``argsort``; 64-bit values once
  ``b`` plus the class bits pass 32, e.g. from 131,072 classes on) and scattered into the
  pending slots of their rows.
* Compaction: when a row's pending slots would overflow, that row and every row whose pending
  area is at least half full are partitioned in place (``ndarray.partition(K - 1, axis=1)``,
  linear time, about 1.5 ns per key): the first K slots become the K best, slot K-1 the new
  threshold, the rest go back to sentinel.
* ``result()`` works on copies of blocks of rows (partition, then sort the first K of each
  row), so it can be called mid-stream. ``merge`` inserts the other accumulator's kept keys as
  pending keys and compacts (exact: the union's top K). ``state_dict`` holds only the kept set
  (ids, classes, scores) and the tie seed: O(C * K).

Not thread-safe: one accumulator per thread, then ``merge``.

Duplicates: the same ``(id, class)`` pair should not be fed twice (the pipeline scores each
image once, and an image's top-P classes are distinct). It is not deduplicated: a repeated pair
can occupy two slots of its class. An image id may legitimately appear under up to P classes.

D̂ on disk: a directory of ``ids.npy``, ``classes.npy``, ``scores.npy``, ``ranks.npy`` and
``rank_scores.npy`` (rows sorted by class then rank; readable with ``mmap_mode='r'`` for
streaming/random access), ``class_stats.json`` and ``summary.json`` (written last: a directory
without it is not a complete D̂). ``scores.npy`` is the score for people and reports: in the
recipe's D̂ the teacher's probability of the class (float32, so confident images show 1.0);
``rank_scores.npy`` is the score the selection ranked by: there the teacher's log-odds, which
orders every row exactly (``scores == sigmoid(rank_scores)``, :func:`with_probabilities`). A D̂
written before ``rank_scores.npy`` existed (format_version 1) reads with ``rank_scores`` equal
to ``scores``.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np

from bssl import storage

__all__ = [
    "Selection",
    "TopKPerClass",
    "RankedTopK",
    "GlobalTopK",
    "write_selection",
    "read_selection",
    "class_statistics",
    "tie_hash",
    "untie_hash",
    "with_probabilities",
    "MAX_ID",
    "candidates_per_class",
    "collapse_near_duplicates",
    "Collapsed",
    "family_roots",
    "global_order",
]

MAX_ID = (1 << 32) - 1  # largest accepted image id
_SENTINEL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # desc(score) == 0xFFFFFFFF only for NaN
_LOW32 = np.uint64(0xFFFF_FFFF)
# 2: keys order ties by tie_hash(id, seed) and state dicts carry the seed (1: ties by id).
# Also the D̂ summary's format_version (2: rank_scores.npy added).
_FORMAT_VERSION = 2
_LITTLE_ENDIAN = sys.byteorder == "little"
_CHUNK = 1 << 15  # candidates per internal step of update() (cache-sized pieces)
_BLOCK_ELEMS = 1 << 19  # keys per block when reading the state out (4 MB)
_DTYPES = {
    "ids": np.int64,
    "classes": np.int32,
    "scores": np.float32,
    "ranks": np.int32,
    "rank_scores": np.float32,
}


# ----------------------------------------------------------------------------- tie hash
_MASK64 = (1 << 64) - 1
_M1, _M2 = 0x7FEB352D, 0x846CA68B  # lowbias32 (C. Wellons' hash prospector)
_M1_INV, _M2_INV = pow(_M1, -1, 1 << 32), pow(_M2, -1, 1 << 32)


def _seed_words(seed: int) -> tuple[np.uint32, np.uint32]:
  """Two 32-bit words from ``seed`` (any Python int) by splitmix64, so that nearby seeds give
  unrelated orders."""
  z = (int(seed) + 0x9E3779B97F4A7C15) & _MASK64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
  z ^= z >> 31
  return np.uint32(z & 0xFFFF_FFFF), np.uint32(z >> 32)


def _mix32(x: np.ndarray) -> None:
  """In place on uint32: lowbias32, a bijection (xor-shifts and odd multipliers)."""
  x ^= x >> np.uint32(16)
  x *= np.uint32(_M1)
  x ^= x >> np.uint32(15)
  x *= np.uint32(_M2)
  x ^= x >> np.uint32(16)


def _unmix32(x: np.ndarray) -> None:
  """In place on uint32: the inverse of :func:`_mix32`."""
  x ^= x >> np.uint32(16)
  x *= np.uint32(_M2_INV)
  x ^= (x >> np.uint32(15)) ^ (x >> np.uint32(30))
  x *= np.uint32(_M1_INV)
  x ^= x >> np.uint32(16)


def tie_hash(ids, seed: int) -> np.ndarray:
  """uint32 ``[n]``: the seeded hash that orders equal scores (smaller hash first) for ids
  ``[n]`` in ``0..MAX_ID``. A bijection of 32-bit ids for every seed (xor with a seed word,
  lowbias32, add the other seed word, lowbias32), so ties are ordered totally and exactly, the
  id decodes back (:func:`untie_hash`), and which of tied images wins does not follow their
  id (U's path order) but is a fixed pseudo-random draw per seed."""
  a, b = _seed_words(seed)
  x = np.asarray(ids).astype(np.uint32)  # a copy, wrapped to 32 bits
  x ^= a
  _mix32(x)
  x += b
  _mix32(x)
  return x


def untie_hash(h, seed: int) -> np.ndarray:
  """int64 ids ``[n]`` of the uint32 hashes ``h`` ``[n]``: the inverse of :func:`tie_hash`."""
  a, b = _seed_words(seed)
  x = np.asarray(h).astype(np.uint32)
  _unmix32(x)
  x -= b
  _unmix32(x)
  x ^= a
  return x.astype(np.int64)


# ----------------------------------------------------------------------------- key encoding
def _desc_bits(scores: np.ndarray) -> np.ndarray:
  """float32 -> uint32, strictly decreasing in the score (-0.0 counts as +0.0)."""
  s = np.asarray(scores, np.float32) + np.float32(0.0)  # -0.0 + 0.0 == +0.0
  bits = s.view(np.uint32)
  # positive: flip the 31 low bits (larger value -> smaller code, codes < 2**31);
  # negative: keep the bits (more negative -> larger magnitude -> larger code, >= 2**31).
  flip = (~(bits.view(np.int32) >> 31)).view(np.uint32) & np.uint32(0x7FFF_FFFF)
  return bits ^ flip


def _scores_from_desc(desc: np.ndarray) -> np.ndarray:
  """Inverse of :func:`_desc_bits` (the transform is an involution)."""
  desc = np.asarray(desc, np.uint32)
  flip = (~(desc.view(np.int32) >> 31)).view(np.uint32) & np.uint32(0x7FFF_FFFF)
  return (desc ^ flip).view(np.float32)


def _make_keys(ids: np.ndarray, scores: np.ndarray, nonneg: bool = False) -> np.ndarray:
  """uint64 keys ``desc(score) << 32 | ids`` (``ids`` in 0..MAX_ID: the accumulator passes
  the ids' tie hashes).

  ``nonneg``: every score is >= 0 (or -0.0); then ``desc = ~bits & 0x7FFFFFFF``, computed
  in place in 64 bits (fewer passes over memory than the general formula).
  """
  if nonneg:
    keys = np.asarray(scores, np.float32).view(np.uint32).astype(np.uint64)
    np.invert(keys, out=keys)
    keys &= np.uint64(0x7FFF_FFFF)
  else:
    keys = _desc_bits(scores).astype(np.uint64)
  keys <<= np.uint64(32)
  keys |= np.asarray(ids, np.int64).view(np.uint64)
  return keys


def _decode_keys(keys: np.ndarray, ids_out: np.ndarray, scores_out: np.ndarray) -> None:
  """Writes the ids (int64) and scores (float32) of ``keys`` into arrays of the same shape.

  ``keys`` may be a strided view whose last axis is contiguous; nothing is allocated.
  """
  if _LITTLE_ENDIAN:  # read the 32-bit halves in place
    halves = keys.view(np.uint32)
    low, high = halves[..., 0::2], halves[..., 1::2]
  else:
    low, high = (keys & _LOW32).astype(np.uint32), (keys >> np.uint64(32)).astype(np.uint32)
  ids_out[...] = low
  # inverse of _desc_bits, computed in the output's own memory
  o = scores_out.view(np.int32)
  np.right_shift(high.view(np.int32), 31, out=o)
  np.invert(o, out=o)
  o &= np.int32(0x7FFF_FFFF)
  np.bitwise_xor(o.view(np.uint32), high, out=o.view(np.uint32))


def _set_score_halves(keys: np.ndarray, scores: np.ndarray, nonneg: bool) -> None:
  """In place: ``keys`` holds ids (< 2**32); sets their high 32 bits to ``desc(scores)``."""
  if _LITTLE_ENDIAN:
    high = keys.view(np.uint32)[1::2]
    if nonneg:
      np.invert(scores.view(np.uint32), out=high)
      high &= np.uint32(0x7FFF_FFFF)
    else:
      high[...] = _desc_bits(scores)
  else:
    keys |= _desc_bits(scores).astype(np.uint64) << np.uint64(32)


class _Workspace:
  """Preallocated scratch arrays for one chunk of candidates.

  The hot path writes its temporaries here (``out=``) instead of allocating: fresh
  allocations of this size cost page faults (kernel time) on every chunk, and reusing the same
  few MB keeps the working set in cache.
  """

  def __init__(self, n: int, num_classes: int):
    self.n = n
    self.pbits = max(1, (n - 1).bit_length())
    # ``bounds`` below holds ``num_classes << pbits`` itself, so the class bits must hold
    # num_classes (not just num_classes - 1): with 32-bit values, 131,072 classes wrapped
    # that bound to 0
    cbits = max(1, int(num_classes).bit_length())
    cdt = np.uint32 if self.pbits + cbits <= 32 else np.uint64
    self.cdt = cdt
    self.t = np.empty(n, np.float32)
    self.keep = np.empty(n, np.bool_)
    self.eq = np.empty(n, np.bool_)
    self.cls = np.empty(n, np.intp)  # the chunk's classes, as index type
    self.gcls = np.empty(n, np.intp)  # survivors' classes
    self.gsc = np.empty(n, np.float32)  # survivors' scores
    self.keys = np.empty(n, np.uint64)  # survivors' keys
    self.h32 = np.empty(n, np.uint32)  # survivors' tie hashes
    self.comp = np.empty(n, cdt)  # class << pbits | position, sorted to group
    self.order = np.empty(n, np.intp)
    self.skeys = np.empty(n, np.uint64)  # keys grouped by class
    self.iota = np.arange(n, dtype=cdt)
    self.iota_p = np.arange(n, dtype=np.intp)
    self.bounds = np.arange(num_classes + 1, dtype=cdt) << cdt(self.pbits)
    self.pmask = cdt((1 << self.pbits) - 1)


# ----------------------------------------------------------------------------- validation
def _as_int_array(x, name: str) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
  if a.size == 0:
    return a.astype(np.int64)
  if a.dtype.kind in "iu":
    return a
  if a.dtype.kind == "f":
    if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
      raise ValueError(f"{name} must be integers, got non-integral values of dtype {a.dtype}")
    return a.astype(np.int64)
  raise ValueError(f"{name} must be integers, got dtype {a.dtype}")


def _validate(ids, classes, scores, num_classes: int):
  ids = _as_int_array(ids, "ids")
  classes = _as_int_array(classes, "classes")
  scores = np.asarray(scores)
  if scores.ndim != 1:
    raise ValueError(f"scores must be a 1-D array, got shape {scores.shape}")
  if not (ids.shape[0] == classes.shape[0] == scores.shape[0]):
    raise ValueError(
        f"ids, classes and scores must have equal lengths, got "
        f"{ids.shape[0]}, {classes.shape[0]} and {scores.shape[0]}"
    )
  if scores.dtype.kind not in "fiub":
    raise ValueError(f"scores must be numbers, got dtype {scores.dtype}")
  scores = scores.astype(np.float32, copy=False)
  if ids.shape[0] == 0:
    return ids.astype(np.int64), classes.astype(np.int32), scores, True
  cmin, cmax = int(classes.min()), int(classes.max())
  if cmin < 0 or cmax >= num_classes:
    bad = cmin if cmin < 0 else cmax
    raise ValueError(f"class {bad} out of range: classes must be in 0..{num_classes - 1}")
  imin, imax = int(ids.min()), int(ids.max())
  if imin < 0 or imax > MAX_ID:
    bad = imin if imin < 0 else imax
    raise ValueError(f"id {bad} out of range: ids must be in 0..{MAX_ID} (row indices into U)")
  smin = scores.min()  # NaN propagates through min: one pass for both checks
  if np.isnan(smin):
    bad_ids = ids[np.isnan(scores)]
    raise ValueError(
        f"NaN score for id(s) {bad_ids[:10].tolist()}"
        + (f" and {bad_ids.size - 10} more" if bad_ids.size > 10 else "")
    )
  return (
      ids.astype(np.int64, copy=False),
      classes.astype(np.int32, copy=False),
      scores,
      bool(smin >= 0),
  )


# ----------------------------------------------------------------------------- result type
@dataclasses.dataclass(eq=False)
class Selection:
  """D̂ as columns: one row per (image, class) kept, sorted by class then rank.

  ``rank_scores`` is the score the rows were ranked by, ``scores`` the one shown to people;
  from an accumulator both are the scores it was fed (``rank_scores=None`` means that), in
  the recipe's D̂ the teacher's log-odds and probability (:func:`with_probabilities`)."""

  ids: np.ndarray  # int64
  classes: np.ndarray  # int32
  scores: np.ndarray  # float32
  ranks: np.ndarray  # int32, 0-based rank within its class
  num_classes: int
  k: int
  rank_scores: np.ndarray | None = None  # float32; None: the same as scores

  def __post_init__(self):
    if self.rank_scores is None:
      self.rank_scores = self.scores
    for name, dt in _DTYPES.items():
      a = np.asanyarray(getattr(self, name))
      if a.dtype != dt:
        a = a.astype(dt)
      if a.ndim != 1:
        raise ValueError(f"Selection.{name} must be 1-D, got shape {a.shape}")
      setattr(self, name, a)
    n = {len(getattr(self, name)) for name in _DTYPES}
    if len(n) != 1:
      raise ValueError(
          "Selection columns must have equal lengths, got "
          + ", ".join(f"{name}={len(getattr(self, name))}" for name in _DTYPES)
      )
    self.num_classes, self.k = int(self.num_classes), int(self.k)

  def __len__(self) -> int:
    return len(self.ids)

  def counts(self) -> np.ndarray:
    """Rows per class, shape ``[num_classes]``."""
    return np.bincount(np.asarray(self.classes), minlength=self.num_classes)[: self.num_classes]


def probabilities_from_log_odds(r) -> np.ndarray:
  """float32 ``p = 1 / (1 + exp(-r))`` of log-odds ``r`` (any shape), computed in float64:
  the probability whose log-odds ``log p - log(1 - p)`` is ``r``."""
  r = np.asarray(r, np.float64)
  with np.errstate(over="ignore"):
    return (1.0 / (1.0 + np.exp(-r))).astype(np.float32)


def with_probabilities(sel: Selection) -> Selection:
  """The recipe's D̂ from an accumulator fed the teacher's log-odds: ``rank_scores`` the
  log-odds the rows were ranked by, ``scores`` the probability (for people and reports)."""
  return dataclasses.replace(
      sel, scores=probabilities_from_log_odds(sel.rank_scores), rank_scores=sel.rank_scores
  )


def _empty_selection(num_classes: int, k: int) -> Selection:
  return Selection(
      np.zeros(0, np.int64),
      np.zeros(0, np.int32),
      np.zeros(0, np.float32),
      np.zeros(0, np.int32),
      num_classes,
      k,
  )


# ----------------------------------------------------------------------------- accumulator
class TopKPerClass:
  """Exact streaming per-class top-K (score descending, ties by smaller ``tie_hash(id,
  seed)``).

  ``pending_slots`` (keyword only) is the number of pending slots per class between
  compactions (default ``max(k // 2, 256)``; memory is ``8 * num_classes * (k +
  pending_slots)`` bytes). Fewer slots: less memory, more frequent compactions. ``seed``
  (keyword only): the tie hash's seed (the recipe passes the config's ``seed``); only
  accumulators of the same seed merge.
  """

  def __init__(self, num_classes: int, k: int, *, pending_slots: int | None = None, seed: int = 0):
    num_classes, k = int(num_classes), int(k)
    if num_classes <= 0:
      raise ValueError(f"num_classes must be positive, got {num_classes}")
    if num_classes > np.iinfo(np.int32).max:
      raise ValueError(f"num_classes must fit in int32, got {num_classes}")
    if k <= 0:
      raise ValueError(f"k must be positive, got {k}")
    slots = max(k // 2, 256) if pending_slots is None else int(pending_slots)
    if slots <= 0:
      raise ValueError(f"pending_slots must be positive, got {slots}")
    self.num_classes, self.k, self._slots = num_classes, k, slots
    self.seed = int(seed)
    self._seed_words = _seed_words(self.seed)
    self._width = k + slots
    self._buf = np.full((num_classes, self._width), _SENTINEL, np.uint64)
    self._fill = np.zeros(num_classes, np.int64)  # valid keys occupy [0, fill) of a row
    self._thresh_key = np.full(num_classes, _SENTINEL, np.uint64)
    self._thresh_score = np.full(num_classes, -np.inf, np.float32)
    self._thresh_hash = np.full(num_classes, MAX_ID + 1, np.int64)  # tie hash of the K-th
    self._seen = 0
    self._any_full = False  # some class has a threshold (else every candidate is kept)
    self._work = _Workspace(_CHUNK, num_classes)

  # -- public API --------------------------------------------------------------------------
  @property
  def num_candidates_seen(self) -> int:
    """Candidates passed to :meth:`update` (and merged in), accepted or not."""
    return self._seen

  def update(self, ids, classes, scores) -> None:
    """Adds candidates: 1-D ids (int64), classes (int32) and scores (float32) of equal length.

    Raises ValueError on mismatched lengths, non-1-D input, a class outside 0..C-1, an id
    outside 0..MAX_ID, or a NaN score. The same (id, class) pair must not be fed twice.
    """
    ids, classes, scores, nonneg = _validate(ids, classes, scores, self.num_classes)
    n = ids.shape[0]
    self._seen += n
    # work in pieces that stay in cache: the per-candidate passes below are memory bound
    for lo in range(0, n, _CHUNK):
      hi = min(n, lo + _CHUNK)
      self._update_chunk(ids[lo:hi], classes[lo:hi], scores[lo:hi], nonneg)

  def _update_chunk(self, ids, classes, scores, nonneg: bool) -> None:
    n = ids.shape[0]
    w = self._work
    cls = w.cls[:n]
    np.copyto(cls, classes)
    if self._any_full:
      # one gather + compare rejects most candidates; a score equal to the threshold's is
      # settled by the id's tie hash (the tie rule), which is rare and handled apart.
      t = np.take(self._thresh_score, cls, out=w.t[:n], mode="wrap")
      keep = np.greater(scores, t, out=w.keep[:n])
      if np.equal(scores, t, out=w.eq[:n]).any():
        tie = np.flatnonzero(w.eq[:n])
        keep[tie] = tie_hash(ids[tie], self.seed) < self._thresh_hash[cls[tie]]
      idx = np.flatnonzero(keep)
      m = idx.size
      if m == 0:
        return
      h = w.h32[:m]
      np.take(ids, idx, out=w.keys[:m].view(np.int64), mode="wrap")
      np.copyto(h, w.keys[:m], casting="unsafe")
      cls = np.take(cls, idx, out=w.gcls[:m], mode="wrap")
      scores = np.take(scores, idx, out=w.gsc[:m], mode="wrap")
    else:
      m = n
      h = w.h32[:m]
      np.copyto(h, ids, casting="unsafe")
    self._hash_in_place(h)
    keys = w.keys[:m]
    np.copyto(keys, h)
    _set_score_halves(keys, scores, nonneg)
    self._insert(keys, cls)

  def merge(self, other: TopKPerClass) -> TopKPerClass:
    """Adds ``other``'s candidates to this accumulator (in place; ``other`` is unchanged)."""
    if not isinstance(other, TopKPerClass):
      raise TypeError(f"can only merge a TopKPerClass, got {type(other).__name__}")
    if other is self:
      raise ValueError(
          "cannot merge an accumulator with itself (every candidate would count " "twice)"
      )
    if other.num_classes != self.num_classes or other.k != self.k:
      raise ValueError(
          f"cannot merge accumulators with different shapes: num_classes="
          f"{self.num_classes}, k={self.k} vs num_classes={other.num_classes}, "
          f"k={other.k}"
      )
    if other.seed != self.seed:
      raise ValueError(
          f"cannot merge accumulators with different tie seeds ({self.seed} vs "
          f"{other.seed}): their keys order ties differently"
      )
    for r0, r1, counts, blk in other._topk_blocks(sort=False):
      keys = blk[np.arange(blk.shape[1]) < counts[:, None]]
      if keys.size:
        self._insert(keys, np.repeat(np.arange(r0, r1, dtype=np.intp), counts))
    self._compact(self._fill >= self.k)
    self._seen += other._seen
    return self

  def result(self) -> Selection:
    """The selection so far, rows sorted by class then rank. Does not change the state."""
    ids, scores, counts = self._kept(sort=True)
    total = ids.shape[0]
    classes = np.repeat(np.arange(self.num_classes, dtype=np.int32), counts)
    if total and total == self.num_classes * self.k:  # every class full
      ranks = np.tile(np.arange(self.k, dtype=np.int32), self.num_classes)
    else:
      starts = np.cumsum(counts) - counts
      ranks = (np.arange(total, dtype=np.int64) - np.repeat(starts, counts)).astype(np.int32)
    return Selection(ids, classes, scores, ranks, self.num_classes, self.k)

  def state_dict(self) -> dict[str, np.ndarray]:
    """The kept set (at most K rows per class) as plain arrays, for checkpointing."""
    ids, scores, counts = self._kept(sort=False)
    return {
        "format_version": np.asarray(_FORMAT_VERSION, np.int64),
        "num_classes": np.asarray(self.num_classes, np.int64),
        "k": np.asarray(self.k, np.int64),
        "tie_seed": np.asarray(self.seed, np.int64),
        "num_candidates_seen": np.asarray(self._seen, np.int64),
        "ids": ids,
        "classes": np.repeat(np.arange(self.num_classes, dtype=np.int32), counts),
        "scores": scores,
    }

  @classmethod
  def from_state_dict(cls, d) -> TopKPerClass:
    if "format_version" in d and int(np.asarray(d["format_version"])) != _FORMAT_VERSION:
      version = int(np.asarray(d["format_version"]))
      raise ValueError(
          f"unsupported TopKPerClass state format_version {version} (this code "
          f"reads {_FORMAT_VERSION}; version 1 broke ties by the smaller id, "
          f"version 2 by a seeded hash of the id: they cannot be mixed)"
      )
    missing = {
        "format_version",
        "num_classes",
        "k",
        "tie_seed",
        "num_candidates_seen",
        "ids",
        "classes",
        "scores",
    } - set(d)
    if missing:
      raise ValueError(f"not a TopKPerClass state dict: missing {sorted(missing)}")
    acc = cls(
        int(np.asarray(d["num_classes"])),
        int(np.asarray(d["k"])),
        seed=int(np.asarray(d["tie_seed"])),
    )
    ids, classes, scores, nonneg = _validate(d["ids"], d["classes"], d["scores"], acc.num_classes)
    if ids.size:
      counts = np.bincount(classes, minlength=acc.num_classes)
      if counts.max() > acc.k:
        raise ValueError(
            f"corrupt state: class {int(counts.argmax())} has {int(counts.max())} "
            f"rows, more than k={acc.k}"
        )
      acc._insert(_make_keys(tie_hash(ids, acc.seed), scores, nonneg), classes)
      acc._compact(acc._fill >= acc.k)
    acc._seen = int(np.asarray(d["num_candidates_seen"]))
    return acc

  def __repr__(self) -> str:
    return (
        f"TopKPerClass(num_classes={self.num_classes}, k={self.k}, seed={self.seed}, "
        f"kept={int(np.minimum(self._fill, self.k).sum())}, seen={self._seen})"
    )

  # -- internals ---------------------------------------------------------------------------
  def _hash_in_place(self, h: np.ndarray) -> None:
    """``h`` (uint32 ids) becomes ``tie_hash(h, seed)`` without allocating a copy of it."""
    a, b = self._seed_words
    h ^= a
    _mix32(h)
    h += b
    _mix32(h)

  def _insert(self, keys: np.ndarray, classes: np.ndarray) -> None:
    """Appends keys to their classes' pending slots, compacting rows that would overflow.

    ``keys`` must not live in the workspace arrays used here (comp, order, skeys).
    """
    w = self._work
    if keys.shape[0] > w.n:
      for lo in range(0, keys.shape[0], w.n):
        self._insert(keys[lo : lo + w.n], classes[lo : lo + w.n])
      return
    C, K, S, W = self.num_classes, self.k, self._slots, self._width
    m = keys.shape[0]
    # group by class: one value sort of ``class << pbits | position``
    comp = w.comp[:m]
    np.copyto(comp, classes, casting="unsafe")
    comp <<= w.cdt(w.pbits)
    comp |= w.iota[:m]
    comp.sort()
    counts = np.diff(np.searchsorted(comp, w.bounds))
    if counts.max() > S:  # more than a row can take even after compaction
      h = m // 2
      self._insert(keys[:h], classes[:h])
      self._insert(keys[h:], classes[h:])
      return
    order = np.bitwise_and(comp, w.pmask, out=w.order[:m])
    skeys = np.take(keys, order, out=w.skeys[:m], mode="wrap")
    over = self._fill + counts > W
    if over.any():
      # compact the rows that would overflow, and with them every row whose pending area is
      # at least half full, so that one compaction serves many rows.
      self._compact(over | (self._fill >= K + (S + 1) // 2))
      cs = (comp >> w.cdt(w.pbits)).astype(np.intp)
      exact = skeys < self._thresh_key[cs]  # thresholds moved: drop what is now out
      if not exact.all():
        skeys, cs = skeys[exact], cs[exact]
        counts = np.bincount(cs, minlength=C)
        m = skeys.shape[0]
        if m == 0:
          return
    # slot of the j-th grouped key: row start + fill - (first j of its class) + j
    starts = np.cumsum(counts) - counts
    pos = np.repeat(np.arange(C, dtype=np.intp) * W + self._fill - starts, counts)
    pos += w.iota_p[:m]
    self._buf.reshape(-1)[pos] = skeys
    self._fill += counts

  def _compact(self, rows: np.ndarray) -> None:
    """Keeps the K best keys of each selected row with at least K keys; sets thresholds."""
    K = self.k
    r = np.flatnonzero(rows & (self._fill >= K))
    if r.size == 0:
      return
    width = int(self._fill[r].max())
    if r.size == self.num_classes:
      view = self._buf[:, :width]
      view.partition(K - 1, axis=1)  # in place, linear time per row
      kth = view[:, K - 1].copy()
      view[:, K:] = _SENTINEL
    else:
      sub = self._buf[r, :width]
      sub.partition(K - 1, axis=1)
      kth = sub[:, K - 1].copy()
      sub[:, K:] = _SENTINEL
      self._buf[r, :width] = sub
    self._fill[r] = K
    self._thresh_key[r] = kth
    self._thresh_score[r] = _scores_from_desc((kth >> np.uint64(32)).astype(np.uint32))
    self._thresh_hash[r] = (kth & _LOW32).astype(np.int64)
    self._any_full = True

  def _topk_blocks(self, sort: bool):
    """Yields ``(r0, r1, counts, blk)`` for blocks of classes ``r0 <= c < r1``.

    ``blk`` is a ``[r1 - r0, w]`` uint64 view, valid until the next step, whose row ``i``
    starts with the ``counts[i]`` kept keys of class ``r0 + i`` (best first when ``sort``)
    followed by sentinels. Works on a copy, one cache-sized block at a time.
    """
    K, C = self.k, self.num_classes
    rows_per_block = min(C, max(1, _BLOCK_ELEMS // self._width))
    scratch = np.empty((rows_per_block, self._width), np.uint64)
    for r0 in range(0, C, rows_per_block):
      r1 = min(C, r0 + rows_per_block)
      fill = self._fill[r0:r1]
      counts = np.minimum(fill, K)
      width = int(fill.max())
      blk = scratch[: r1 - r0, :width]
      np.copyto(blk, self._buf[r0:r1, :width])
      if width > K:  # rows with more than K keys: their K best first
        big = fill > K
        if big.all():
          blk.partition(K - 1, axis=1)
        else:
          sub = blk[big]
          sub.partition(K - 1, axis=1)
          blk[big] = sub
        blk = blk[:, :K]
      if sort:
        blk.sort(axis=1)  # sentinels sort last
      yield r0, r1, counts, blk

  def _kept(self, sort: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, scores, counts) of the kept set, class by class (ranked when ``sort``)."""
    counts = np.minimum(self._fill, self.k)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ids = np.empty(int(offsets[-1]), np.int64)
    scores = np.empty(int(offsets[-1]), np.float32)
    for r0, r1, cnt, blk in self._topk_blocks(sort):
      a, b = int(offsets[r0]), int(offsets[r1])
      if b - a == blk.size:  # full rows: decode the block in place
        rows, w = blk.shape
        _decode_keys(blk, ids[a:b].reshape(rows, w), scores[a:b].reshape(rows, w))
      elif b > a:
        _decode_keys(blk[np.arange(blk.shape[1]) < cnt[:, None]], ids[a:b], scores[a:b])
    ids[...] = untie_hash(ids, self.seed)  # the keys hold tie hashes: back to ids
    return ids, scores, counts


# ----------------------------------------------------------------------------- D̂ on disk
def class_statistics(sel: Selection) -> dict:
  """Per-class count and min/median/max score, and the classes with fewer than k rows."""
  C = sel.num_classes
  classes = np.asarray(sel.classes)
  scores = np.asarray(sel.scores)
  n = classes.shape[0]
  if n:
    in_order = bool(np.all(classes[1:] >= classes[:-1]))
    if in_order:
      same = classes[1:] == classes[:-1]
      in_order = not np.any(same & (scores[1:] > scores[:-1]))
    if not in_order:
      order = np.lexsort((-scores.astype(np.float64), classes))
      classes, scores = classes[order], scores[order]
  counts = np.bincount(classes, minlength=C)[:C] if n else np.zeros(C, np.int64)
  starts = np.cumsum(counts) - counts
  has = counts > 0
  st, ct = starts[has], counts[has]

  def per_class(values):
    out: list = [None] * C
    for c, v in zip(np.flatnonzero(has).tolist(), values.tolist()):
      out[c] = float(v)
    return out

  max_s = scores[st].astype(np.float64)
  min_s = scores[st + ct - 1].astype(np.float64)
  med = (scores[st + (ct - 1) // 2].astype(np.float64) + scores[st + ct // 2]) / 2.0
  short = np.flatnonzero(counts < sel.k).tolist()
  return {
      "num_classes": C,
      "k": sel.k,
      "num_selected": int(n),
      "count": counts.astype(int).tolist(),
      "min_score": per_class(min_s),
      "median_score": per_class(med),
      "max_score": per_class(max_s),
      "classes_short_of_k": short,
  }


def _json_normal(v):
  return json.loads(json.dumps(v, default=storage.json_default))


def write_selection(directory, sel: Selection, *, extra_summary: dict | None = None) -> None:
  """Writes D̂ to ``directory`` (local or ``gs://``): one ``.npy`` per column, then
  ``class_stats.json``, then ``summary.json`` last: a directory without it is not a
  complete D̂ (each file is written atomically, :mod:`bssl.storage`). An existing D̂ there
  is replaced (its summary removed first, so a reader never pairs old and new columns).
  ``extra_summary`` adds keys to summary.json; it may repeat a built-in key (num_classes,
  k, num_selected, classes_short_of_k, ...) only with the same value. ``scores.npy`` holds
  ``sel.scores`` (the recipe's: the teacher's probability, for people and reports) and
  ``rank_scores.npy`` ``sel.rank_scores`` (the recipe's: the log-odds the rows were ranked by).
  """
  directory = storage.path(directory)
  stats = class_statistics(sel)
  summary = {
      "format": "bssl.selection",
      "format_version": _FORMAT_VERSION,
      "num_classes": sel.num_classes,
      "k": sel.k,
      "num_selected": int(len(sel.ids)),
      "classes_short_of_k": stats["classes_short_of_k"],
      "num_classes_short_of_k": len(stats["classes_short_of_k"]),
      "min_per_class": int(min(stats["count"])),
      "max_per_class": int(max(stats["count"])),
      "files": {f"{c}.npy": np.dtype(dt).name for c, dt in _DTYPES.items()},
  }
  for key, v in (extra_summary or {}).items():
    if key in summary and _json_normal(summary[key]) != _json_normal(v):
      raise ValueError(
          f"extra_summary[{key!r}] = {v!r} conflicts with the value computed "
          f"from the selection ({summary[key]!r})"
      )
    summary[key] = v
  if (directory / "summary.json").exists():
    (directory / "summary.json").unlink()
  for col in _DTYPES:
    storage.write_npy(directory / f"{col}.npy", getattr(sel, col))
  storage.write_text(
      directory / "class_stats.json",
      json.dumps(stats, indent=1, sort_keys=True, default=storage.json_default),
  )
  storage.write_text(
      directory / "summary.json",  # last: complete
      json.dumps(summary, indent=1, sort_keys=True, default=storage.json_default),
  )


def image_keys(source, ids) -> tuple[np.ndarray, np.ndarray]:
  """(key, url) of U's images ``ids``, as strings: a tar ingest's sample keys and urls; an
  ingest of files, or image files, their paths (url ""); otherwise (Fashion-MNIST, fake
  data) the id itself."""
  ids = np.asarray(ids, np.int64)
  if hasattr(source, "fields"):
    return source.fields(ids, "key").astype(str), source.fields(ids, "url").astype(str)
  if hasattr(source, "name_of"):
    keys = np.asarray([source.name_of(i) for i in ids], dtype=str)
  else:
    keys = ids.astype(str)
  return keys, np.full(len(ids), "", dtype=object).astype(str)


def _utf8(name: str) -> str:
  return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_table(path, sel: Selection, source, class_names=None):
  """D̂ as one Parquet table (``path``, local or gs://), one row per selection, in D̂'s
  order (class, then rank): ``id``, ``key`` and ``url`` of the image (see
  :func:`image_keys`; a file name that is not UTF-8 has those bytes as ``\\xNN``),
  ``class`` and ``class_name``, ``score`` (the teacher's probability),
  ``log_odds`` (what the rows were ranked by) and ``rank`` (0-based, within the class).
  Parquet: columnar and compressed, read by pandas, polars, DuckDB, Spark and the
  img2dataset family, so a selection can be published and joined back to its shards."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  keys, urls = image_keys(source, sel.ids)
  # Parquet text is UTF-8: a file name that is not (held surrogate-escaped, as Python holds
  # it) has its other bytes written as \xNN, as `ls -b` shows them; ``id`` stays exact
  keys = [_utf8(k) for k in keys]
  names = list(class_names) if class_names is not None else [str(c) for c in range(sel.num_classes)]
  names = [_utf8(str(n)) for n in names]  # (class folders' names)
  t = pa.table(
      {
          "id": pa.array(sel.ids, pa.int64()),
          "key": pa.array(keys, pa.string()),
          "url": pa.array(urls, pa.string()),
          "class": pa.array(sel.classes, pa.int32()),
          "class_name": pa.array([names[c] for c in sel.classes], pa.string()),
          "score": pa.array(sel.scores, pa.float32()),
          "log_odds": pa.array(sel.rank_scores, pa.float32()),
          "rank": pa.array(sel.ranks, pa.int32()),
      }
  )
  buf = pa.BufferOutputStream()
  pq.write_table(t, buf, compression="zstd")
  storage.write_bytes(path, buf.getvalue().to_pybytes())
  return path


def read_selection(directory, mmap: bool = True) -> Selection:
  """Reads a D̂ written by :func:`write_selection` (memory-mapped, read-only, by default on
  a local disk). One written before ``rank_scores.npy`` existed reads with ``rank_scores``
  equal to ``scores`` (what it was ranked by)."""
  directory = storage.path(directory)
  summary_path = directory / "summary.json"
  if not summary_path.exists():
    raise FileNotFoundError(f"{directory} is not a complete selection (no summary.json)")
  summary = json.loads(summary_path.read_text())
  cols = {}
  for col, dt in _DTYPES.items():
    if col == "rank_scores" and f"{col}.npy" not in summary.get("files", {}):
      continue  # format_version 1: scores ranked
    a = storage.read_npy(directory / f"{col}.npy", mmap=mmap)
    if a.dtype != dt or a.ndim != 1 or a.shape[0] != summary["num_selected"]:
      raise ValueError(
          f"{directory}/{col}.npy: expected {summary['num_selected']} rows of "
          f"{np.dtype(dt).name}, got shape {a.shape} of {a.dtype}"
      )
    cols[col] = a
  return Selection(num_classes=summary["num_classes"], k=summary["k"], **cols)


class RankedTopK:
  """Per-class top-``k`` kept separately for each rank ``r < p`` of a class within its
  image's top classes, so that the selection of any ``k' <= k`` and ``p' <= p`` is derived
  exactly, without rescoring (:meth:`result`): an (image, class) pair in the top-``k'`` of
  the candidates of ranks ``< p'`` is in the top-``k'`` of its own rank's candidates, which
  this keeps. Memory is ``p`` times a :class:`TopKPerClass`'s."""

  def __init__(
      self, num_classes: int, k: int, p: int, *, pending_slots: int | None = None, seed: int = 0
  ):
    if int(p) <= 0:
      raise ValueError(f"p must be positive, got {p}")
    self.num_classes, self.k, self.p = int(num_classes), int(k), int(p)
    self.by_rank = [
        TopKPerClass(num_classes, k, pending_slots=pending_slots, seed=seed) for _ in range(self.p)
    ]

  @property
  def seed(self) -> int:
    return self.by_rank[0].seed

  @property
  def num_candidates_seen(self) -> int:
    return sum(a.num_candidates_seen for a in self.by_rank)

  def update_ranked(self, ids, classes, scores) -> None:
    """``ids`` [B]; ``classes``, ``scores`` [B, p]: column r is each image's rank-r class."""
    classes, scores = np.asarray(classes), np.asarray(scores)
    if classes.ndim != 2 or classes.shape[1] != self.p or scores.shape != classes.shape:
      raise ValueError(
          f"classes and scores must be [B, {self.p}], got {classes.shape} and " f"{scores.shape}"
      )
    for r, acc in enumerate(self.by_rank):
      acc.update(ids, classes[:, r], scores[:, r])

  def merge(self, other: RankedTopK) -> RankedTopK:
    if not isinstance(other, RankedTopK) or (other.num_classes, other.k, other.p) != (
        self.num_classes,
        self.k,
        self.p,
    ):
      raise ValueError("can only merge a RankedTopK of the same num_classes, k and p")
    for a, b in zip(self.by_rank, other.by_rank):
      a.merge(b)
    return self

  def result(self, k: int | None = None, p: int | None = None) -> Selection:
    """The exact selection of top-``k`` per class among the candidates of ranks ``< p``."""
    k = self.k if k is None else int(k)
    p = self.p if p is None else int(p)
    if not (1 <= k <= self.k and 1 <= p <= self.p):
      raise ValueError(f"k and p must be in 1..{self.k} and 1..{self.p}, got {k} and {p}")
    acc = TopKPerClass.from_state_dict(self.by_rank[0].state_dict())
    for r in range(1, p):
      acc.merge(self.by_rank[r])
    sel = acc.result()
    keep = sel.ranks < k
    return Selection(
        sel.ids[keep],
        sel.classes[keep],
        sel.scores[keep],
        sel.ranks[keep],
        self.num_classes,
        k,
        sel.rank_scores[keep],
    )

  def state_dict(self) -> dict[str, np.ndarray]:
    out = {"ranked_p": np.asarray(self.p, np.int64)}
    for r, acc in enumerate(self.by_rank):
      out.update({f"r{r}__{key}": v for key, v in acc.state_dict().items()})
    return out

  @classmethod
  def from_state_dict(cls, d) -> RankedTopK:
    if "ranked_p" not in d:
      raise ValueError("not a RankedTopK state dict: missing 'ranked_p'")
    p = int(np.asarray(d["ranked_p"]))
    accs = [
        TopKPerClass.from_state_dict(
            {key[len(f"r{r}__") :]: v for key, v in d.items() if key.startswith(f"r{r}__")}
        )
        for r in range(p)
    ]
    out = cls.__new__(cls)
    out.num_classes, out.k, out.p, out.by_rank = accs[0].num_classes, accs[0].k, p, accs
    return out


class GlobalTopK:
  """The unbalanced D̂ (``select.balanced=False``): the ``k * num_classes`` globally
  highest-scoring (image, class) pairs, whatever their class, instead of ``k`` per class.
  Order: score descending, then smaller ``tie_hash`` of the id's low 32 bits (``seed``, as
  :class:`TopKPerClass`), then smaller id, then smaller class. Like :class:`RankedTopK`,
  the pairs are kept separately for each rank ``r < p`` of a class within its image's top
  classes, so any ``k' <= k`` and ``p' <= p`` is derived exactly (a pair in the global top
  ``k' * C`` of ranks ``< p'`` is in the top ``k' * C`` of its own rank). Candidates below
  a rank's ``k * C``-th best kept score are dropped on arrival; the rest wait in batches
  until ``k * C`` of them are pending, then one sort keeps the best. Memory: at most
  ``2 * p * k * C`` (id, class, score) rows, 16 bytes each (plain arrays: the global order
  needs no per-class packing, so ids are not limited to 32 bits)."""

  def __init__(self, num_classes: int, k: int, p: int, *, seed: int = 0):
    if int(num_classes) <= 0 or int(k) <= 0 or int(p) <= 0:
      raise ValueError(f"num_classes, k and p must be positive, got {num_classes}, {k}, {p}")
    self.num_classes, self.k, self.p = int(num_classes), int(k), int(p)
    self.seed = int(seed)
    self.n = self.k * self.num_classes
    self._rows = [self._empty() for _ in range(self.p)]
    self._pending = [[] for _ in range(self.p)]  # batches not yet compacted in
    self._pending_n = [0] * self.p
    self._thresh = [-np.inf] * self.p  # the n-th best score kept, once n are kept
    self._seen = 0

  @staticmethod
  def _empty():
    return (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))

  def _tie(self, ids):
    return tie_hash(ids & np.int64(MAX_ID), self.seed)

  def _order(self, ids, classes, scores):
    """Indices in selection order (score descending; tie hash, id, class ascending)."""
    return global_order(ids, classes, scores, self.seed)

  def _compact(self, r: int) -> None:
    """Folds rank ``r``'s pending batches into its kept rows: the ``n`` best remain."""
    if self._pending[r]:
      self._rows[r] = tuple(np.concatenate(cols) for cols in zip(self._rows[r], *self._pending[r]))
      self._pending[r], self._pending_n[r] = [], 0
    ids, classes, scores = self._rows[r]
    if len(ids) > self.n:
      order = self._order(ids, classes, scores)[: self.n]
      self._rows[r] = (ids[order], classes[order], scores[order])
    if len(self._rows[r][0]) == self.n:
      self._thresh[r] = float(self._rows[r][2].min())

  @property
  def num_candidates_seen(self) -> int:
    return self._seen

  def update_ranked(self, ids, classes, scores) -> None:
    """``ids`` [B]; ``classes``, ``scores`` [B, p]: column r is each image's rank-r class."""
    ids = np.asarray(ids, np.int64)
    classes, scores = np.asarray(classes), np.asarray(scores, np.float32)
    if (
        classes.ndim != 2
        or classes.shape[1] != self.p
        or scores.shape != classes.shape
        or ids.shape != classes.shape[:1]
    ):
      raise ValueError(
          f"ids [B] and classes, scores [B, {self.p}] expected, got {ids.shape}, "
          f"{classes.shape} and {scores.shape}"
      )
    if np.isnan(scores).any():
      raise ValueError("NaN score")
    if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
      raise ValueError(f"classes must lie in 0..{self.num_classes - 1}")
    self._seen += classes.size
    for r in range(self.p):
      # below the n-th best kept score a candidate can never enter (equal scores can:
      # a smaller tie hash wins the tie)
      keep = scores[:, r] >= self._thresh[r]
      if not keep.any():
        continue
      self._pending[r].append((ids[keep], classes[keep, r].astype(np.int32), scores[keep, r]))
      self._pending_n[r] += int(keep.sum())
      if self._pending_n[r] > self.n:
        self._compact(r)

  def merge(self, other: GlobalTopK) -> GlobalTopK:
    if not isinstance(other, GlobalTopK) or (other.num_classes, other.k, other.p, other.seed) != (
        self.num_classes,
        self.k,
        self.p,
        self.seed,
    ):
      raise ValueError("can only merge a GlobalTopK of the same num_classes, k, p and seed")
    for r in range(self.p):
      other._compact(r)
      self._pending[r].append(other._rows[r])
      self._pending_n[r] += len(other._rows[r][0])
      self._compact(r)
    self._seen += other._seen
    return self

  def result(self, k: int | None = None, p: int | None = None) -> Selection:
    """The ``k * num_classes`` best pairs of ranks ``< p``, as a Selection (rows sorted by
    class, then by rank within the class)."""
    k = self.k if k is None else int(k)
    p = self.p if p is None else int(p)
    if not (1 <= k <= self.k and 1 <= p <= self.p):
      raise ValueError(f"k and p must be in 1..{self.k} and 1..{self.p}, got {k} and {p}")
    for r in range(p):
      self._compact(r)
    ids, classes, scores = (np.concatenate(col) for col in zip(*self._rows[:p]))
    top = self._order(ids, classes, scores)[: k * self.num_classes]
    ids, classes, scores = ids[top], classes[top], scores[top]
    by_class = np.lexsort((ids, self._tie(ids), -scores.astype(np.float64), classes))
    ids, classes, scores = ids[by_class], classes[by_class], scores[by_class]
    counts = np.bincount(classes, minlength=self.num_classes)
    starts = np.cumsum(counts) - counts
    ranks = np.arange(len(ids)) - np.repeat(starts, counts)
    return Selection(ids, classes, scores, ranks, self.num_classes, k)

  def state_dict(self) -> dict[str, np.ndarray]:
    out = {
        "global_p": np.asarray(self.p, np.int64),
        "global_k": np.asarray(self.k, np.int64),
        "global_format_version": np.asarray(_FORMAT_VERSION, np.int64),
        "tie_seed": np.asarray(self.seed, np.int64),
        "num_classes": np.asarray(self.num_classes, np.int64),
        "num_candidates_seen": np.asarray(self._seen, np.int64),
    }
    for r in range(self.p):
      self._compact(r)
      for name, col in zip(("ids", "classes", "scores"), self._rows[r]):
        out[f"r{r}__{name}"] = col
    return out

  @classmethod
  def from_state_dict(cls, d) -> GlobalTopK:
    if "global_p" not in d:
      raise ValueError("not a GlobalTopK state dict: missing 'global_p'")
    version = int(np.asarray(d.get("global_format_version", 1)))
    if version != _FORMAT_VERSION:
      raise ValueError(
          f"unsupported GlobalTopK state format_version {version} (this code "
          f"reads {_FORMAT_VERSION}; version 1 broke ties by the smaller id)"
      )
    out = cls(
        int(np.asarray(d["num_classes"])),
        int(np.asarray(d["global_k"])),
        int(np.asarray(d["global_p"])),
        seed=int(np.asarray(d["tie_seed"])),
    )
    out._rows = [
        (
            np.asarray(d[f"r{r}__ids"], np.int64),
            np.asarray(d[f"r{r}__classes"], np.int32),
            np.asarray(d[f"r{r}__scores"], np.float32),
        )
        for r in range(out.p)
    ]
    for r in range(out.p):
      out._compact(r)  # sets the threshold
    out._seen = int(np.asarray(d["num_candidates_seen"]))
    return out


# ----------------------------------------------------------------------------- near-duplicates
# D̂ counts distinct images: of a family of near-duplicates within U (the same photograph
# re-posted at other sizes, crops, overlays), at most one member per class is selected.
# The score stage keeps more than K candidates per class for it (candidates_per_class).
NEAR_DUPLICATE_MARGIN = 0.25  # candidates kept per class beyond K, as a fraction of K
MIN_NEAR_DUPLICATE_MARGIN = 8  # and at least this many


def candidates_per_class(k: int) -> int:
  """K' = K + max(8, ceil(K / 4)): the candidates per class kept for a D̂ of K distinct
  images per class when near-duplicates are collapsed (16,000 -> 20,000). Monotone in K, so
  a score stage that keeps ``candidates_per_class(max_k)`` serves every ``k <= max_k``."""
  k = int(k)
  return k + max(MIN_NEAR_DUPLICATE_MARGIN, -(-k // 4))


def global_order(ids, classes, scores, seed: int) -> np.ndarray:
  """Indices of (id, class, score) rows in the unbalanced D̂'s order (:class:`GlobalTopK`):
  score descending, then smaller ``tie_hash`` of the id's low 32 bits, id, class."""
  ids = np.asarray(ids, np.int64)
  tie = tie_hash(ids & np.int64(MAX_ID), seed)
  return np.lexsort((classes, ids, tie, -np.asarray(scores).astype(np.float64)))


def family_roots(n: int, pairs) -> np.ndarray:
  """int64 ``[n]``: for each of ``n`` nodes, the smallest node of its connected component
  in the undirected graph of ``pairs`` (int [m, 2]). Min-label propagation with pointer
  jumping (pure numpy): labels only ever move to smaller nodes of the same component, and
  at the fixed point every edge joins equal labels, so each component carries its minimum."""
  lab = np.arange(int(n), dtype=np.int64)
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  if not len(pairs):
    return lab
  a, b = pairs[:, 0], pairs[:, 1]
  while True:
    m = np.minimum(lab[a], lab[b])
    new = lab.copy()
    np.minimum.at(new, a, m)
    np.minimum.at(new, b, m)
    while True:  # pointer jumping: every node to its label's label
      jumped = new[new]
      if np.array_equal(jumped, new):
        break
      new = jumped
    if np.array_equal(new, lab):
      return lab
    lab = new


@dataclasses.dataclass
class Collapsed:
  """D̂ with near-duplicate families collapsed (:func:`collapse_near_duplicates`).

  ``selection``: D̂, rows sorted by class then rank (ranks renumbered 0.. within the class).
  ``dropped``: rows of the candidates left out because a better-ranked member of their
  family (same class) was selected, in candidate-row order; ``kept``: for each, the
  candidate row of that selected member; ``matched``: for each, the best-ranked candidate
  it was itself paired with (the evidence: equal to ``kept`` unless linked through a
  chain); ``pair_index``: for each, the index in ``pairs`` of that pair.
  ``classes_short``: classes with fewer than K rows in D̂ that lost candidates to the
  collapse (their margin ran out)."""

  selection: Selection
  dropped: np.ndarray
  kept: np.ndarray
  matched: np.ndarray
  pair_index: np.ndarray
  classes_short: np.ndarray


def collapse_near_duplicates(
    cands: Selection, pairs, k: int, *, balanced: bool = True, seed: int = 0
) -> Collapsed:
  """The D̂ of ``k`` distinct images per class from candidates ``cands`` (rows sorted by
  class, then by the class's exact rank order, as :meth:`TopKPerClass.result` gives them:
  more than ``k`` per class, :func:`candidates_per_class`) and ``pairs`` (int [m, 2]: rows
  of ``cands`` of one class that are near-duplicates of one another).

  Families are the connected components of the near-duplicate graph among a class's
  candidates; each family's best-ranked member is its only selectable one. Per class, D̂ is
  the first ``k`` family-best members in rank order: the walk "take a candidate unless its
  family already has a taken member, stop at ``k``" (a family's best-ranked member comes
  first in the walk, so it is the one taken). The candidates walked over before the k-th
  taken one are ``dropped``. Exact and deterministic: only the given rank order (ties
  already broken by the seeded hash) and the components decide. Unbalanced
  (``balanced=False``): the first ``k * num_classes`` family-best rows in the global order
  (:func:`global_order` with ``seed``); families stay within a class. Nothing collapsed:
  the rows are those of the top-``k`` selection itself."""
  k = int(k)
  n, C = len(cands), cands.num_classes
  classes = np.asarray(cands.classes, np.int64)
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  if len(pairs):
    if pairs.min() < 0 or pairs.max() >= n:
      raise ValueError(f"near-duplicate pairs must be rows in 0..{n - 1}")
    if np.any(classes[pairs[:, 0]] != classes[pairs[:, 1]]):
      raise ValueError("near-duplicate pairs must join rows of the same class")
  if n and np.any(classes[1:] < classes[:-1]):
    raise ValueError("candidates must be sorted by class, then rank")
  rows = np.arange(n, dtype=np.int64)
  root = family_roots(n, pairs)
  best = root == rows  # the family's best-ranked member (a singleton is its own family)
  counts = np.bincount(classes, minlength=C)[:C]
  starts = np.cumsum(counts) - counts
  if balanced:
    before = np.cumsum(best) - best  # family-best rows before this one, in its class
    before -= np.repeat(before[starts[counts > 0]], counts[counts > 0])
    walked = before < k
  else:
    order = global_order(cands.ids, classes, cands.rank_scores, seed)
    b = best[order]
    walked = np.empty(n, bool)
    walked[order] = (np.cumsum(b) - b) < k * C
  take = best & walked
  drop = np.flatnonzero(~best & walked)
  kept_rows = np.flatnonzero(take)
  kc = np.bincount(classes[kept_rows], minlength=C)[:C]
  ks = np.cumsum(kc) - kc
  ranks = np.arange(len(kept_rows)) - np.repeat(ks, kc)
  sel = Selection(
      cands.ids[kept_rows],
      cands.classes[kept_rows],
      cands.scores[kept_rows],
      ranks,
      C,
      k,
      cands.rank_scores[kept_rows],
  )
  # the evidence: each dropped row's best-ranked direct partner (a dropped row is in some
  # pair), and that pair's index
  m = len(pairs)
  u = np.concatenate([pairs[:, 0], pairs[:, 1]])
  v = np.concatenate([pairs[:, 1], pairs[:, 0]])
  by = np.lexsort((v, u))  # (row, partner) ascending
  first = by[np.searchsorted(u[by], drop)] if len(drop) else np.zeros(0, np.int64)
  lost = np.bincount(classes[drop], minlength=C)[:C]
  return Collapsed(
      selection=sel,
      dropped=drop,
      kept=root[drop],
      matched=v[first],
      pair_index=(first % max(m, 1)).astype(np.int64),
      classes_short=np.flatnonzero((kc < k) & (lost > 0)) if balanced else np.zeros(0, np.int64),
  )
