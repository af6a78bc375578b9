"""Exact streaming per-class top-K selection (recipe step 3) and the D̂ file format.

Every unlabelled image arrives with its teacher's top-P ``(class, score)`` pairs. For each
class we keep the K candidates with the highest score; equal scores are ordered by the smaller
image id. The answer is exact and does not depend on batch sizes, on the order of the updates,
or on how the stream was split among accumulators that are later merged.

Design (pure numpy, no per-candidate Python work):

* A candidate is encoded as one ``uint64`` *key*, ``desc(score) << 32 | id``, where
  ``desc`` maps float32 to uint32 so that a larger score gives a smaller number (``-0.0`` is
  treated as ``+0.0``). Ascending key order is exactly the selection order (score descending,
  then id ascending), so the key is both the sort key and the payload: the class is implicit in
  where the key is stored, and id and score decode from it. This is why ids must lie in
  ``0 .. 2**32 - 1`` (row indices into U; 4.29 billion images).
* State: one dense ``[C, K + S]`` uint64 matrix. Row ``c`` holds the kept keys of class ``c``
  followed by up to ``S`` pending keys; free slots hold a sentinel (all ones, never a valid key)
  that sorts after every real key. Memory is ``8 * C * (K + S)`` bytes whatever the stream
  length (S = K by default: 256 MB for C = 1000, K = 16000).
* Per-class thresholds: once class ``c`` has K kept keys, ``thresh_key[c]`` is its K-th best
  key and ``thresh_score[c]`` that key's score (``-inf`` before). ``update`` rejects most
  candidates with one gather + compare (``score >= thresh_score[class]``); the survivors get
  their exact keys and must satisfy ``key < thresh_key[class]`` (this is the tie rule: equal
  score and smaller id wins).
* Survivors are grouped by class with one value sort of ``class << b | position`` (a value
  sort, not an argsort: several times faster) and scattered into the pending slots.
* Compaction: when a row's pending slots would overflow, rows whose pending area is at least
  half full are partitioned in place (``ndarray.partition(K - 1, axis=1)``, linear time): the
  first K slots become the K best, slot K-1 the new threshold, the rest go back to sentinel.
* ``result()`` works on a copy (partition, then sort the first K of each row), so it can be
  called mid-stream. ``merge`` inserts the other accumulator's top K keys as pending keys and
  compacts. ``state_dict`` holds only the kept set (ids, classes, scores), O(C * K).

Duplicates: the same ``(id, class)`` pair should not be fed twice (the pipeline scores each
image once, and an image's top-P classes are distinct). It is not deduplicated: a repeated pair
can occupy two slots of its class. An image id may legitimately appear under up to P classes.

D̂ on disk: a directory of ``ids.npy``, ``classes.npy``, ``scores.npy``, ``ranks.npy`` (rows
sorted by class then rank; readable with ``mmap_mode='r'`` for streaming/random access),
``class_stats.json`` and ``summary.json``, written into a temporary directory that is renamed
into place only once complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import uuid

import numpy as np

__all__ = ["Selection", "TopKPerClass", "write_selection", "read_selection",
           "class_statistics", "MAX_ID"]

MAX_ID = (1 << 32) - 1          # largest accepted image id
_SENTINEL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)   # desc(score) == 0xFFFFFFFF only for NaN
_LOW32 = np.uint64(0xFFFF_FFFF)
_FORMAT_VERSION = 1
_LITTLE_ENDIAN = sys.byteorder == "little"
_DTYPES = {"ids": np.int64, "classes": np.int32, "scores": np.float32, "ranks": np.int32}


# ----------------------------------------------------------------------------- key encoding
def _desc_bits(scores: np.ndarray) -> np.ndarray:
  """float32 -> uint32, strictly decreasing in the score (-0.0 counts as +0.0)."""
  s = np.asarray(scores, np.float32) + np.float32(0.0)   # -0.0 + 0.0 == +0.0
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
  """uint64 keys ``desc(score) << 32 | id`` (ids must be in 0..MAX_ID).

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


def _decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ids int64, scores float32) of a 1-D key array."""
  keys = np.ascontiguousarray(keys)
  if _LITTLE_ENDIAN:                     # read the 32-bit halves in place
    halves = keys.view(np.uint32)
    low, high = halves[0::2], halves[1::2]
  else:
    low, high = (keys & _LOW32).astype(np.uint32), (keys >> np.uint64(32)).astype(np.uint32)
  return low.astype(np.int64), _scores_from_desc(high)


def _group_order(classes: np.ndarray, num_classes: int) -> np.ndarray:
  """A permutation that groups ``classes`` by value (stable within a class).

  One value sort of ``class << b | position`` in 32 bits when it fits (else 64 bits); value
  sorts are SIMD-accelerated in numpy and several times faster than ``argsort``.
  """
  m = classes.shape[0]
  pbits = max(1, (m - 1).bit_length())
  cbits = max(1, (num_classes - 1).bit_length())
  dt = np.uint32 if pbits + cbits <= 32 else np.uint64
  comp = classes.astype(dt)
  comp <<= dt(pbits)
  comp |= np.arange(m, dtype=dt)
  comp.sort()
  comp &= dt((1 << pbits) - 1)
  return comp.astype(np.intp)


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
    raise ValueError(f"ids, classes and scores must have equal lengths, got "
                     f"{ids.shape[0]}, {classes.shape[0]} and {scores.shape[0]}")
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
  smin = scores.min()                   # NaN propagates through min: one pass for both checks
  if np.isnan(smin):
    bad_ids = ids[np.isnan(scores)]
    raise ValueError(f"NaN score for id(s) {bad_ids[:10].tolist()}"
                     + (f" and {bad_ids.size - 10} more" if bad_ids.size > 10 else ""))
  return (ids.astype(np.int64, copy=False), classes.astype(np.int32, copy=False), scores,
          bool(smin >= 0))


# ----------------------------------------------------------------------------- result type
@dataclasses.dataclass(eq=False)
class Selection:
  """D̂ as columns: one row per (image, class) kept, sorted by class then rank."""
  ids: np.ndarray       # int64
  classes: np.ndarray   # int32
  scores: np.ndarray    # float32
  ranks: np.ndarray     # int32, 0-based rank within its class
  num_classes: int
  k: int

  def __post_init__(self):
    for name, dt in _DTYPES.items():
      a = np.asanyarray(getattr(self, name))
      if a.dtype != dt:
        a = a.astype(dt)
      if a.ndim != 1:
        raise ValueError(f"Selection.{name} must be 1-D, got shape {a.shape}")
      setattr(self, name, a)
    n = {len(self.ids), len(self.classes), len(self.scores), len(self.ranks)}
    if len(n) != 1:
      raise ValueError(f"Selection columns must have equal lengths, got ids={len(self.ids)}, "
                       f"classes={len(self.classes)}, scores={len(self.scores)}, "
                       f"ranks={len(self.ranks)}")
    self.num_classes, self.k = int(self.num_classes), int(self.k)

  def __len__(self) -> int:
    return len(self.ids)

  def counts(self) -> np.ndarray:
    """Rows per class, shape ``[num_classes]``."""
    return np.bincount(np.asarray(self.classes), minlength=self.num_classes)[:self.num_classes]


def _empty_selection(num_classes: int, k: int) -> Selection:
  return Selection(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
                   np.zeros(0, np.int32), num_classes, k)


# ----------------------------------------------------------------------------- accumulator
class TopKPerClass:
  """Exact streaming per-class top-K (score descending, ties by smaller id).

  ``pending_slots`` (keyword only) is the number of pending slots per class between
  compactions (default K; memory is ``8 * num_classes * (k + pending_slots)`` bytes).
  """

  def __init__(self, num_classes: int, k: int, *, pending_slots: int | None = None):
    num_classes, k = int(num_classes), int(k)
    if num_classes <= 0:
      raise ValueError(f"num_classes must be positive, got {num_classes}")
    if num_classes > np.iinfo(np.int32).max:
      raise ValueError(f"num_classes must fit in int32, got {num_classes}")
    if k <= 0:
      raise ValueError(f"k must be positive, got {k}")
    slots = k if pending_slots is None else int(pending_slots)
    if slots <= 0:
      raise ValueError(f"pending_slots must be positive, got {slots}")
    self.num_classes, self.k, self._slots = num_classes, k, slots
    self._width = k + slots
    self._buf = np.full((num_classes, self._width), _SENTINEL, np.uint64)
    self._fill = np.zeros(num_classes, np.int64)       # valid keys occupy [0, fill) of a row
    self._thresh_key = np.full(num_classes, _SENTINEL, np.uint64)
    self._thresh_score = np.full(num_classes, -np.inf, np.float32)
    self._thresh_id = np.full(num_classes, MAX_ID + 1, np.int64)   # id of the K-th best
    self._seen = 0
    self._any_full = False       # some class has a threshold (else every candidate is kept)

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
    if n == 0:
      return
    if self._any_full:
      # one gather + compare rejects most candidates; a score equal to the threshold's is
      # settled by the id (the tie rule), which is rare and handled apart.
      t = self._thresh_score[classes]
      keep = scores > t
      tie = np.flatnonzero(scores == t)
      del t
      if tie.size:
        keep[tie] = ids[tie] < self._thresh_id[classes[tie]]
      idx = np.flatnonzero(keep)
      del keep
      if idx.size == 0:
        return
      if idx.size < n:
        ids, classes, scores = ids[idx], classes[idx], scores[idx]
    keys = _make_keys(ids, scores, nonneg)
    if keys.size:
      self._insert(keys, classes)

  def merge(self, other: "TopKPerClass") -> "TopKPerClass":
    """Adds ``other``'s candidates to this accumulator (in place; ``other`` is unchanged)."""
    if not isinstance(other, TopKPerClass):
      raise TypeError(f"can only merge a TopKPerClass, got {type(other).__name__}")
    if other is self:
      raise ValueError("cannot merge an accumulator with itself (every candidate would count "
                       "twice)")
    if other.num_classes != self.num_classes or other.k != self.k:
      raise ValueError(f"cannot merge accumulators with different shapes: num_classes="
                       f"{self.num_classes}, k={self.k} vs num_classes={other.num_classes}, "
                       f"k={other.k}")
    top, counts = other._topk_rows()
    keys = top[np.arange(top.shape[1]) < counts[:, None]]
    classes = np.repeat(np.arange(self.num_classes, dtype=np.intp), counts)
    if keys.size:
      self._insert(keys, classes, grouped=True)
    self._compact(self._fill >= self.k)
    self._seen += other._seen
    return self

  def result(self) -> Selection:
    """The selection so far, rows sorted by class then rank. Does not change the state."""
    top, counts = self._topk_rows()
    C, w = top.shape
    total = int(counts.sum())
    if total == 0:
      return _empty_selection(self.num_classes, self.k)
    top.sort(axis=1)                    # sentinels sort last, so valid keys stay a prefix
    if total == C * w:                  # every class full (the usual case at scale)
      keys = top.reshape(-1)
      ranks = np.tile(np.arange(w, dtype=np.int32), C)
    else:
      keys = top[np.arange(w) < counts[:, None]]
      starts = np.cumsum(counts) - counts
      ranks = (np.arange(total, dtype=np.int64) - np.repeat(starts, counts)).astype(np.int32)
    ids, scores = _decode_keys(keys)
    del keys
    classes = np.repeat(np.arange(C, dtype=np.int32), counts)
    return Selection(ids, classes, scores, ranks, self.num_classes, self.k)

  def state_dict(self) -> dict[str, np.ndarray]:
    """The kept set (at most K rows per class) as plain arrays, for checkpointing."""
    top, counts = self._topk_rows()
    keys = top[np.arange(top.shape[1]) < counts[:, None]]
    ids, scores = _decode_keys(keys)
    return {
        "format_version": np.asarray(_FORMAT_VERSION, np.int64),
        "num_classes": np.asarray(self.num_classes, np.int64),
        "k": np.asarray(self.k, np.int64),
        "num_candidates_seen": np.asarray(self._seen, np.int64),
        "ids": ids,
        "classes": np.repeat(np.arange(self.num_classes, dtype=np.int32), counts),
        "scores": scores,
    }

  @classmethod
  def from_state_dict(cls, d) -> "TopKPerClass":
    missing = {"format_version", "num_classes", "k", "num_candidates_seen", "ids", "classes",
               "scores"} - set(d)
    if missing:
      raise ValueError(f"not a TopKPerClass state dict: missing {sorted(missing)}")
    version = int(np.asarray(d["format_version"]))
    if version != _FORMAT_VERSION:
      raise ValueError(f"unsupported TopKPerClass state format_version {version} "
                       f"(this code reads {_FORMAT_VERSION})")
    acc = cls(int(np.asarray(d["num_classes"])), int(np.asarray(d["k"])))
    ids, classes, scores, nonneg = _validate(d["ids"], d["classes"], d["scores"],
                                             acc.num_classes)
    if ids.size:
      counts = np.bincount(classes, minlength=acc.num_classes)
      if counts.max() > acc.k:
        raise ValueError(f"corrupt state: class {int(counts.argmax())} has {int(counts.max())} "
                         f"rows, more than k={acc.k}")
      acc._insert(_make_keys(ids, scores, nonneg), classes)
      acc._compact(acc._fill >= acc.k)
    acc._seen = int(np.asarray(d["num_candidates_seen"]))
    return acc

  def __repr__(self) -> str:
    return (f"TopKPerClass(num_classes={self.num_classes}, k={self.k}, "
            f"kept={int(np.minimum(self._fill, self.k).sum())}, seen={self._seen})")

  # -- internals ---------------------------------------------------------------------------
  def _insert(self, keys: np.ndarray, classes: np.ndarray, grouped: bool = False) -> None:
    """Appends keys to their classes' pending slots, compacting rows that would overflow.

    ``grouped``: ``classes`` is already sorted (keys grouped by class).
    """
    C, K, S, W = self.num_classes, self.k, self._slots, self._width
    m = keys.shape[0]
    counts = np.bincount(classes, minlength=C)
    if counts.max() > S:               # more than a row can take even after compaction
      h = m // 2
      self._insert(keys[:h], classes[:h], grouped)
      self._insert(keys[h:], classes[h:], grouped)
      return
    over = self._fill + counts > W
    if over.any():
      # compact the rows that would overflow, and with them every row whose pending area is
      # at least half full, so that one compaction serves many rows.
      self._compact(over | (self._fill >= K + (S + 1) // 2))
      exact = keys < self._thresh_key[classes]    # thresholds moved: drop what is now out
      if not exact.all():
        idx = np.flatnonzero(exact)
        keys, classes = keys[idx], classes[idx]
        counts = np.bincount(classes, minlength=C)
        m = keys.shape[0]
        if m == 0:
          return
    if not grouped:
      keys = keys[_group_order(classes, C)]
    # slot of the j-th key of the batch (grouped by class): row start + fill - class start + j
    starts = np.cumsum(counts) - counts
    pos = np.repeat(np.arange(C, dtype=np.int64) * W + self._fill - starts, counts)
    pos += np.arange(m, dtype=np.int64)
    self._buf.reshape(-1)[pos] = keys
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
      view.partition(K - 1, axis=1)             # in place, linear time per row
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
    self._thresh_id[r] = (kth & _LOW32).astype(np.int64)
    self._any_full = True

  def _topk_rows(self) -> tuple[np.ndarray, np.ndarray]:
    """(top, counts): a new ``[C, min(K, max fill)]`` array (possibly a strided view of one)
    whose row ``c`` starts with the ``counts[c]`` best keys of class ``c`` (unordered)."""
    K = self.k
    counts = np.minimum(self._fill, K)
    width = int(self._fill.max())
    if width == 0:
      return np.zeros((self.num_classes, 0), np.uint64), counts
    big = np.flatnonzero(self._fill > K)
    if big.size == self.num_classes:
      return np.partition(self._buf[:, :width], K - 1, axis=1)[:, :K], counts
    top = self._buf[:, :min(width, K)].copy()
    if big.size:
      sub = self._buf[big, :width]
      sub.partition(K - 1, axis=1)
      top[big] = sub[:, :K]
    return top, counts


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
  return json.loads(json.dumps(v, default=_json_default))


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
    f.flush()
    os.fsync(f.fileno())


def write_selection(directory, sel: Selection, *, extra_summary: dict | None = None) -> None:
  """Writes D̂ to ``directory`` atomically (temporary directory, then rename).

  ``summary.json`` is written last; a directory without it is not a complete D̂. An existing
  ``directory`` is replaced. ``extra_summary`` adds keys to summary.json; it may repeat a
  built-in key (num_classes, k, num_selected, classes_short_of_k, ...) only with the same
  value.
  """
  directory = os.path.abspath(os.fspath(directory))
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  stats = class_statistics(sel)
  summary = {
      "format": "bssl.selection", "format_version": _FORMAT_VERSION,
      "num_classes": sel.num_classes, "k": sel.k, "num_selected": int(len(sel.ids)),
      "classes_short_of_k": stats["classes_short_of_k"],
      "num_classes_short_of_k": len(stats["classes_short_of_k"]),
      "min_per_class": int(min(stats["count"])), "max_per_class": int(max(stats["count"])),
      "files": {f"{c}.npy": np.dtype(dt).name for c, dt in _DTYPES.items()},
  }
  for key, v in (extra_summary or {}).items():
    if key in summary and _json_normal(summary[key]) != _json_normal(v):
      raise ValueError(f"extra_summary[{key!r}] = {v!r} conflicts with the value computed "
                       f"from the selection ({summary[key]!r})")
    summary[key] = v
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    for col in _DTYPES:
      with open(os.path.join(tmp, f"{col}.npy"), "wb") as f:
        np.save(f, np.ascontiguousarray(getattr(sel, col)))
        f.flush()
        os.fsync(f.fileno())
    _write_json(os.path.join(tmp, "class_stats.json"), stats)
    _write_json(os.path.join(tmp, "summary.json"), summary)      # last: marks completeness
    os.chmod(tmp, 0o755)
    old = None
    if os.path.lexists(directory):
      old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
      os.replace(directory, old)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  try:                                                    # make the rename durable
    fd = os.open(parent, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass


def read_selection(directory, mmap: bool = True) -> Selection:
  """Reads a D̂ written by :func:`write_selection` (memory-mapped, read-only, by default)."""
  directory = os.fspath(directory)
  summary_path = os.path.join(directory, "summary.json")
  if not os.path.exists(summary_path):
    raise FileNotFoundError(f"{directory} is not a complete selection (no summary.json)")
  with open(summary_path) as f:
    summary = json.load(f)
  cols = {}
  for col, dt in _DTYPES.items():
    a = np.load(os.path.join(directory, f"{col}.npy"), mmap_mode="r" if mmap else None,
                allow_pickle=False)
    if a.dtype != dt or a.ndim != 1 or a.shape[0] != summary["num_selected"]:
      raise ValueError(f"{directory}/{col}.npy: expected {summary['num_selected']} rows of "
                       f"{np.dtype(dt).name}, got shape {a.shape} of {a.dtype}")
    cols[col] = a
  return Selection(num_classes=summary["num_classes"], k=summary["k"], **cols)
