"""Near-duplicates within U collapsed in D̂ (bssl/stages/dhat_dedup.py, issue 30 item 4): the
cost of the select stage's search and collapse, and what it collapses, on a planted U.

The candidates: ``--candidates`` rows in classes of ``--per-class`` (K' = K + max(8, K/4)
candidates per class, so K = ``per_class`` / 1.25), each candidate a distinct image of U.
``--family-fraction`` of each class's candidates are planted families of 2-10 members: a
photo-like scene (bssl.data.planted.scene, ``--size`` px) and copies of it
(``--copies planted``: bssl.data.planted.transform, crop / resize / mirror / colour /
JPEG, the copies the current matcher is built for; ``--copies web``:
bssl.data.webcopy.web_copy, a random family of copies as people re-post them); the rest
are clean scenes (no two alike). Scores are random; the candidates are ranked by them.

What runs is the stage's own code: blocks of whole classes (:data:`BLOCK_ROWS`) through
``dhat_dedup.block_pairs`` (every image of a block read once: here generated on demand,
as a decode would produce it, so memory holds one block), ``merge_blocks``, then
``selection.collapse_near_duplicates``. Measured: candidates per second (read + match +
collapse, all the threads of this process), wall and CPU time (the machine may be shared),
peak resident memory; planted
(class, family) pairs with at most one member in D̂ (``families_collapsed``), clean images
left out (``clean_removed``, must be 0). The matcher's cost per class grows faster than
its size (``bssl.data.neardup.near_duplicate_pairs`` indexes the class and searches it
exhaustively), so a second, smaller measure of one class of ``--scale-class`` candidates
gives the exponent, and the cost at the paper's D̂ (C x K = 1000 x 16,000, K' = 20,000
candidates per class: 20M) is extrapolated from both.

    python benchmarks/dhat_dedup.py                         # 10^5 candidates, 2,500 per class
    python benchmarks/dhat_dedup.py --candidates 1000000    # 10^6 (about an hour on 2 cores)
    python benchmarks/dhat_dedup.py --copies web

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bssl import selection
from bssl.data import planted
from bssl.stages import dhat_dedup

PAPER_CLASSES, PAPER_K = 1000, 16_000


def plan(num, per_class, family_fraction, seed):
  """(family of each candidate or -1, member index in its family, class of each)."""
  rng = np.random.default_rng(seed)
  fam, member, classes = (
      np.full(num, -1),
      np.zeros(num, np.int64),
      np.repeat(np.arange(num // per_class), per_class),
  )
  nf = 0
  for c in range(num // per_class):
    slots = rng.permutation(np.arange(c * per_class, (c + 1) * per_class))
    at, want = 0, int(family_fraction * per_class)
    while at < want:
      size = int(rng.integers(2, 11))
      rows = slots[at : min(at + size, want)]
      if len(rows) < 2:
        break
      fam[rows], member[rows] = nf, np.arange(len(rows))
      nf, at = nf + 1, at + len(rows)
  return fam, member, classes


def reader(fam, member, size, copies, seed):
  webcopy = None
  if copies == "web":
    from bssl.data import webcopy

  def read(i):
    if fam[i] < 0:
      return planted.scene(10_000_000 + i, size=size)
    base = planted.scene(int(fam[i]), size=size)
    if member[i] == 0:
      return base
    rng = np.random.default_rng([seed, i])
    if webcopy is not None:
      return webcopy.web_copy(base, webcopy.FAMILIES[int(rng.integers(len(webcopy.FAMILIES)))], rng)
    return planted.transform(base, rng, out_size=int(rng.integers(size * 2 // 3, size * 4 // 3)))

  return read


def run(num, per_class, family_fraction, size, copies, seed, threads):
  fam, member, classes = plan(num, per_class, family_fraction, seed)
  rng = np.random.default_rng(seed + 1)
  ids = np.arange(num, dtype=np.int64)
  scores = rng.standard_normal(num).astype(np.float32)
  order = np.lexsort((-scores, classes))  # by class, then score: the candidates' ranking
  C = num // per_class
  counts = np.bincount(classes, minlength=C)
  ranks = np.arange(num) - np.repeat(np.cumsum(counts) - counts, counts)
  cands = selection.Selection(ids[order], classes[order], scores[order], ranks, C, per_class)
  k = max(1, (per_class * 4) // 5)  # K' = 1.25 K
  read = reader(fam, member, size, copies, seed)
  starts = np.cumsum(counts) - counts
  t0, cpu0 = time.time(), time.process_time()
  out = []
  for c0, c1 in dhat_dedup.blocks_of(counts):
    per = [cands.ids[starts[c] : starts[c] + counts[c]] for c in range(c0, c1)]
    out.append((c0, dhat_dedup.block_pairs(per, read, threads=threads)))
  pairs, _ = dhat_dedup.merge_blocks(starts, out)
  t1 = time.time()
  col = selection.collapse_near_duplicates(cands, pairs, k)
  t2, cpu2 = time.time(), time.process_time()
  dhat = col.selection
  f = fam[dhat.ids]
  planted_in = f >= 0
  seen = set()
  repeat = 0
  for c, x in zip(dhat.classes[planted_in].tolist(), f[planted_in].tolist()):
    repeat += (c, x) in seen
    seen.add((c, x))
  total_fam = len({(c, x) for c, x in zip(classes[fam >= 0].tolist(), fam[fam >= 0].tolist())})
  dropped = cands.ids[col.dropped]
  return {
      "candidates": num,
      "classes": C,
      "per_class": per_class,
      "k": k,
      "wall_s": round(t2 - t0, 2),
      "match_s": round(t1 - t0, 2),
      "collapse_s": round(t2 - t1, 3),
      "images_per_s": round(num / (t2 - t0), 1),
      "cpu_s": round(cpu2 - cpu0, 2),
      "images_per_cpu_s": round(num / max(cpu2 - cpu0, 1e-9), 1),
      "pairs": int(len(pairs)),
      "dropped": int(len(dropped)),
      "families_planted": total_fam,
      "families_in_dhat_more_than_once": repeat,
      "families_collapsed": round(1 - repeat / max(total_fam, 1), 4),
      "clean_removed": int((fam[dropped] < 0).sum()),
      "classes_short": int(len(col.classes_short)),
  }


def collapse_only(num_classes, per_class, family_fraction, seed):
  """The collapse alone (no images): ``num_classes`` x ``per_class`` candidates, random
  scores with ties, families of 2-10 rows (random trees) over ``family_fraction`` of each
  class's rows; wall and peak memory of ``collapse_near_duplicates`` and of building its
  input. The paper's D̂: 1000 x 20,000 = 2 x 10^7 candidates."""
  rng = np.random.default_rng(seed)
  n = num_classes * per_class
  t0 = time.time()
  classes = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  scores = np.sort(rng.integers(0, 1000, n).astype(np.float32))[::-1].copy()
  ranks = np.tile(np.arange(per_class, dtype=np.int32), num_classes)
  ids = rng.permutation(n).astype(np.int64)
  cands = selection.Selection(ids, classes, scores, ranks, num_classes, per_class)
  # families: consecutive runs of a random permutation of each class's rows
  m = int(family_fraction * per_class)
  sizes = rng.integers(2, 11, m)
  fam_of = np.repeat(np.arange(m), sizes)[:m]  # family of each of the first m slots
  a_list, b_list = [], []
  for c in range(num_classes):
    rows = c * per_class + rng.permutation(per_class)[:m]
    first = np.r_[True, fam_of[1:] != fam_of[:-1]]
    head = np.maximum.accumulate(np.where(first, np.arange(m), 0))
    tail = ~first
    a_list.append(rows[tail])
    b_list.append(rows[head[tail]])  # a star on the family's first slot
  pairs = np.stack([np.concatenate(a_list), np.concatenate(b_list)], 1)
  t1, cpu1 = time.time(), time.process_time()
  k = (per_class * 4) // 5
  col = selection.collapse_near_duplicates(cands, pairs, k)
  t2, cpu2 = time.time(), time.process_time()
  return {
      "candidates": n,
      "pairs": int(len(pairs)),
      "dropped": int(len(col.dropped)),
      "build_s": round(t1 - t0, 2),
      "collapse_s": round(t2 - t1, 2),
      "collapse_cpu_s": round(cpu2 - cpu1, 2),
      "peak_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--candidates", type=int, default=100_000)
  ap.add_argument("--per-class", type=int, default=2_500)
  ap.add_argument("--scale-class", type=int, default=625, help="a smaller class, for the exponent")
  ap.add_argument("--family-fraction", type=float, default=0.15)
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--copies", choices=("planted", "web"), default="planted")
  ap.add_argument("--threads", type=int, default=dhat_dedup.THREADS)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
      "--collapse-only",
      type=int,
      default=0,
      help="classes: the collapse alone, of this many classes x --per-class candidates "
      "(1000 --per-class 20000: the paper's D̂)",
  )
  a = ap.parse_args()
  if a.collapse_only:
    print(json.dumps(collapse_only(a.collapse_only, a.per_class, a.family_fraction, a.seed)))
    return
  small = run(
      a.scale_class * 4, a.scale_class, a.family_fraction, a.size, a.copies, a.seed, a.threads
  )
  print("small:", json.dumps(small), flush=True)
  big = run(a.candidates, a.per_class, a.family_fraction, a.size, a.copies, a.seed, a.threads)
  print("main:", json.dumps(big), flush=True)
  # per class, in CPU seconds (the machine is shared: wall time depends on the others):
  # t(n) = t_big * (n / per_class) ** alpha, alpha from the two class sizes
  t_small = small["cpu_s"] / small["classes"]
  t_big = big["cpu_s"] / big["classes"]
  alpha = float(np.log(t_big / t_small) / np.log(a.per_class / a.scale_class))
  n_paper = selection.candidates_per_class(PAPER_K)
  t_paper = PAPER_CLASSES * t_big * (n_paper / a.per_class) ** alpha
  res = dict(
      big,
      copies=a.copies,
      threads=a.threads,
      peak_mem_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      per_class_exponent=round(alpha, 3),
      paper_candidates=PAPER_CLASSES * n_paper,
      paper_extrapolated_core_hours=round(t_paper / 3600, 1),
      paper_extrapolated_core_hours_linear=round(
          PAPER_CLASSES * n_paper / big["images_per_cpu_s"] / 3600, 1
      ),
  )
  print(json.dumps(res))


if __name__ == "__main__":
  main()
