"""Near-duplicates of evaluation images (bssl/data/neardup.py): recall of planted copies
and false positives on a clean U, on two sets, and the time and memory of matching.

1. **photo-like**: ``--eval`` synthetic scenes (96 px, in families of 5 look-alikes that
   share background and two shapes) as the evaluation set; U1 = transformed copies of
   500 of them (crop of up to 20% of the area, resized to 64..128 px, mirror, brightness /
   contrast / saturation x0.85..1.15, JPEG quality 30..50); U2 = ``--clean`` other scenes
   of the same families.
2. **fashion-mnist**: the 10,000 test images; U1 = copies of 500 (the same transforms, at
   28 px); U2 = ``--clean`` training images (which hold no planted copy).

    python benchmarks/neardup.py                 # --eval 2000 --clean 2000
    python benchmarks/neardup.py --scale 1000000 # the stage's search over 10^6 images of U

``--scale N``: the score stage's search itself (``bssl.stages.eval_copies.find``, all the
cores of this process, parts of 16 blocks, progress lines) over a U of N ids: 10,000
distinct photo-like scenes (1% of them planted copies of evaluation scenes) repeated to N,
against ``--eval`` evaluation scenes; prints the wall time, U images/s, peak resident
memory and how many copies were found (N / 10,000 x the planted ones, if all are).

Prints per set recall (copies matched to their own source at ``score.copy_threshold``),
false positives, matching speed (U images per second, one process) and index memory; the
last line is one JSON object.
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

from bssl.data import neardup, planted, sources


def _decision(m) -> np.ndarray:
  """A Match's copy decision: its ``copy`` where the matcher gives one, else similarity at
  or above neardup.DEFAULT_THRESHOLD (the previous method's rule)."""
  if getattr(m, "copy", None) is not None:
    return np.asarray(m.copy, bool)
  return np.asarray(m.similarity) >= neardup.DEFAULT_THRESHOLD


def _index_bytes(index) -> int:
  """The index's memory: its ``nbytes`` if it says, else its thumbnails and views (the
  previous method's), else the arrays it holds."""
  n = getattr(index, "nbytes", None)
  if n is not None:
    return int(n() if callable(n) else n)
  if hasattr(index, "coarse") and hasattr(index, "thumbs"):
    return index.coarse.nbytes + sum(np.asarray(t).nbytes for t in index.thumbs)
  return sum(v.nbytes for v in vars(index).values() if isinstance(v, np.ndarray))


def measure(name, ev, copies_of, clean, rng, out_size=None):
  t0 = time.perf_counter()
  index = neardup.Index(ev)
  t_index = time.perf_counter() - t0
  copies = [
      planted.transform(ev[i], rng, out_size=out_size and int(rng.integers(*out_size)))
      for i in copies_of
  ]
  t0 = time.perf_counter()
  mp = index.match(copies)
  mc = index.match(clean)
  rate = (len(copies) + len(clean)) / (time.perf_counter() - t0)
  thr = neardup.DEFAULT_THRESHOLD
  recall = float(np.mean(_decision(mp) & (mp.index == np.asarray(copies_of))))
  fp = float(np.mean(_decision(mc)))
  mem = _index_bytes(index)
  print(
      f"{name}: {len(ev)} evaluation images, {len(copies)} planted copies, {len(clean)} "
      f"clean: recall {recall:.4f}, false positives {fp:.4f} (threshold {thr}); copies' "
      f"similarity 1st percentile {np.percentile(mp.similarity, 1):.3f}, clean 99.5th "
      f"{np.percentile(mc.similarity, 99.5):.3f}; index {t_index:.1f} s, "
      f"{mem / 1e6:.0f} MB; matching {rate:.0f} U images/s"
  )
  return {
      f"{name}_recall": round(recall, 4),
      f"{name}_false_positive_rate": round(fp, 4),
      f"{name}_match_per_s": round(rate, 1),
      f"{name}_index_mb": round(mem / 1e6, 1),
  }


def scale(n: int, n_eval: int) -> dict:
  import tempfile
  import types

  from bssl import storage
  from bssl.stages import eval_copies

  rng = np.random.default_rng(1)
  ev = np.stack([planted.scene(i, family=i % (n_eval // 5)) for i in range(n_eval)])
  distinct = 10_000
  src = rng.choice(n_eval, distinct // 100, replace=False)
  u = np.stack(
      [
          planted.transform(ev[src[i // 100]], rng, out_size=96)
          if i % 100 == 0
          else planted.scene(2_000_000 + i, family=i % (n_eval // 5))
          for i in range(distinct)
      ]
  )
  unl = sources.SubsetView(sources.ArraySource(u), np.arange(n) % distinct, reindex=True)
  ctx = types.SimpleNamespace(
      cfg=types.SimpleNamespace(
          score=types.SimpleNamespace(copy_threshold=neardup.DEFAULT_THRESHOLD)
      ),
      data=types.SimpleNamespace(
          test=sources.ArraySource(ev), val=None, labelled=None, unlabelled=unl
      ),
      log=lambda m: print(m, flush=True),
  )
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    found = eval_copies.find(ctx, storage.path(d) / "ec")
    wall = time.perf_counter() - t0
  planted_ids = np.flatnonzero(np.arange(n) % 100 == 0)
  hits = np.isin(planted_ids, found["id"]).mean()
  clean_hits = len(np.setdiff1d(found["id"], planted_ids)) / max(1, n - len(planted_ids))
  out = {
      "scale_u_images": n,
      "scale_eval_images": n_eval,
      "scale_threads": eval_copies.THREADS,
      "scale_wall_s": round(wall, 1),
      "scale_u_per_s": round(n / wall, 1),
      "scale_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
      "scale_rss_before_mb": round(rss0, 1),
      "scale_planted_found": round(float(hits), 4),
      "scale_clean_matched": round(float(clean_hits), 5),
  }
  print(
      f"search of {n:,} U images against {n_eval:,} evaluation images, "
      f"{eval_copies.THREADS} threads: {wall:.0f} s, {n / wall:.0f} U images/s; peak "
      f"resident memory {out['scale_peak_rss_mb']:.0f} MB ({rss0:.0f} MB before: U's "
      f"10,000 distinct images and the evaluation set); planted copies found "
      f"{100 * hits:.1f}%, clean images matched {100 * clean_hits:.3f}%"
  )
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--eval", type=int, default=2000, help="photo-like evaluation scenes")
  ap.add_argument("--clean", type=int, default=2000, help="clean U images of each set")
  ap.add_argument(
      "--scale",
      type=int,
      default=0,
      help="instead: the stage's search over this many U images",
  )
  a = ap.parse_args()
  if a.scale:
    print(json.dumps(scale(a.scale, a.eval)))
    return
  rng = np.random.default_rng(0)
  out = {}
  ev = [planted.scene(i, family=i % (a.eval // 5)) for i in range(a.eval)]
  clean = [planted.scene(1_000_000 + i, family=i % (a.eval // 5)) for i in range(a.clean)]
  out.update(
      measure(
          "photo",
          ev,
          rng.choice(a.eval, 500, replace=False),
          clean,
          rng,
          out_size=(64, 129),
      )
  )
  if os.path.exists("/usr/share/datasets/fashion-mnist"):
    train, test = sources.load_fashion_mnist()
    ev = list(test.images)
    clean = list(train.images[rng.choice(len(train.images), a.clean, replace=False)])
    out.update(measure("fmnist", ev, rng.choice(len(ev), 500, replace=False), clean, rng))
  out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
