"""Write D̂'s images out as WebDataset tar shards (the library of ``bssl-reshard``,
bssl/cli/reshard.py: ``python -m bssl.reshard --workdir=<a run's work directory>
--out=<folder, local or gs://>``).

It sits with the stages because it reads a finished stage's output (``select``) and the
run's U together: data/ knows no selection and selection knows no data.

One sample per selected image (an image selected for several classes, P > 1, is one
sample), in id order, ``--shard_size`` samples per ``dhat-<n>.tar``:

- ``<id>.jpg`` / ``.png``: the image as the ingest stored it (U from ``bssl.ingest``
  shards: no re-encoding), else its pixels as a lossless PNG;
- ``<id>.json``: ``id``, the source ``key`` and ``url`` (a tar ingest's; a path
  otherwise), ``caption`` when U had one, and ``selections``: every (class, class_name,
  score, log_odds, rank) row of D̂ for the image;
- ``<id>.cls``: the class of its best-ranked row (what a classifier trains on).

Keys are the 10-digit image id (a source key may hold dots, which WebDataset readers
split on). A shard is written whole (atomically) and skipped when present, so a rerun
after a kill finishes the rest; shards are byte-identical across runs. ``dhat.parquet``
in ``<workdir>/select/`` is the same selection as a table."""

from __future__ import annotations

import io
import json
import tarfile
import time

import ml_collections
import numpy as np
from PIL import Image

from bssl import selection, storage
from bssl import workdir as workdir_lib
from bssl.data import recipe, shards


class ReshardError(ValueError):
  """A user error (exit 2)."""


def _add(tf, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), 0, 0o644
  tf.addfile(info, io.BytesIO(data))


def _source(wd: workdir_lib.Workdir):
  """(U, class names) of the run in ``wd``, from its config.json."""
  cfg = ml_collections.ConfigDict(storage.read_json(wd.config_path))
  data = recipe.build_data(cfg)
  src = (
      shards.ShardSource(cfg.unlabelled.path, channels=int(cfg.data.channels))
      if cfg.unlabelled.kind == "shards"
      else data.unlabelled
  )
  return src, list(data.class_names)


def _image_bytes(src, i: int) -> tuple[bytes, str]:
  if hasattr(src, "record_bytes"):
    data = src.record_bytes(i)
    return data, "jpg" if data[:2] == b"\xff\xd8" else "png"
  img = np.asarray(src[int(i)]["image"])
  buf = io.BytesIO()
  Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "PNG")
  return buf.getvalue(), "png"


def reshard(workdir: str, out: str, shard_size: int = 10_000, log=print) -> dict:
  """Writes the shards (those missing) under ``out``; returns the counts of images, D̂
  rows and shards. A run without a finished ``select`` raises ReshardError."""
  if shard_size < 1:
    raise ReshardError(f"--shard_size must be >= 1, got {shard_size}")
  wd = workdir_lib.Workdir(workdir)
  if wd.done("select") is None:
    raise ReshardError(
        f"--workdir {workdir}: no complete selection (select/done.json); run "
        f"the recipe's select stage first"
    )
  sel = selection.read_selection(wd.stage("select") / "dhat", mmap=False)
  src, names = _source(wd)
  order = np.lexsort((sel.ranks, sel.ids))  # by image, then its best rank first
  ids = sel.ids[order]
  images, starts = np.unique(ids, return_index=True)
  bounds = np.append(starts, len(ids))
  keys, urls = selection.image_keys(src, images)
  caps = (
      src.fields(images, "caption").astype(str)
      if hasattr(src, "fields")
      else np.full(len(images), "", dtype=object)
  )
  n_shards = -(-len(images) // shard_size)
  out_p = storage.path(out)
  t0, made = time.time(), 0
  for s in range(n_shards):
    dst = out_p / f"dhat-{s:05d}.tar"
    if dst.exists():
      continue
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
      for u in range(s * shard_size, min((s + 1) * shard_size, len(images))):
        rows = order[bounds[u] : bounds[u + 1]]
        i = int(images[u])
        data, ext = _image_bytes(src, i)
        meta = {
            "id": i,
            "key": str(keys[u]),
            "url": str(urls[u]) or None,
            "caption": str(caps[u]) or None,
            "selections": [
                {
                    "class": int(sel.classes[r]),
                    "class_name": names[int(sel.classes[r])],
                    "score": float(sel.scores[r]),
                    "log_odds": float(sel.rank_scores[r]),
                    "rank": int(sel.ranks[r]),
                }
                for r in rows
            ],
        }
        k = f"{i:010d}"
        _add(tf, f"{k}.{ext}", data)
        _add(tf, f"{k}.json", json.dumps(meta, sort_keys=True).encode())
        _add(tf, f"{k}.cls", str(meta["selections"][0]["class"]).encode())
        made += 1
    storage.write_bytes(dst, buf.getvalue())
    el = time.time() - t0
    log(f"reshard: {dst} ({s + 1}/{n_shards}), {made / max(el, 1e-9):.0f} img/s")
  log(
      f"reshard: {len(images)} images of D̂ ({len(sel.ids)} rows) in {n_shards} shard(s) "
      f"under {out}"
  )
  return {"num_images": int(len(images)), "num_rows": int(len(sel.ids)), "num_shards": n_shards}
