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

import numpy as np  # noqa: E402

from bssl.data import neardup, planted, sources  # noqa: E402


def measure(name, ev, copies_of, clean, rng, out_size=None):
  t0 = time.perf_counter()
  index = neardup.Index(ev)
  t_index = time.perf_counter() - t0
  copies = [planted.transform(ev[i], rng, out_size=out_size and int(rng.integers(*out_size)))
            for i in copies_of]
  t0 = time.perf_counter()
  mp = index.match(copies)
  mc = index.match(clean)
  rate = (len(copies) + len(clean)) / (time.perf_counter() - t0)
  thr = neardup.DEFAULT_THRESHOLD
  recall = float(np.mean((mp.similarity >= thr) & (mp.index == np.asarray(copies_of))))
  fp = float(np.mean(mc.similarity >= thr))
  mem = index.coarse.nbytes + sum(np.asarray(t).nbytes for t in index.thumbs)
  print(f"{name}: {len(ev)} evaluation images, {len(copies)} planted copies, {len(clean)} "
        f"clean: recall {recall:.4f}, false positives {fp:.4f} (threshold {thr}); copies' "
        f"similarity 1st percentile {np.percentile(mp.similarity, 1):.3f}, clean 99.5th "
        f"{np.percentile(mc.similarity, 99.5):.3f}; index {t_index:.1f} s, "
        f"{mem / 1e6:.0f} MB; matching {rate:.0f} U images/s")
  return {f"{name}_recall": round(recall, 4), f"{name}_false_positive_rate": round(fp, 4),
          f"{name}_match_per_s": round(rate, 1), f"{name}_index_mb": round(mem / 1e6, 1)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--eval", type=int, default=2000, help="photo-like evaluation scenes")
  ap.add_argument("--clean", type=int, default=2000, help="clean U images of each set")
  a = ap.parse_args()
  rng = np.random.default_rng(0)
  out = {}
  ev = [planted.scene(i, family=i % (a.eval // 5)) for i in range(a.eval)]
  clean = [planted.scene(1_000_000 + i, family=i % (a.eval // 5)) for i in range(a.clean)]
  out.update(measure("photo", ev, rng.choice(a.eval, 500, replace=False), clean, rng,
                     out_size=(64, 129)))
  if os.path.exists("/usr/share/datasets/fashion-mnist"):
    train, test = sources.load_fashion_mnist()
    ev = list(test.images)
    clean = list(train.images[rng.choice(len(train.images), a.clean, replace=False)])
    out.update(measure("fmnist", ev, rng.choice(len(ev), 500, replace=False), clean, rng))
  out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
