"""Throughput and memory of the streaming per-class top-K selector (bssl.selection).

Synthetic stream: N images, each with P distinct random classes out of C and uniformly random
float32 scores, fed in batches of B images (B * P candidates). Batches are generated on the fly
and generation time is excluded from the measured time (reported separately).

* streaming: ``TopKPerClass.update`` for every batch plus one final ``result()``;
  images/s = N / (update time + result time).
* naive: keeps every candidate and sorts them per class at the end (``np.lexsort`` on
  (tie hash of the id, -score, class)), only at N = 10M (or --naive-n); its answer is checked
  against the streaming answer.
* memory: peak resident set size (VmHWM, absolute, nothing subtracted) of a fresh
  subprocess that streams N = 10M and N = 30M images through the selector (incl. result()),
  run before the naive baseline. The process baseline (RSS after imports) is printed too.

    python benchmarks/selection.py            # full run
    python benchmarks/selection.py --quick    # smoke run (N = 200k)

The last line printed is one JSON object with images_per_s, naive_images_per_s,
peak_rss_mb_10m and peak_rss_mb_30m (plus details).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from bssl.selection import TopKPerClass, tie_hash  # noqa: E402


def distinct_classes(rng: np.random.Generator, b: int, p: int, c: int) -> np.ndarray:
  """[b, p] int32: each row p distinct classes uniformly at random (rejection sampling)."""
  if p > c:
    raise ValueError(f"p={p} > classes={c}")
  out = rng.integers(0, c, (b, p), dtype=np.int32)
  out.sort(axis=1)
  bad = np.flatnonzero((out[:, 1:] == out[:, :-1]).any(axis=1))
  while bad.size:
    redo = rng.integers(0, c, (bad.size, p), dtype=np.int32)
    redo.sort(axis=1)
    out[bad] = redo
    bad = bad[(redo[:, 1:] == redo[:, :-1]).any(axis=1)]
  return out


def batches(n: int, c: int, p: int, batch: int, seed: int):
  """Yields (ids int64, classes int32, scores float32), flattened [b * p] each."""
  rng = np.random.default_rng(seed)
  for start in range(0, n, batch):
    b = min(batch, n - start)
    ids = np.repeat(np.arange(start, start + b, dtype=np.int64), p)
    classes = distinct_classes(rng, b, p, c).reshape(-1)
    scores = rng.random(b * p, dtype=np.float32)
    yield ids, classes, scores


def run_streaming(n, c, p, k, batch, seed, pending_slots=None):
  """Streams n images through TopKPerClass; times update() calls and the final result().

  Wall times and this process's CPU times (user + system) are both recorded: the machine is
  shared, so wall time also counts waiting for a core.
  """
  acc = TopKPerClass(c, k, pending_slots=pending_slots)
  t = {"gen_s": 0.0, "update_s": 0.0, "update_cpu_s": 0.0}
  it = batches(n, c, p, batch, seed)
  while True:
    t0 = time.perf_counter()
    try:
      ids, classes, scores = next(it)
    except StopIteration:
      break
    t1, c1 = time.perf_counter(), time.process_time()
    acc.update(ids, classes, scores)
    t["update_s"] += time.perf_counter() - t1
    t["update_cpu_s"] += time.process_time() - c1
    t["gen_s"] += t1 - t0
  t1, c1 = time.perf_counter(), time.process_time()
  sel = acc.result()
  t["result_s"] = time.perf_counter() - t1
  t["result_cpu_s"] = time.process_time() - c1
  return sel, t


def run_naive(n, c, p, k, batch, seed):
  """Keeps every candidate; one sort per class order at the end."""
  ids_l, cls_l, sc_l = [], [], []
  t_gen = t_keep = 0.0
  t0 = time.perf_counter()
  for ids, classes, scores in batches(n, c, p, batch, seed):
    t1 = time.perf_counter()
    t_gen += t1 - t0
    ids_l.append(ids.copy())
    cls_l.append(classes.copy())
    sc_l.append(scores.copy())
    t0 = time.perf_counter()
    t_keep += t0 - t1
  t1 = time.perf_counter()
  ids, classes, scores = (np.concatenate(x) for x in (ids_l, cls_l, sc_l))
  del ids_l, cls_l, sc_l
  order = np.lexsort((tie_hash(ids, 0), -scores, classes))  # ties: TopKPerClass's rule
  cs = classes[order]
  counts = np.bincount(cs, minlength=c)
  starts = np.cumsum(counts) - counts
  rank = np.arange(cs.size) - starts[cs]
  keep = order[rank < k]
  out = ids[keep], classes[keep], scores[keep]
  t_sort = time.perf_counter() - t1
  return out, {"gen_s": t_gen, "keep_s": t_keep, "sort_s": t_sort}


def _proc_status_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def memory_child(n, c, p, k, batch, seed) -> dict:
  """Runs in a fresh process. Peak = VmHWM, the high-water mark of this process image's
  resident memory (ru_maxrss would also count the parent's pages inherited through fork)."""
  base = _proc_status_mb("VmRSS")
  sel, t = run_streaming(n, c, p, k, batch, seed)
  peak = _proc_status_mb("VmHWM")
  if peak != peak:  # no /proc: fall back to ru_maxrss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  return {"n": n, "baseline_rss_mb": base, "peak_rss_mb": peak, "rows": int(sel.ids.size), **t}


def measure_memory(n, args) -> dict:
  cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--memory-child",
      "--n",
      str(n),
      "--classes",
      str(args.classes),
      "--p",
      str(args.p),
      "--k",
      str(args.k),
      "--batch",
      str(args.batch),
      "--seed",
      str(args.seed),
  ]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, default=10_000_000, help="images in the stream")
  ap.add_argument("--classes", type=int, default=1000)
  ap.add_argument("--p", type=int, default=10, help="classes kept per image")
  ap.add_argument("--k", type=int, default=16000, help="images kept per class")
  ap.add_argument("--batch", type=int, default=100_000, help="images per update")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
      "--pending-slots",
      type=int,
      default=None,
      help="TopKPerClass pending slots per class (default max(K // 2, 256))",
  )
  ap.add_argument(
      "--naive-n", type=int, default=10_000_000, help="stream size for the naive baseline (0: skip)"
  )
  ap.add_argument(
      "--mem-n",
      type=int,
      nargs=2,
      default=[10_000_000, 30_000_000],
      help="stream sizes for the two peak-memory subprocesses",
  )
  ap.add_argument(
      "--quick", action="store_true", help="smoke run: N = naive N = 200k, memory at 200k and 600k"
  )
  ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args.memory_child:
    res = memory_child(args.n, args.classes, args.p, args.k, args.batch, args.seed)
    print(json.dumps(res))
    return res
  if args.quick:
    args.n, args.naive_n, args.mem_n = 200_000, 200_000, [200_000, 600_000]

  c, p, k, b = args.classes, args.p, args.k, args.batch
  print(
      f"[selection] C={c} P={p} K={k} batch={b} images " f"({b * p:,} candidates), N={args.n:,}",
      flush=True,
  )
  sel, t = run_streaming(args.n, c, p, k, b, args.seed, args.pending_slots)
  stream_s = t["update_s"] + t["result_s"]
  cpu_s = t["update_cpu_s"] + t["result_cpu_s"]
  ips = args.n / stream_s
  print(
      f"[streaming] update {t['update_s']:.2f} s + result {t['result_s']:.2f} s = "
      f"{stream_s:.2f} s wall -> {ips / 1e6:.2f}M images/s ({ips * p / 1e6:.1f}M "
      f"candidates/s); CPU time {cpu_s:.2f} s -> {args.n / cpu_s / 1e6:.2f}M images per "
      f"CPU-second; batch generation {t['gen_s']:.2f} s excluded; {sel.ids.size:,} rows "
      f"selected",
      flush=True,
  )
  result = {
      "images_per_s": ips,
      "naive_images_per_s": None,
      "peak_rss_mb_10m": None,
      "peak_rss_mb_30m": None,
      "n": args.n,
      "classes": c,
      "p": p,
      "k": k,
      "batch": b,
      "images_per_cpu_s": args.n / cpu_s,
      **t,
  }

  mems = []
  for n_mem, key in zip(args.mem_n, ("peak_rss_mb_10m", "peak_rss_mb_30m")):
    m = measure_memory(n_mem, args)
    mems.append(m)
    result[key] = m["peak_rss_mb"]
    result[key.replace("peak", "baseline")] = m["baseline_rss_mb"]
    print(
        f"[memory] N={n_mem:,}: peak RSS {m['peak_rss_mb']:.0f} MB (absolute; process "
        f"baseline after imports {m['baseline_rss_mb']:.0f} MB, growth "
        f"{m['peak_rss_mb'] - m['baseline_rss_mb']:.0f} MB); "
        f"{n_mem / (m['update_s'] + m['result_s']) / 1e6:.2f}M images/s in that run",
        flush=True,
    )
  result["mem_n"] = list(args.mem_n)
  ratio = mems[1]["peak_rss_mb"] / mems[0]["peak_rss_mb"]
  result["peak_rss_ratio"] = ratio
  print(
      f"[memory] peak at N={args.mem_n[1]:,} / peak at N={args.mem_n[0]:,} = {ratio:.3f}",
      flush=True,
  )
  if args.naive_n:
    if args.naive_n != args.n:
      sel, t = run_streaming(args.naive_n, c, p, k, b, args.seed, args.pending_slots)
    (nids, ncls, nsc), tn = run_naive(args.naive_n, c, p, k, b, args.seed)
    naive_s = tn["keep_s"] + tn["sort_s"]
    nips = args.naive_n / naive_s
    same = (
        np.array_equal(nids, sel.ids)
        and np.array_equal(ncls, sel.classes)
        and np.array_equal(nsc, sel.scores)
    )
    print(
        f"[naive] N={args.naive_n:,}: keep {tn['keep_s']:.2f} s + sort {tn['sort_s']:.2f} s "
        f"-> {nips / 1e6:.3f}M images/s; streaming is {ips / nips:.1f}x faster; "
        f"same answer: {same}",
        flush=True,
    )
    if not same:
      raise SystemExit("naive and streaming selections differ")
    result.update(naive_images_per_s=nips, naive_n=args.naive_n, speedup=ips / nips)
    del nids, ncls, nsc

  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
