"""Evaluation images kept out of D̂: before U is scored, every image of U that is a
near-duplicate (:mod:`bssl.data.neardup`) of a test or validation image is excluded (it is
never scored, so it cannot enter D̂) and listed with the matched image; near-duplicates of
D are listed separately (they stay in U: a copy of a labelled image teaches nothing
wrong, but the user may want to know). Done once, by process 0, at the start of the score
stage (``<score>/eval_copies.npz``: resumable, and part of the stage's output);
``score.eval_copies`` = ``exclude`` (default) or ``off``; ``score.copy_threshold`` the
similarity from which an image is a copy."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil

from bssl import parallel, procs, progress, storage
from bssl.data import neardup, sources

SPLITS = ("test", "val", "labelled")
MAX_D = 200_000  # D bigger than this (ImageNet's 1.28M) is not searched for copies


def _images(src, ids):
  for i in ids:
    rec = src[int(i)]
    if rec.get("valid", True):
      yield int(i), np.asarray(rec["image"])


BLOCK = 4096
CHUNK = 16  # blocks per part file: a process killed mid-way redoes at most one part
THREADS = procs.num_cores()  # matching threads per process: the cores it may use


def _part(folder, pi: int, pc: int, chunk: int):
  return folder / f"p{pi:05d}-of-{pc:05d}-c{chunk:06d}.npz"


def check_memory(num_images: int, available: int | None = None) -> None:
  """Refuses (DataError, with the figures) evaluation sets whose index would not fit in
  half of this host's available memory: about :data:`neardup.BYTES_PER_IMAGE` per image."""
  need = num_images * neardup.BYTES_PER_IMAGE
  if available is None:
    available = psutil.virtual_memory().available
  if need > available // 2:
    raise sources.DataError(
        f"eval copies: {num_images:,} evaluation images need about {need / 2**30:.1f} GiB "
        f"for their index ({neardup.BYTES_PER_IMAGE // 1024} KiB each), "
        f"more than half of this host's {available / 2**30:.1f} GiB available; set "
        f"score.eval_copies=off or use hosts with more memory"
    )


def search_block(indexes, images, map_=map) -> dict:
  """The copies among one block of U: ``images`` ((id, uint8 image) pairs) against
  ``indexes`` ((split, evaluation ids, neardup.Index) triples); returns the arrays ``id``,
  ``split``, ``match`` and ``similarity`` of every copy found. A pure function of its
  inputs (no files, no processes): any executor may run blocks in any order and merge what
  they return (:func:`merge`); ``map_`` spreads the block over threads (``pool.map``)."""
  got = list(images)
  out = {k: [] for k in ("id", "split", "match", "similarity")}
  if got:
    ids_u, imgs_u = zip(*got)
    n = max(1, min(THREADS, len(imgs_u)))
    for split, eids, index in indexes:
      parts = list(map_(index.match, [imgs_u[j::n] for j in range(n)]))
      sim = np.empty(len(imgs_u), np.float32)
      idx = np.empty(len(imgs_u), np.int64)
      copy = np.empty(len(imgs_u), bool)
      for j, m in enumerate(parts):
        sim[j::n], idx[j::n], copy[j::n] = m.similarity, m.index, m.copy
      hit = np.flatnonzero(copy)
      out["id"] += [ids_u[h] for h in hit]
      out["split"] += [split] * len(hit)
      out["match"] += np.asarray(eids)[idx[hit]].tolist()
      out["similarity"] += sim[hit].tolist()
  return {k: np.asarray(v, np.float32 if k == "similarity" else np.int64) for k, v in out.items()}


def merge(parts) -> dict:
  """The blocks' results (:func:`search_block`) as one, ordered by U id then split: the
  same whatever order or grouping the blocks ran in."""
  keys = ("id", "split", "match", "similarity")
  parts = list(parts)
  if not parts:
    return {k: np.zeros(0, np.float32 if k == "similarity" else np.int64) for k in keys}
  out = {k: np.concatenate([p[k] for p in parts]) for k in keys}
  o = np.lexsort((out["split"], out["id"]))
  return {k: v[o] for k, v in out.items()}


def find(ctx, folder) -> dict:
  """Each process matches its share of U (blocks of 4,096 ids, every process-count-th)
  against indexes of the test, validation and D images, into part files of 16 blocks
  ``<folder>/p<i>-of-<n>-c<chunk>.npz`` (kept: a rerun or a resume after a kill computes
  only the missing parts), with progress lines (rate, ETA); then every process reads them
  all. Returns, for each image of U that matched, its ``id``, the ``split`` of the
  evaluation image (0 test, 1 validation, 2 D), that image's id in its split (``match``)
  and the ``similarity``. Memory: the indexes (about :data:`neardup.BYTES_PER_IMAGE` an
  evaluation image, its fine views rendered once among them) and one block of U."""
  cfg = ctx.cfg
  pi, pc = parallel.process_index(), parallel.process_count()
  if pi == 0:  # parts of a run with another process count (resumed on other hosts)
    for name in storage.listdir(folder):
      if f"-of-{pc:05d}" not in name:
        (folder / name).unlink()
  unl = ctx.data.unlabelled
  blocks = list(range(pi * BLOCK, len(unl), pc * BLOCK))
  chunks = [blocks[c : c + CHUNK] for c in range(0, len(blocks), CHUNK)]
  whole = folder / f"p{pi:05d}-of-{pc:05d}.npz"  # one part per process (bssl <= 0.4.0)
  todo = (
      []
      if whole.exists()
      else [c for c in range(len(chunks)) if not _part(folder, pi, pc, c).exists()]
  )
  if todo:
    thr = float(cfg.score.copy_threshold)
    t0 = time.time()
    searched = []  # (split, name, source) of every set whose copies are searched
    for split, name in enumerate(SPLITS):
      src = getattr(ctx.data, name)
      if src is None or len(src) == 0:
        if name != "labelled":
          ctx.log(f"eval copies: the {name} split is empty: no copies of it to search for")
      elif name == "labelled" and len(src) > MAX_D:
        ctx.log(
            f"eval copies: D has {len(src)} images (> {MAX_D}); its copies in U are not "
            f"searched"
        )
      else:
        searched.append((split, name, src))
    check_memory(sum(len(src) for _, _, src in searched))
    indexes = []
    for split, name, src in searched:
      got = list(_images(src, range(len(src))))
      if not got:
        ctx.log(f"eval copies: no {name} image could be read: none to search for")
        continue
      eids, eimgs = zip(*got)
      indexes.append((split, np.asarray(eids), neardup.Index(eimgs, threshold=thr)))
    against = ", ".join(f"{len(e)} {SPLITS[s]}" for s, e, _ in indexes)
    total = sum(min(BLOCK, len(unl) - b) for c in todo for b in chunks[c])
    ctx.log(
        f"eval copies: {total} images of U (this process; "
        f"{len(chunks) - len(todo)} of {len(chunks)} parts done earlier) against "
        f"{against} images (index {time.time() - t0:.0f} s)"
    )

    done, t1, t_log = 0, time.time(), time.time()
    with ThreadPoolExecutor(THREADS) as pool:
      for c in todo:
        found = {"id": [], "split": [], "match": [], "similarity": []}
        for a in chunks[c]:
          ids = range(a, min(a + BLOCK, len(unl)))
          for k, v in search_block(indexes, _images(unl, ids), pool.map).items():
            found[k] += v.tolist()
          done += len(ids)
          now = time.time()
          if now - t_log >= 30 or done == total:
            t_log, rate = now, done / max(now - t1, 1e-9)
            ctx.log(
                f"eval copies: {done}/{total} images of U (this process) "
                f"({100 * done / max(total, 1):.0f}%) {rate:.0f} img/s eta "
                f"{progress.eta(done, total, now - t1)}"
            )
        storage.write_npz(
            _part(folder, pi, pc, c),
            **{
                k: np.asarray(v, np.float32 if k == "similarity" else np.int64)
                for k, v in found.items()
            },
        )
  parallel.sync("bssl_eval_copies")
  return read(folder, pc)


def read(folder, pc: int) -> dict:
  """Every part of a run by ``pc`` processes (one per process, or per 16 blocks)."""
  names = sorted(n for n in storage.listdir(folder) if n.endswith(".npz") and f"-of-{pc:05d}" in n)
  return merge(storage.read_npz(folder / n) for n in names)


def read_done(folder, num_processes: int) -> dict | None:
  """The matches of a finished score stage run by ``num_processes`` processes (its
  done.json says), or None when it did not search for copies."""
  if not storage.listdir(folder):
    return None
  return read(folder, int(num_processes))


def excluded(found: dict) -> dict[int, str]:
  """id -> reason of the U images kept out of scoring: the best test/validation match of
  each (copies of D stay)."""
  out, best = {}, {}
  for i, s, e, v in zip(
      found["id"].tolist(),
      found["split"].tolist(),
      found["match"].tolist(),
      found["similarity"].tolist(),
  ):
    if s < 2 and v > best.get(i, -1.0):
      best[i] = v
      out[i] = (
          f"near-duplicate of {SPLITS[s]} image {e} (similarity {v:.3f}); kept out "
          f"of D̂ so that the {'test' if s == 0 else 'validation'} accuracy is honest"
      )
  return out


class Excluding:
  """U with some images made invalid (never scored), each with its reason."""

  def __init__(self, source, reasons: dict[int, str]):
    self.source, self.reasons = source, reasons
    self.excluded = np.fromiter(sorted(reasons), np.int64, len(reasons))  # for take()

  def __len__(self):
    return len(self.source)

  def __getattr__(self, name):
    if name.startswith("__") or name in ("source", "reasons", "excluded"):
      raise AttributeError(name)  # (unpickling in decode workers: not set yet)
    return getattr(self.source, name)

  def __getitem__(self, i):
    rec = self.source[i]
    if int(i) in self.reasons:
      rec = dict(rec, valid=False)
    return rec

  def take(self, positions):
    """The source's batched rows with the excluded ones made invalid (or None)."""
    inner = getattr(self.source, "take", None)
    rows = inner(positions) if inner is not None else None
    if rows is not None:
      rows = dict(rows)
      rows["valid"] = rows["valid"] & ~np.isin(np.asarray(positions, np.int64), self.excluded)
    return rows

  def reason_of(self, i) -> str:
    r = self.reasons.get(int(i))
    if r is not None:
      return r
    return (
        self.source.reason_of(i)
        if hasattr(self.source, "reason_of")
        else ("cannot be made the model's input")
    )


def summary(found: dict) -> dict:
  """Counts for done.json and the report: U images kept out by split, and D's copies."""
  ex = excluded(found)
  split = found["split"]
  return {
      "num_removed": len(ex),
      "removed_by_split": {SPLITS[s]: int(len(np.unique(found["id"][split == s]))) for s in (0, 1)},
      "num_copies_of_labelled": int(len(np.unique(found["id"][split == 2]))),
  }
