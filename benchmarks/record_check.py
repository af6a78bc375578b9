"""What identifying a folder of N image files costs: the first time (every file hashed,
:mod:`bssl.fileid`) and on a rerun (nothing changed: one ``stat`` and one cache lookup per
file), through the sources' own ``identity()`` (what a stage's record stores and a rerun
compares: :class:`bssl.data.sources.ImageFileSource` for U, and, with ``--labelled``,
:class:`bssl.data.sources.LabelledFolderSource`).

Files: ``--n`` tiny PNGs (default 10^6) in 1,000 folders under ``--dir`` (default
/tmp/bssl_bench_files), made once and reused by later runs: one valid 1x1 PNG with a
``tEXt`` chunk holding a counter, so every file has other bytes and the same size (~90
bytes; 4 KiB of disk each, 4 GiB at 10^6). The file-identity cache is ``<dir>/cache``,
emptied before the first identification (``BSSL_CACHE_DIR``).

    python benchmarks/record_check.py --n=100000
    python benchmarks/record_check.py            # 10^6 files

Measured: ``list_s`` (listing the folder: :func:`bssl.data.listing.list_inputs`, what
opening the source does), ``first_s`` (``identity()`` with an empty cache: every file
read and hashed), ``rerun_s`` (``identity()`` again as a new process would do it, the
process's own copy of the cache dropped: one ``stat`` per file, then the set's entry in
the SQLite cache) and ``one_touched_s`` (the same after one file's mtime was set to now:
the set's entry misses, every other file's digest is looked up in the cache, that one
file is hashed again); ``stat_only_s``, one ``os.stat`` per file and nothing else, is the
floor to compare them with (on a shared machine, the load shows in it). The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import sys
import time
import zlib

PER_FOLDER_MIN = 1000  # folders: 1000 (fewer when n is small)


def _png_template() -> tuple[bytes, bytes]:
  """(bytes before, bytes after) the tEXt chunk of a 1x1 grey PNG."""
  from PIL import Image

  buf = io.BytesIO()
  Image.new("L", (1, 1), 128).save(buf, format="PNG")
  data = buf.getvalue()
  cut = 8 + 25  # signature, IHDR chunk (length, type, 13 bytes, crc)
  return data[:cut], data[cut:]


def _chunk(i: int) -> bytes:
  body = b"tEXt" + b"id\0" + b"%010d" % i
  return struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))


def make_files(root: str, n: int) -> float:
  """``n`` PNGs under ``root`` (``f000/000000123.png``); skipped when ``root`` already
  holds them (a marker file says how many). Returns the seconds it took."""
  marker = os.path.join(root, "made.json")
  if os.path.exists(marker) and json.load(open(marker)).get("n") == n:
    return 0.0
  t = time.perf_counter()
  shutil.rmtree(os.path.join(root, "files"), ignore_errors=True)
  head, tail = _png_template()
  folders = min(1000, max(1, n // 10))
  per = -(-n // folders)
  for f in range(folders):
    d = os.path.join(root, "files", f"c{f % 2}", f"f{f:03d}")
    os.makedirs(d, exist_ok=True)
    for i in range(f * per, min(n, (f + 1) * per)):
      with open(os.path.join(d, f"{i:09d}.png"), "wb") as fh:
        fh.write(head + _chunk(i) + tail)
  json.dump({"n": n}, open(marker, "w"))
  return time.perf_counter() - t


def measure(name: str, open_source, n: int, results: dict) -> None:
  from bssl import fileid

  t = time.perf_counter()
  src = open_source()
  list_s = time.perf_counter() - t
  assert len(src) == n, (len(src), n)
  fileid.forget()
  db = os.path.join(fileid.cache_dir(), "fileid.sqlite3")
  for suffix in ("", "-wal", "-shm"):
    if os.path.exists(db + suffix):
      os.remove(db + suffix)
  fileid._cache._db = None  # reopen the (new) cache file
  t = time.perf_counter()
  first = src.identity()
  first_s = time.perf_counter() - t
  times = []
  for _ in range(2):
    fileid.forget()  # what a new process has: the SQLite cache only
    t = time.perf_counter()
    again = src.identity()
    times.append(time.perf_counter() - t)
    assert again == first, (again, first)
  rerun_s = min(times)
  t = time.perf_counter()  # the floor: one stat per file, nothing else
  for f in src.files:
    os.stat(f)
  stat_s = time.perf_counter() - t
  # one file touched (its mtime and ctime change, not its bytes): the set's entry misses,
  # every other file's digest comes from the per-file cache, the one file is hashed again
  os.utime(src.files[n // 2])
  fileid.forget()
  t = time.perf_counter()
  again = src.identity()
  touched_s = time.perf_counter() - t
  assert again == first, (again, first)
  print(
      f"{name}: {n} files: listing {list_s:.2f} s; first identification {first_s:.2f} s "
      f"({first_s / n * 1e6:.1f} us/file); rerun {rerun_s:.2f} s ({rerun_s / n * 1e6:.1f} "
      f"us/file; with the listing {list_s + rerun_s:.2f} s; one stat per file alone "
      f"{stat_s:.2f} s); rerun after one file was touched {touched_s:.2f} s "
      f"({touched_s / n * 1e6:.1f} us/file)",
      flush=True,
  )
  results[name] = {
      "list_s": round(list_s, 3),
      "first_s": round(first_s, 3),
      "rerun_s": round(rerun_s, 3),
      "per_file_us": round(rerun_s / n * 1e6, 2),
      "one_touched_s": round(touched_s, 3),
      "stat_only_s": round(stat_s, 3),
  }


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dir", default="/tmp/bssl_bench_files")
  ap.add_argument("--n", type=int, default=10**6)
  ap.add_argument("--labelled", action="store_true", help="also LabelledFolderSource")
  args = ap.parse_args(argv)
  os.makedirs(args.dir, exist_ok=True)
  os.environ["BSSL_CACHE_DIR"] = os.path.join(args.dir, "cache")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from bssl.data import sources

  made = make_files(args.dir, args.n)
  if made:  # files younger than this are not cached (bssl.fileid's "racily clean" case)
    time.sleep(2.5)
  print(f"files: {args.n} under {args.dir}/files" + (f" (made in {made:.1f} s)" if made else ""))
  files = os.path.join(args.dir, "files")
  results: dict = {}
  measure("ImageFileSource", lambda: sources.ImageFileSource(files), args.n, results)
  if args.labelled:
    measure(
        "LabelledFolderSource",
        lambda: sources.LabelledFolderSource(files, field="bench"),
        args.n,
        results,
    )
  r = results["ImageFileSource"]
  out = {
      "files": args.n,
      "list_s": r["list_s"],
      "first_s": r["first_s"],
      "rerun_s": r["rerun_s"],
      "per_file_us": r["per_file_us"],
      "one_touched_s": r["one_touched_s"],
      "stat_only_s": r["stat_only_s"],
      **({"labelled": results["LabelledFolderSource"]} if args.labelled else {}),
  }
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
