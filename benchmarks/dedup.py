"""Exact duplicates across processes (bssl.data.ingest.dedup_partition) at 10^6 images:
time and memory of one partition when the hashes are split among ``n`` processes.

Writes synthetic shard manifests (``--images`` content hashes, 10% of them copies of
others, one placeholder content x 500) in shards of 4,096, then for ``n`` in
``--processes`` runs partition 0 of ``n`` (what one process of ``n`` does) in a fresh
process and reports its wall time and the peak of numpy allocations (tracemalloc) beside
the hashes it kept. The last line is one JSON object.

    python benchmarks/dedup.py                      # --images 1000000 --processes 1,4,16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

CHILD = """
import json, sys, time, tracemalloc
import numpy as np
from bssl.data import ingest
from bssl.data.shards import shard_offsets
out, n = sys.argv[1], int(sys.argv[2])
header = json.load(open(out + "/header.json"))
offsets = shard_offsets(out, header)
tracemalloc.start()
t0 = time.perf_counter()
part = ingest.dedup_partition(out, header, offsets, 0, n)
dt = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"seconds": dt, "peak_mb": peak / 1e6, "dups": int(len(part["dup_ids"]))}))
"""


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--images", type=int, default=1_000_000)
  ap.add_argument("--processes", default="1,4,16")
  a = ap.parse_args()
  from bssl import storage

  rng = np.random.default_rng(0)
  size = 4096
  with tempfile.TemporaryDirectory() as out:
    h = rng.integers(0, 256, (a.images, 16), dtype=np.uint8)
    h[rng.integers(0, a.images, a.images // 10)] = h[rng.integers(0, a.images, a.images // 10)]
    h[rng.choice(a.images, 500, replace=False)] = h[0]
    ns = -(-a.images // size)
    for s in range(ns):
      sl = slice(s * size, (s + 1) * size)
      storage.write_npz(
          os.path.join(out, "shards", f"u-{s:05d}.npz"),
          hash=h[sl],
          reason=np.asarray([""] * len(h[sl])),
      )
    json.dump(
        {"num_shards": ns, "shard_size": size, "num_images": a.images, "placeholder_min": 100},
        open(os.path.join(out, "header.json"), "w"),
    )
    res = {}
    for n in (int(x) for x in a.processes.split(",")):
      r = subprocess.run(
          [sys.executable, "-c", CHILD, out, str(n)],
          capture_output=True,
          text=True,
          env=dict(
              os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
          ),
      )
      got = json.loads(r.stdout.strip().splitlines()[-1])
      res[n] = got
      print(
          f"{a.images:,} images, {n} process(es): partition 0 in {got['seconds']:.1f} s, "
          f"peak numpy memory {got['peak_mb']:.0f} MB, {got['dups']:,} duplicates in it"
      )
  print(
      json.dumps(
          {
              "images": a.images,
              **{f"p{n}_seconds": round(v["seconds"], 2) for n, v in res.items()},
              **{f"p{n}_peak_mb": round(v["peak_mb"], 1) for n, v in res.items()},
          }
      )
  )


if __name__ == "__main__":
  main()
