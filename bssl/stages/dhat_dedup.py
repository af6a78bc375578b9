"""Near-duplicates within U collapsed in D̂ (``select.near_duplicates = "collapse"``, the
default; issue 30 item 4). A web U holds the same photograph many times (other sizes, crops,
overlays); each copy would take a place of its class's K. D̂ counts distinct images instead:
of a family of near-duplicates, at most one member per class is selected, the best ranked.

How (the select stage, process 0):

1. The score stage keeps K' = ``selection.candidates_per_class(K)`` = K + max(8, ceil(K/4))
   candidates per class (16,000 -> 20,000), exactly, as it keeps K today.
2. The candidates are cut into blocks of whole classes (about :data:`BLOCK_ROWS` rows);
   for each block, every distinct candidate image is read back once through U
   (``ctx.data.unlabelled[i]["image"]``) and the near-duplicate pairs among each class's
   candidates are found by :func:`bssl.data.neardup.near_duplicate_pairs`
   (:func:`block_pairs`: a function of one block, no coordination of its own, so any
   executor can run blocks; :func:`merge_blocks` joins them). A block's pairs are kept in
   ``<select>/near_duplicates/c<first>-<end>.npz`` with a digest of its candidates: a
   rerun after a kill matches only the missing blocks.
3. Families are the connected components of each class's near-duplicate graph; D̂ of a
   class is its first K family-best candidates in the exact rank order
   (:func:`bssl.selection.collapse_near_duplicates`). A class whose margin runs out (more
   than K' - K of its candidates dropped) is short of K, as a class of too few candidates is
   today (``classes_short_of_k``; the collapsed ones also in ``near_duplicates.classes_short``).
4. The dropped candidates are listed with the selected member of their family in
   ``<select>/near_duplicates.parquet`` (:func:`write_table`) and counted (done.json, report).

Video configs are not searched (the field is not read). With the field ``off`` the score
stage keeps K and the select stage is today's, byte for byte.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bssl import config as config_lib
from bssl import procs, progress, selection, storage
from bssl.data import neardup

BLOCK_ROWS = 8192  # candidate rows per block (whole classes): the images of a block are held
THREADS = procs.num_cores()


def enabled(cfg) -> bool:
  """Near-duplicates within U are collapsed in D̂ (image configs with the field on)."""
  return not config_lib.is_video(cfg) and cfg.select.near_duplicates == "collapse"


def scoring_k(cfg, k: int) -> int:
  """The K the score stage keeps per class for a selection of ``k``: K' with the margin
  when near-duplicates are collapsed, else ``k``."""
  return selection.candidates_per_class(k) if enabled(cfg) else int(k)


def _pairs_of(result) -> tuple[np.ndarray, np.ndarray]:
  """(pairs int64 [m, 2], similarity float32 [m]) from a matcher's answer: pairs alone
  (similarity NaN) or (pairs, similarity)."""
  if isinstance(result, tuple):
    pairs, sim = result
  else:
    pairs, sim = result, None
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  if sim is None:
    sim = np.full(len(pairs), np.nan, np.float32)
  return pairs, np.asarray(sim, np.float32).reshape(-1)


def block_pairs(
    ids_by_class,
    read: Callable[[int], np.ndarray | None],
    *,
    matcher: Callable | None = None,
    threads: int = 1,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """One block: for each class's candidate ids (in rank order), the near-duplicate pairs of
  positions ``(i, j)``, ``i < j``, in that list and their similarity (NaN when the matcher
  gives none). ``read(id)``: the image (uint8), or None when it cannot be read (it is then
  nobody's near-duplicate). Each distinct image of the block is read once. ``threads``:
  classes matched side by side; the default matcher gets what is left over per class."""
  ids_by_class = [np.asarray(c, np.int64) for c in ids_by_class]
  if matcher is None:
    # classes side by side, and the threads left over within each (a block of one class,
    # as at the paper's K' = 20,000, is matched on all of them)
    inner = max(1, int(threads) // max(1, len(ids_by_class)))
    matcher = functools.partial(neardup.near_duplicate_pairs, threads=inner)
  uniq = np.unique(np.concatenate(ids_by_class)) if ids_by_class else np.zeros(0, np.int64)
  with ThreadPoolExecutor(max(1, int(threads))) as pool:
    images = dict(zip(uniq.tolist(), pool.map(read, uniq.tolist())))

    def one(ids):
      pos = [j for j, i in enumerate(ids.tolist()) if images[i] is not None]
      if len(pos) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
      pairs, sim = _pairs_of(matcher([images[int(ids[j])] for j in pos]))
      pos = np.asarray(pos, np.int64)
      pairs = pos[pairs]
      flip = pairs[:, 0] > pairs[:, 1]
      pairs[flip] = pairs[flip][:, ::-1]
      return pairs, sim

    return list(pool.map(one, ids_by_class))


def blocks_of(counts, block_rows: int | None = None) -> list[tuple[int, int]]:
  """Classes cut into ranges ``[c0, c1)`` of whole classes, about ``block_rows`` (default
  :data:`BLOCK_ROWS`) candidate rows each (a class of more rows is a block of its own)."""
  block_rows = BLOCK_ROWS if block_rows is None else int(block_rows)
  out, c0, rows = [], 0, 0
  for c, n in enumerate(np.asarray(counts).tolist()):
    if rows and rows + n > block_rows:
      out.append((c0, c))
      c0, rows = c, 0
    rows += n
  if len(counts):
    out.append((c0, len(counts)))
  return out


def merge_blocks(starts, blocks) -> tuple[np.ndarray, np.ndarray]:
  """The candidates' near-duplicate pairs as rows of the whole candidate table, from
  ``blocks`` [(c0, per-class results of :func:`block_pairs`)] and each class's first row
  ``starts``."""
  pairs, sims = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.float32)]
  for c0, per_class in blocks:
    for c, (p, s) in enumerate(per_class, start=c0):
      pairs.append(np.asarray(p, np.int64).reshape(-1, 2) + int(starts[c]))
      sims.append(np.asarray(s, np.float32))
  return np.concatenate(pairs), np.concatenate(sims)


def _digest(ids) -> np.ndarray:
  return np.frombuffer(hashlib.sha1(np.asarray(ids, "<i8").tobytes()).digest(), np.uint8)


def _read_part(path, digest: np.ndarray, c0: int, c1: int):
  if not path.exists():
    return None
  d = storage.read_npz(path)
  if not np.array_equal(d.get("digest"), digest):
    return None  # made for other candidates (cannot happen under the record): redone
  cls, a, b, s = d["class"], d["a"], d["b"], d["similarity"]
  return [
      (np.stack([a[cls == c], b[cls == c]], 1).astype(np.int64), s[cls == c]) for c in range(c0, c1)
  ]


def find(ctx, cands: selection.Selection, folder) -> tuple[np.ndarray, np.ndarray]:
  """The near-duplicate pairs among each class's candidates of ``cands`` (rows sorted by
  class then rank), as rows of ``cands`` [m, 2] and their similarity [m]. Blocks are kept
  in ``folder`` (resumable); progress lines with a rate and an ETA."""
  unl = ctx.data.unlabelled
  counts = cands.counts()
  starts = np.cumsum(counts) - counts
  blocks = blocks_of(counts)

  def read(i):
    rec = unl[int(i)]
    return np.asarray(rec["image"]) if rec.get("valid", True) else None

  total = int(len(cands))
  done, earlier, t0, t_log, out = 0, 0, time.time(), time.time(), []
  for c0, c1 in blocks:
    r0, r1 = int(starts[c0]), int(starts[c1 - 1] + counts[c1 - 1])
    path = folder / f"c{c0:07d}-{c1:07d}.npz"
    digest = _digest(cands.ids[r0:r1])
    got = _read_part(path, digest, c0, c1)
    if got is not None:
      earlier += r1 - r0
    else:
      ids = [cands.ids[starts[c] : starts[c] + counts[c]] for c in range(c0, c1)]
      got = block_pairs(ids, read, threads=THREADS)
      cls = np.concatenate([np.full(len(p), c, np.int32) for c, (p, _) in enumerate(got, c0)])
      pp = np.concatenate([p for p, _ in got]).reshape(-1, 2)
      storage.write_npz(
          path,
          **{
              "class": cls,
              "a": pp[:, 0],
              "b": pp[:, 1],
              "similarity": np.concatenate([s for _, s in got]).astype(np.float32),
              "digest": digest,
          },
      )
    out.append((c0, got))
    done += r1 - r0
    now = time.time()
    if now - t_log >= 30 or done == total:
      t_log, rate = now, (done - earlier) / max(now - t0, 1e-9)
      ctx.log(
          f"near-duplicates within U: {done}/{total} candidates "
          f"({100 * done / max(total, 1):.0f}%; {earlier} matched by an earlier run) "
          f"{rate:.0f} img/s eta {progress.eta(done - earlier, total - earlier, now - t0)}"
      )
  return merge_blocks(starts, out)


def write_table(path, col: selection.Collapsed, cands, sims, source, class_names=None):
  """``<select>/near_duplicates.parquet``: one row per candidate left out of D̂ because a
  better-ranked member of its family (same class) was selected: ``class``, ``class_name``,
  ``kept_id``, ``kept_key``, ``kept_rank`` (its rank in D̂), ``dropped_id``,
  ``dropped_key``, ``dropped_candidate_rank`` (its place among the class's candidates),
  ``matched_id`` (the best-ranked candidate it was itself matched with: ``kept_id`` unless
  linked through a chain) and ``similarity`` (of that match; null when the matcher gives
  none)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  dhat = col.selection
  counts = cands.counts()
  starts = np.cumsum(counts) - counts
  kept_ids = cands.ids[col.kept]
  dropped_ids = cands.ids[col.dropped]
  classes = cands.classes[col.dropped]
  # rank in D̂ of the kept member: its position among the class's selected rows
  key = dhat.classes.astype(np.int64) * (1 << 33) + dhat.ids
  order = np.argsort(key, kind="stable")
  at = order[np.searchsorted(key[order], classes.astype(np.int64) * (1 << 33) + kept_ids)]
  keys, _ = selection.image_keys(source, np.concatenate([kept_ids, dropped_ids]))
  keys = [k.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for k in keys]
  names = (
      list(class_names) if class_names is not None else [str(c) for c in range(cands.num_classes)]
  )
  n = len(dropped_ids)
  sim = sims[col.pair_index] if n else np.zeros(0, np.float32)
  t = pa.table(
      {
          "class": pa.array(classes, pa.int32()),
          "class_name": pa.array([str(names[c]) for c in classes], pa.string()),
          "kept_id": pa.array(kept_ids, pa.int64()),
          "kept_key": pa.array(keys[:n], pa.string()),
          "kept_rank": pa.array(dhat.ranks[at], pa.int32()),
          "dropped_id": pa.array(dropped_ids, pa.int64()),
          "dropped_key": pa.array(keys[n:], pa.string()),
          "dropped_candidate_rank": pa.array(col.dropped - starts[classes], pa.int32()),
          "matched_id": pa.array(cands.ids[col.matched], pa.int64()),
          "similarity": pa.array(sim, pa.float32(), mask=np.isnan(sim)),
      }
  )
  buf = pa.BufferOutputStream()
  pq.write_table(t, buf, compression="zstd")
  storage.write_bytes(path, buf.getvalue().to_pybytes())
  return path


def summary(col: selection.Collapsed, cands, k_candidates: int, num_pairs: int) -> dict:
  """The counts for done.json and the report."""
  return {
      "mode": "collapse",
      "candidates_per_class": int(k_candidates),
      "num_candidates": int(len(cands)),
      "num_pairs": int(num_pairs),
      "num_dropped": int(len(col.dropped)),
      "num_families_collapsed": int(len(np.unique(col.kept))),
      "classes_short": [int(c) for c in col.classes_short],
  }
