"""What checking an ingest costs on a rerun that reuses everything, as it grows with N:

1. ``record_check_s``: a stage's record check of an ingest it read (``unlabelled.path`` or
   ``weak.path`` of kind ``shards``, and the metadata ``<field>:captions`` /
   ``<field>:keys``): opening the :class:`bssl.data.shards.ShardSource` as the recipe does
   and its identity, then :func:`bssl.deps.identity` of the three kinds from the path, as
   :func:`bssl.deps.check_record` does. Reads ``manifest.json`` (and the duplicate and
   placeholder lists): independent of N but for those lists.
2. ``reingest_check_s``: the same ``python -m bssl.ingest`` again into the complete
   ``--out`` (in this process, its copy of the file-identity cache dropped, as a new
   process has it): listing the input, one ``stat`` per file, the digest of the files'
   versions found in the cache (:func:`bssl.fileid.stamps_digest`) with the
   ``input_content`` it gave last time: "already complete", no image read.
   ``per_file_lookups_s``: what the first such rerun (or one after a file changed) adds:
   each file's MD5 looked up in the SQLite cache (:func:`bssl.fileid.content_ids`).
3. ``resume_check_s``: what a resume of an ingest killed after its last shard costs
   before any work: the same per file, plus every finished shard's ``input_md5`` read
   and compared (``manifest.json`` moved away for the measurement, then put back).

Files: ``--n`` 1x1 PNGs (default 10^6) with a ``tEXt`` chunk holding a counter (every file
other bytes, the same size; 4 KiB of disk each), in folders of 1,000 under ``--dir``
(default /tmp/bssl_bench_ingest), made once and ingested once (both reused by a later run
with the same ``--n``; ``--fresh`` makes them again). The file-identity cache is
``<dir>/cache`` (``BSSL_CACHE_DIR``).

    python benchmarks/record_check_ingest.py --n=100000
    python benchmarks/record_check_ingest.py            # 10^6 images

The last line printed is one JSON object: ``{"images", "record_check_s",
"reingest_check_s", "resume_check_s", "ingest_s", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the same tiny PNGs as the folder benchmark (a script beside this one)
from record_check import _chunk, _png_template  # noqa: E402


def make_files(root: str, n: int) -> float:
  """``n`` PNGs under ``root/files`` (``f0000/000000123.png``), unless a marker says they
  are there. Returns the seconds it took (0 when reused)."""
  marker = os.path.join(root, "files.json")
  if os.path.exists(marker) and json.load(open(marker)).get("n") == n:
    return 0.0
  t = time.perf_counter()
  shutil.rmtree(os.path.join(root, "files"), ignore_errors=True)
  head, tail = _png_template()
  for i in range(n):
    if i % 1000 == 0:
      d = os.path.join(root, "files", f"f{i // 1000:04d}")
      os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{i:09d}.png"), "wb") as fh:
      fh.write(head + _chunk(i) + tail)
  json.dump({"n": n}, open(marker, "w"))
  return time.perf_counter() - t


def _timed(fn):
  t = time.perf_counter()
  v = fn()
  return v, time.perf_counter() - t


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dir", default="/tmp/bssl_bench_ingest")
  ap.add_argument("--n", type=int, default=10**6)
  ap.add_argument("--shard_size", type=int, default=4096)
  ap.add_argument("--fresh", action="store_true", help="make the files and the ingest again")
  args = ap.parse_args(argv)
  os.makedirs(args.dir, exist_ok=True)
  os.environ["BSSL_CACHE_DIR"] = os.path.join(args.dir, "cache")
  from bssl import deps, fileid
  from bssl.data import images, ingest
  from bssl.data.listing import list_inputs

  files, out = os.path.join(args.dir, "files"), os.path.join(args.dir, "ingest")
  if args.fresh:
    for p in (out, os.environ["BSSL_CACHE_DIR"]):
      shutil.rmtree(p, ignore_errors=True)
    if os.path.exists(os.path.join(args.dir, "files.json")):
      os.remove(os.path.join(args.dir, "files.json"))
  made = make_files(args.dir, args.n)
  if made:
    print(f"files: {args.n} made in {made:.1f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    time.sleep(fileid.RACY_SECONDS + 0.5)  # (files hashed within 2 s of a write: not cached)
  params = ingest.Params(shard_size=args.shard_size)
  ingest_s = None
  if not os.path.exists(os.path.join(out, "manifest.json")):
    _, ingest_s = _timed(lambda: ingest.run_ingest(files, out, params, log=lambda m: None))
    print(f"ingest: {args.n} images in {ingest_s:.1f} s", flush=True)

  # 1. a stage's record check of the ingest (what a rerun of a stage that read it does)
  def record_check():
    deps.forget_identities()
    src = images.open_images(out, kind="shards")
    ids = [src.identity(), src.metadata_identity("captions"), src.metadata_identity("keys")]
    now = [deps.identity(k, out) for k in ("shards", "shards_captions", "shards_keys")]
    assert ids == now, (ids, now)
    return ids

  record_check_s = min(_timed(record_check)[1] for _ in range(3))

  # 2. the ingest command again into the complete --out
  def reingest():
    fileid.forget()  # a new process has only the SQLite cache
    said = []
    ingest.run_ingest(files, out, params, log=said.append)
    assert "already complete" in said[-1], said
    return said

  reingest_check_s = min(_timed(reingest)[1] for _ in range(2))
  listed, list_s = _timed(lambda: list_inputs(files))
  fileid.forget()
  _, lookups_s = _timed(lambda: fileid.content_ids(listed))

  # 3. a resume after a kill that left every shard but no manifest: every shard checked
  mf = os.path.join(out, "manifest.json")
  os.rename(mf, mf + ".away")
  try:
    fileid.forget()
    listed = list_inputs(files)
    units = [listed[s : s + args.shard_size] for s in range(0, len(listed), args.shard_size)]
    done = set(range(len(units)))
    got, resume_check_s = _timed(lambda: ingest.check_inputs(out, units, done, log=print))
    assert got is None
  finally:
    os.rename(mf + ".away", mf)
  res = {
      "images": args.n,
      "record_check_s": round(record_check_s, 4),
      "reingest_check_s": round(reingest_check_s, 3),
      "resume_check_s": round(resume_check_s, 3),
      "list_s": round(list_s, 3),
      "per_file_lookups_s": round(lookups_s, 3),
      "reingest_per_image_us": round(reingest_check_s / args.n * 1e6, 2),
      "ingest_s": None if ingest_s is None else round(ingest_s, 1),
      "cpus": os.cpu_count(),
  }
  print(
      f"{args.n} images: record check {record_check_s * 1e3:.1f} ms; re-ingest into the "
      f"complete --out {reingest_check_s:.2f} s (listing {list_s:.2f} s; the files' MD5s "
      f"looked up one by one, as the first rerun or one after a change does: "
      f"{lookups_s:.2f} s more); resume check of every shard {resume_check_s:.2f} s",
      flush=True,
  )
  print(json.dumps(res))
  return res


if __name__ == "__main__":
  main()
