"""Ingest U once: image files -> ArrayRecord shards of images re-encoded at a working size,
with a manifest; and :class:`ShardSource`, the scoring stage's view of the shards.

Layout of the output folder (local or ``gs://``)::

  ingest.json                 parameters, the input's fingerprint, N, shard size
  shards/u-00000.array_record record j = JPEG bytes of image id s*S + j ("" = bad file)
  shards/u-00000.npz          the shard's manifest: original path, original size, stored
                              size, content hash (blake2b-128 of the file), bad reason
  bad.json                    [{"id", "path", "reason"}] for files that cannot be decoded
  duplicates.npz              ids whose content equals an earlier id's: (ids, first)
  manifest.json               counts; written when every shard is complete

Ids are positions in the input list sorted as whole path strings (:func:`list_inputs`: the
same for a folder, a file list of its files and a ``gs://`` copy of it; stable across runs
and hosts). Shard ``s``
holds ids ``[s*S, (s+1)*S)``; process ``i`` of ``n`` ingests shards ``i, i+n, ...``. A
shard is complete when its ``.npz`` exists: it is written after the ``.array_record``, so a
killed ingest leaves each shard complete or absent, and a rerun makes only the missing
ones (byte-identical to what an uninterrupted run writes: encoding is deterministic).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from bssl import workdir as workdir_lib
from bssl.data import decode as decode_lib

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# 2: ids are positions in the whole-path-sorted list (1: a local folder's ids followed its
# per-folder walk, so ``a/b.jpg`` came before ``a.jpg``; file lists and gs:// did not).
FORMAT_VERSION = 2
_FORMAT_CHANGE = (
    "the id rule changed in format 2: ids are now positions in the input "
    "list sorted as whole paths, so an input folder's ids may differ"
)
_GREY = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class IngestError(ValueError):
  """A user error of the ingest command or of reading its output (exit 2)."""


@dataclasses.dataclass(frozen=True)
class Params:
  short_side: int = 256
  quality: int = 90
  shard_size: int = 4096
  placeholder_min: int = 100

  def check(self):
    if self.placeholder_min != 0 and self.placeholder_min < 2:
      raise IngestError(
          f"--placeholder_min must be 0 (off) or >= 2 (images sharing one "
          f"content hash to be flagged as placeholders), got "
          f"{self.placeholder_min}"
      )
    if not 16 <= self.short_side <= 4096:
      raise IngestError(f"--short_side must be in 16..4096, got {self.short_side}")
    if not 1 <= self.quality <= 100:
      raise IngestError(f"--quality must be in 1..100 (JPEG quality), got {self.quality}")
    if self.shard_size < 1:
      raise IngestError(f"--shard_size must be >= 1, got {self.shard_size}")


# ------------------------------------------------------------------------------ input list


def _walk_local(root: str, extensions) -> list[str]:
  """Files under ``root`` (following symlinked folders, each real folder once), relative,
  in walk order (:func:`list_inputs` sorts them)."""
  out, seen = [], set()

  def walk(d: str, rel: str):
    real = os.path.realpath(d)
    if real in seen:  # a symlink loop, or a folder linked twice
      return
    seen.add(real)
    try:
      entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
      return
    for e in entries:
      r = f"{rel}{e.name}"
      if e.is_dir(follow_symlinks=True):
        walk(e.path, r + "/")
      elif _wanted(e.name, extensions) and (
          e.is_file(follow_symlinks=True) or not os.path.exists(e.path)
      ):
        out.append(r)  # (a dangling link is kept: listed as bad, with its reason)

  walk(root, "")
  return out


def _wanted(name: str, extensions) -> bool:
  return extensions is None or name.lower().endswith(tuple(extensions))


def list_inputs(input_path: str, extensions=EXTENSIONS) -> list[str]:
  """The image paths of ``input_path``: a folder (recursive, local or gs://) or a text file
  with one path per line (relative to the list's folder). ``extensions=None`` takes every
  file of a folder.

  One order, on which every image id rests (ids are positions in this list): paths sorted
  as whole strings (Python's order: by code point). A folder's files are sorted by their
  path relative to the folder (``a.jpg`` before ``a/b.jpg``, as ``.`` < ``/``; not the
  walk's folder-by-folder order); a file list's lines are resolved (joined to the list's
  folder, local paths normalised: ``./x`` and ``d/../x`` are ``x``) and the resolved paths
  sorted. So a folder, a list of its files written relative to it (in any order) and a
  ``gs://`` copy of it give the same ids; a tags file "in id order" is in this order."""
  p = workdir_lib.path(input_path)
  if not p.exists():
    raise IngestError(
        f"--input: {input_path!r} does not exist. Accepted: a folder of images "
        f"(searched recursively) or a text file listing one path per line."
    )
  if p.is_dir():
    if workdir_lib.is_remote(input_path):
      # one paginated listing of the prefix (epath refuses recursive globs on GCS)
      import fsspec

      fs, root = fsspec.core.url_to_fs(str(p))
      proto = str(p).split("://", 1)[0]
      files = sorted(
          f"{proto}://{f}" for f in fs.find(root) if _wanted(f.rsplit("/", 1)[-1], extensions)
      )
    else:
      root = str(p)
      files = [os.path.join(root, r) for r in sorted(_walk_local(root, extensions))]
  else:
    base = str(p.parent)
    remote_base = workdir_lib.is_remote(base)
    files = []
    try:
      text = p.read_text()
    except UnicodeDecodeError:
      raise IngestError(
          f"--input: {input_path!r} is a file but not a text list of paths "
          f"(one per line); give the folder that holds it, or a list"
      ) from None
    for line in text.splitlines():
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      if "://" in line:
        files.append(line)
      elif line.startswith("/"):
        files.append(os.path.normpath(line))
      elif remote_base:
        files.append(base.rstrip("/") + "/" + line)
      else:
        files.append(os.path.normpath(os.path.join(base, line)))
    files.sort()
  if not files:
    raise IngestError(
        f"--input: no image files in {input_path!r} (extensions "
        f"{', '.join(extensions or ['any'])})"
    )
  return files


def fingerprint(files: Sequence[str]) -> str:
  h = hashlib.sha256()
  for f in files:
    h.update(f.encode("utf-8", "surrogateescape") + b"\0")
  return h.hexdigest()[:32]


# ------------------------------------------------------------------------------ one image


def encode_one(data: bytes, params: Params) -> tuple[bytes, tuple, tuple]:
  """(stored bytes, original (h, w), stored (h, w)) of one file's bytes:

  - a JPEG already at most ``short_side`` on its short side, L or RGB, not EXIF-rotated:
    stored as it is (no generation loss; it decodes to exactly the original's pixels);
  - any other image at most ``short_side``: decoded (EXIF orientation, mode conversion)
    and stored as a lossless PNG (exactly the pixels the original decodes to);
  - a bigger image: decoded (with JPEG DCT downscaling), scaled so its short side is
    ``short_side``, stored as JPEG at ``quality``.

  Greyscale sources stay greyscale (L); everything else becomes RGB. Raises DecodeError."""
  info = _probe(data)
  if (
      info
      and info["format"] == "JPEG"
      and info["mode"] in ("L", "RGB")
      and info["orientation"] == 1
      and min(info["size"]) <= params.short_side
  ):
    decode_lib.open_image(data, 1 if info["mode"] == "L" else 3)  # it must decode
    w, h = info["size"]
    return data, (h, w), (h, w)
  channels = 1 if info and info["mode"] in _GREY else 3
  im = decode_lib.open_image(data, channels, short_side=params.short_side)
  w, h = info["size"] if info else im.size
  if info and info["orientation"] in (5, 6, 7, 8):
    w, h = h, w  # rotated by a quarter turn
  buf = io.BytesIO()
  if min(im.size) <= params.short_side:
    # no scaling needed, but a rotation or mode conversion (or not a JPEG): lossless PNG
    # keeps exactly the pixels the original decodes to (rare in photo collections)
    im.save(buf, "PNG", compress_level=1)
  else:
    im = decode_lib.resize_short_side(im, params.short_side)
    im.save(buf, "JPEG", quality=params.quality)
  return buf.getvalue(), (h, w), (im.size[1], im.size[0])


def _probe(data: bytes) -> dict | None:
  """Format, mode, size and EXIF orientation from the header (no pixel decoding)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      try:
        orientation = int(im.getexif().get(0x0112, 1))
      except Exception:
        orientation = 1
      return {"format": im.format, "mode": im.mode, "size": im.size, "orientation": orientation}
  except Exception:
    return None


def content_hash(data: bytes) -> bytes:
  return hashlib.blake2b(data, digest_size=16).digest()


# ------------------------------------------------------------------------------ shards


def shard_name(s: int) -> str:
  return f"u-{s:05d}"


def _writer_options() -> str:
  return "group_size:1"  # random access: one record per chunk


def ingest_shard(files: Sequence[str], first_id: int, params: Params, out, s: int) -> dict:
  """Writes shard ``s`` (``files`` = its inputs, ids from ``first_id``): the array_record,
  then its manifest npz. Returns counts."""
  from array_record.python import array_record_module as ar

  out = workdir_lib.path(out)
  n = len(files)
  orig = np.zeros((n, 2), np.int32)
  stored = np.zeros((n, 2), np.int32)
  hashes = np.zeros((n, 16), np.uint8)
  reasons = [""] * n
  with tempfile.TemporaryDirectory(prefix="bssl_ingest_") as tmp:
    local = os.path.join(tmp, "shard.array_record")
    w = ar.ArrayRecordWriter(local, _writer_options())
    try:
      for j, f in enumerate(files):
        rec = b""
        try:
          data = decode_lib.read_bytes(f)
          hashes[j] = np.frombuffer(content_hash(data), np.uint8)
          rec, orig[j], stored[j] = encode_one(data, params)
        except decode_lib.DecodeError as e:
          reasons[j] = e.reason
        w.write(rec)
    finally:
      w.close()
    with open(local, "rb") as fh:
      workdir_lib.write_bytes(out / "shards" / f"{shard_name(s)}.array_record", fh.read())
  workdir_lib.write_npz(
      out / "shards" / f"{shard_name(s)}.npz",
      ids=np.arange(first_id, first_id + n, dtype=np.int64),
      path=np.asarray(files, dtype=str),
      orig_hw=orig,
      stored_hw=stored,
      hash=hashes,
      reason=np.asarray(reasons, dtype=str),
  )
  return {"images": n, "bad": sum(1 for r in reasons if r)}


def _shard_done(out, s: int) -> bool:
  return (workdir_lib.path(out) / "shards" / f"{shard_name(s)}.npz").exists()


def _done_shards(out) -> set[int]:
  d = workdir_lib.path(out) / "shards"
  if not d.exists():
    return set()
  done = set()
  for name in workdir_lib.listdir(d):
    if name.startswith("u-") and name.endswith(".npz"):
      done.add(int(name[2:-4]))
  return done


def _header(files, params: Params) -> dict:
  n = len(files)
  return {
      "format_version": FORMAT_VERSION,
      "num_images": n,
      "input_fingerprint": fingerprint(files),
      "short_side": params.short_side,
      "quality": params.quality,
      "shard_size": params.shard_size,
      "num_shards": -(-n // params.shard_size),
      "encoding": "jpeg",
      "writer_options": _writer_options(),
      "placeholder_min": params.placeholder_min,
  }


def check_or_write_header(out, header: dict, write: bool) -> None:
  """Refuses an output folder made from another input or with other parameters."""
  p = workdir_lib.path(out) / "ingest.json"
  if p.exists():
    old = workdir_lib.read_json(p)
    if old.get("format_version") != header["format_version"]:
      raise IngestError(
          f"--out {out} holds an ingest of format {old.get('format_version')}, "
          f"this bssl writes format {header['format_version']} "
          f"({_FORMAT_CHANGE}); use another --out, or delete it to ingest again"
      )
    diff = {k: (old.get(k), v) for k, v in header.items() if old.get(k) != v}
    if diff:
      what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
      raise IngestError(
          f"--out {out} holds an ingest of another input or with other "
          f"parameters ({what}); use another --out, or delete it to redo it"
      )
  elif write:
    workdir_lib.write_json(p, header)


def _content_digest(header: dict, shard_hashes) -> str:
  """blake2b-128 (hex) of what the shards' pixels are a function of: the ingest parameters
  (format, short side, quality) and every id's content hash [n, 16], in id order (a file
  that could not be read: zeros)."""
  h = hashlib.blake2b(digest_size=16)
  h.update(
      f"format={header['format_version']}:short={header['short_side']}:"
      f"q={header['quality']}:n={header['num_images']}:"
      f"placeholders={header.get('placeholder_min')}\n".encode()
  )
  for a in shard_hashes:
    h.update(np.ascontiguousarray(a, np.uint8).tobytes())
  return h.hexdigest()


def content_digest(out, num_shards: int) -> str:
  """The complete ingest's ``content_digest`` (``manifest.json`` holds it), recomputed from
  its shards' manifests: the same images (by content, in the same id order) ingested with
  the same parameters have the same digest, wherever they are and whatever their names."""
  out = workdir_lib.path(out)
  header = workdir_lib.read_json(out / "manifest.json")
  return _content_digest(
      header,
      (
          workdir_lib.read_npz(out / "shards" / f"{shard_name(s)}.npz", keys=("hash",))["hash"]
          for s in range(int(num_shards))
      ),
  )


def shard_offsets(out, header: dict) -> np.ndarray:
  """[num_shards + 1] first id of each shard (and N): ``s * shard_size`` for an ingest of
  files; from each shard's length for tar shards (one output shard per input tar)."""
  ns = int(header["num_shards"])
  if header.get("shard_size"):
    n = int(header["num_images"])
    return np.minimum(np.arange(ns + 1, dtype=np.int64) * int(header["shard_size"]), n)
  out = workdir_lib.path(out)
  sizes = [
      len(workdir_lib.read_npz(out / "shards" / f"{shard_name(s)}.npz", keys=("hash",))["hash"])
      for s in range(ns)
  ]
  return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _part_path(out, k: int, n: int):
  return workdir_lib.path(out) / "dedup" / f"part-{k:05d}-of-{n:05d}.npz"


def dedup_partition(out, header: dict, offsets: np.ndarray, k: int, n: int) -> dict:
  """Exact duplicates among the images whose content hash falls in partition ``k`` of
  ``n`` (its first 8 bytes, as an integer, mod ``n``): every copy of one content lands in
  one partition, so each is complete on its own. Reads every shard's manifest one at a
  time and keeps only its partition's (id, hash) pairs: memory O(N / n). A content shared
  by ``placeholder_min`` or more images (a dead-link placeholder) makes all of them bad,
  not duplicates. Written to ``dedup/part-<k>-of-<n>.npz``."""
  ids, hs = [], []
  for s in range(int(header["num_shards"])):
    # only the two columns needed (not paths, urls, captions): read in place
    m = workdir_lib.read_npz(
        workdir_lib.path(out) / "shards" / f"{shard_name(s)}.npz", keys=("hash", "reason")
    )
    h = np.ascontiguousarray(m["hash"]).view(">u8").reshape(-1, 2)
    sel = (m["reason"] == "") & (h[:, 0] % np.uint64(n) == k)
    ids.append(offsets[s] + np.flatnonzero(sel))
    hs.append(h[sel])
  ids = np.concatenate(ids).astype(np.int64)
  h = np.concatenate(hs) if hs else np.zeros((0, 2), ">u8")
  order = np.lexsort((ids, h[:, 1], h[:, 0]))
  hs_, i_sorted = h[order], ids[order]
  new_group = np.ones(len(order), bool)
  new_group[1:] = np.any(hs_[1:] != hs_[:-1], axis=1)
  starts = np.flatnonzero(new_group)
  sizes = np.diff(np.append(starts, len(order)))
  group = np.cumsum(new_group) - 1
  first = i_sorted[starts][group]
  pmin = int(header.get("placeholder_min") or 0)
  placeholder = (sizes[group] >= pmin) if pmin else np.zeros(len(order), bool)
  dup = ~new_group & ~placeholder
  part = {
      "dup_ids": i_sorted[dup],
      "dup_first": first[dup],
      "placeholder_ids": i_sorted[placeholder],
      "placeholder_count": sizes[group][placeholder].astype(np.int64),
      "placeholder_first": first[placeholder],
  }
  workdir_lib.write_npz(_part_path(out, k, n), **part)
  return part


def _all_shards_done(out, header) -> bool:
  return len(_done_shards(out)) == int(header["num_shards"])


def finalize(out, header: dict, n_parts: int = 1, log: Callable[[str], None] = print) -> dict:
  """duplicates.npz, placeholders.npz, bad.json and manifest.json (with
  :func:`content_digest`) from every shard's manifest and the ``n_parts`` dedup
  partitions (computing the missing ones). Deterministic: any process may write them, with
  the same bytes."""
  out = workdir_lib.path(out)
  offsets = shard_offsets(out, header)
  header = dict(header, num_images=int(offsets[-1]))
  if header["num_images"] == 0:
    errs = [
        str(workdir_lib.read_npz(out / "shards" / f"{shard_name(s)}.npz")["tar_error"])
        for s in range(int(header["num_shards"]))
    ]
    errs = [e for e in errs if e]
    raise IngestError(
        "--input holds no image (no sample, or every sample's json status "
        "is not success)" + (f"; {len(errs)} tar shard(s) are damaged: {errs[0]}" if errs else "")
    )
  parts = []
  for k in range(n_parts):
    p = _part_path(out, k, n_parts)
    parts.append(
        workdir_lib.read_npz(p) if p.exists() else dedup_partition(out, header, offsets, k, n_parts)
    )
  cat = {key: np.concatenate([q[key] for q in parts]) for key in parts[0]}
  o = np.argsort(cat["dup_ids"], kind="stable")
  workdir_lib.write_npz(
      out / "duplicates.npz",
      ids=cat["dup_ids"][o].astype(np.int64),
      first=cat["dup_first"][o].astype(np.int64),
  )
  o = np.argsort(cat["placeholder_ids"], kind="stable")
  ph = {k: cat[f"placeholder_{k}"][o].astype(np.int64) for k in ("ids", "count", "first")}
  workdir_lib.write_npz(out / "placeholders.npz", **ph)
  ph_of = dict(zip(ph["ids"].tolist(), zip(ph["count"].tolist(), ph["first"].tolist())))
  bad, all_hashes, num_ok, skipped, tar_errors = [], [], 0, 0, []
  for s in range(int(header["num_shards"])):
    m = workdir_lib.read_npz(out / "shards" / f"{shard_name(s)}.npz")
    all_hashes.append(m["hash"])
    ids = offsets[s] + np.arange(len(m["hash"]), dtype=np.int64)
    skipped += int(m["skipped"]) if "skipped" in m else 0
    if "tar_error" in m and str(m["tar_error"]):
      tar_errors.append(str(m["tar_error"]))
    # vectorised: only the bad and placeholder rows are visited in Python (10^9 ids)
    failed = m["reason"] != ""
    placeholder = ~failed & np.isin(ids, ph["ids"])
    num_ok += int((~failed & ~placeholder).sum())
    for j in np.flatnonzero(failed | placeholder).tolist():
      i, path = int(ids[j]), str(m["path"][j])
      if failed[j]:
        bad.append({"id": i, "path": path, "reason": str(m["reason"][j])})
      else:
        c, f = ph_of[i]
        bad.append(
            {
                "id": i,
                "path": path,
                "reason": f"placeholder: the same content as "
                f"{c - 1} other images (first id {f}), as a dead link's placeholder is",
            }
        )
  bad.sort(key=lambda b: b["id"])
  workdir_lib.write_json(out / "bad.json", bad)
  ndup = int(len(cat["dup_ids"]))
  manifest = dict(
      header,
      num_ok=num_ok,
      num_bad=len(bad),
      num_duplicates=ndup,
      num_placeholders=int(len(ph["ids"])),
      num_skipped=skipped,
      tar_errors=tar_errors,
      shard_offsets=offsets.tolist(),
      content_digest=_content_digest(header, all_hashes),
  )
  workdir_lib.write_json(out / "manifest.json", manifest)
  log(
      f"ingest: complete: {header['num_images']} images, {len(bad)} bad (listed in "
      f"{out / 'bad.json'}; {len(ph['ids'])} of them placeholders), {ndup} exact "
      f"duplicates ({out / 'duplicates.npz'})"
      + (f", {skipped} samples skipped (json status not success)" if skipped else "")
      + (f"; {len(tar_errors)} damaged tar shard(s): {tar_errors[0]}" if tar_errors else "")
  )
  return manifest


def _eta(done: float, total: float, elapsed: float) -> str:
  """Time left for ``total`` units of work at the rate ``done`` of them took ``elapsed``."""
  eta = (total - done) / max(done / max(elapsed, 1e-9), 1e-9)
  return f"{int(eta) // 60}m{int(eta) % 60:02d}s"


def run_ingest(
    input_path: str,
    out: str,
    params: Params = Params(),
    *,
    process_index: int = 0,
    process_count: int = 1,
    extensions=EXTENSIONS,
    log: Callable[[str], None] = print,
    stop_after_shards: int | None = None,
    wait_for_others: bool = False,
    poll_s: float = 2.0,
) -> dict:
  """Ingests this process's shards of ``input_path`` (image files, or WebDataset tar
  shards: :mod:`bssl.data.webdataset`) into ``out``. Then exact duplicates are found
  partitioned by content hash, one partition per process (memory O(N / processes)):
  with ``wait_for_others`` (the CLI's default: processes run together) each process waits
  for every shard, does its own partition, and the last one writes the manifest; without
  it, a process that finds shards of others missing stops there, and the process that
  finds every shard complete does the partitions left. ``stop_after_shards`` (tests)
  simulates a kill."""
  from bssl.data import webdataset

  params.check()
  if not 0 <= process_index < process_count:
    raise IngestError(f"process index {process_index} is not in [0, {process_count})")
  try:
    tars = webdataset.tar_inputs(input_path)
  except webdataset.TarInputError as e:
    raise IngestError(str(e)) from None
  tar = tars is not None
  if tar:
    stats = [webdataset.tar_stat(t) for t in tars]  # (size, mtime) of each, once
    header = _tar_header(tars, stats, params)
    units = tars
  else:
    files = list_inputs(input_path, extensions)
    header = _header(files, params)
    size = params.shard_size
    units = [files[s * size : (s + 1) * size] for s in range(header["num_shards"])]
  check_or_write_header(out, header, write=(process_index == 0))
  if process_index != 0:  # wait for process 0's header, then check it
    for _ in range(600):
      if (workdir_lib.path(out) / "ingest.json").exists():
        break
      time.sleep(0.1)
    check_or_write_header(out, header, write=False)
  ns = header["num_shards"]
  done = _done_shards(out)
  mine = [s for s in range(process_index, ns, process_count) if s not in done]
  if tar:
    work, unit = [stats[s][0] for s in mine], "bytes"
  else:
    work, unit = [len(units[s]) for s in mine], "images"
  total = sum(work)
  log(
      f"ingest: {('%d tar shard(s)' % ns) if tar else ('%d images in %d shard(s) of %d' % (len(files), ns, params.shard_size))}; "
      f"process {process_index} of {process_count}: {len(mine)} shard(s) to write "
      f"({total} {unit}), {len(done)} shard(s) already complete"
  )
  t0, made, bad, progress = time.time(), 0, 0, 0
  for c, s in enumerate(mine):
    if stop_after_shards is not None and c >= stop_after_shards:
      return {"interrupted": True}
    if tar:
      got = ingest_tar_shard(tars[s], params, out, s)
    else:
      got = ingest_shard(units[s], s * params.shard_size, params, out, s)
    made += got["images"]
    bad += got["bad"]
    progress += work[c]
    el = time.time() - t0
    log(
        f"ingest: shard {s} done ({c + 1}/{len(mine)} of this process), {made} images, "
        f"{bad} bad, {made / max(el, 1e-9):.0f} img/s, {progress}/{total} {unit}, eta "
        f"{_eta(progress, total, el)}"
    )
  if wait_for_others and process_count > 1:
    told = 0.0
    while not _all_shards_done(out, header):
      if time.time() - told > 60:
        log(
            f"ingest: process {process_index} waiting for "
            f"{ns - len(_done_shards(out))} shard(s) of other processes"
        )
        told = time.time()
      time.sleep(poll_s)
  if not _all_shards_done(out, header):
    log(
        f"ingest: process {process_index} done; {ns - len(_done_shards(out))} shard(s) of "
        f"other processes remain (the last process to finish writes manifest.json)"
    )
    return dict(header, complete=False)
  offsets = shard_offsets(out, header)
  full = dict(header, num_images=int(offsets[-1]))
  n_parts = process_count
  if not _part_path(out, process_index, n_parts).exists():
    dedup_partition(out, full, offsets, process_index, n_parts)
  if wait_for_others and n_parts > 1:
    while not all(_part_path(out, k, n_parts).exists() for k in range(n_parts)):
      time.sleep(poll_s)
    if process_index != 0:
      return dict(full, complete=True)  # process 0 writes the manifest
  return finalize(out, header, n_parts, log)


def _tar_header(tars, stats, params: Params) -> dict:
  """ingest.json of tar input: the shards' paths, sizes and mtimes (``stats``) identify it."""
  h = hashlib.sha256()
  for t, (size, mtime) in zip(tars, stats):
    h.update(f"{t}\0{size}\0{mtime}\0".encode("utf-8", "surrogateescape"))
  return {
      "format_version": FORMAT_VERSION,
      "input_kind": "webdataset",
      "num_images": None,
      "input_fingerprint": h.hexdigest()[:32],
      "short_side": params.short_side,
      "quality": params.quality,
      "shard_size": None,
      "num_shards": len(tars),
      "encoding": "jpeg",
      "writer_options": _writer_options(),
      "placeholder_min": params.placeholder_min,
  }


def ingest_tar_shard(tar_path: str, params: Params, out, s: int) -> dict:
  """Writes output shard ``s`` from input tar shard ``tar_path``: one record per sample
  (stream order) whose json status, if any, is ``success``; then its manifest npz (key,
  url, caption, sizes, content hash, bad reason, the count of skipped samples and the
  tar's damage, if any)."""
  from array_record.python import array_record_module as ar

  from bssl.data import webdataset

  out = workdir_lib.path(out)
  keys, urls, captions, reasons, paths = [], [], [], [], []
  orig, stored, hashes = [], [], []
  skipped, errors = 0, []
  with tempfile.TemporaryDirectory(prefix="bssl_ingest_") as tmp:
    local = os.path.join(tmp, "shard.array_record")
    w = ar.ArrayRecordWriter(local, _writer_options())
    try:
      for smp in webdataset.read_samples(tar_path, errors):
        if smp.status is not None and smp.status != "success":
          skipped += 1
          continue
        rec, reason = b"", ""
        o = st = (0, 0)
        hsh = np.zeros(16, np.uint8)
        if smp.image is None:
          reason = (
              f"no image member in the sample (members: " f"{', '.join(smp.members) or 'none'})"
          )
        else:
          hsh = np.frombuffer(content_hash(smp.image), np.uint8)
          try:
            rec, o, st = encode_one(smp.image, params)
          except decode_lib.DecodeError as e:
            reason = e.reason
        w.write(rec)
        keys.append(smp.key)
        urls.append(smp.url)
        captions.append(smp.caption or "")
        reasons.append(reason)
        paths.append(f"{tar_path}#{smp.key}")
        orig.append(o)
        stored.append(st)
        hashes.append(hsh)
    finally:
      w.close()
    with open(local, "rb") as fh:
      workdir_lib.write_bytes(out / "shards" / f"{shard_name(s)}.array_record", fh.read())
  n = len(keys)
  workdir_lib.write_npz(
      out / "shards" / f"{shard_name(s)}.npz",
      path=np.asarray(paths, dtype=str),
      key=np.asarray(keys, dtype=str),
      url=np.asarray(urls, dtype=str),
      caption=np.asarray(captions, dtype=str),
      orig_hw=np.asarray(orig, np.int32).reshape(n, 2),
      stored_hw=np.asarray(stored, np.int32).reshape(n, 2),
      hash=np.asarray(hashes, np.uint8).reshape(n, 16),
      reason=np.asarray(reasons, dtype=str),
      skipped=np.int64(skipped),
      tar_error=np.asarray(errors[0] if errors else ""),
  )
  return {"images": n, "bad": sum(1 for r in reasons if r), "skipped": skipped}


# ------------------------------------------------------------------------------ reading


def _find(sorted_ids: np.ndarray, i: int) -> int:
  """Position of ``i`` in ``sorted_ids``, or -1."""
  k = int(np.searchsorted(sorted_ids, i))
  return k if k < len(sorted_ids) and sorted_ids[k] == i else -1


class ShardSource:
  """U from an ingest's output: record ``i`` = image id ``i`` decoded (``valid`` False for
  bad files and, with ``drop_duplicates``, for exact duplicates of an earlier id). Id ``i``
  is the ``i``-th path of the ingest's input in :func:`list_inputs`' order (sorted as
  whole paths), the same id an :class:`bssl.data.sources.ImageFileSource` of that input
  gives it. Ingests of format 1 (another order) are refused: ingest again.
  Remote shards are copied once into ``cache_dir`` (default: a folder under TMPDIR) on
  this host's disk; each process only fetches the shards it reads."""

  def __init__(
      self, path: str, channels: int = 3, drop_duplicates: bool = True, cache_dir: str | None = None
  ):
    root = workdir_lib.path(path)
    mf = root / "manifest.json"
    if not mf.exists():
      what = (
          "holds an ingest that is not complete (no manifest.json): rerun "
          "`python -m bssl.ingest` with the same --input/--out to finish it"
          if (root / "ingest.json").exists()
          else "is not the output of `python -m bssl.ingest` (no manifest.json)"
      )
      raise IngestError(f"unlabelled.path: {path!r} {what}")
    self.manifest = workdir_lib.read_json(mf)
    if self.manifest.get("format_version") != FORMAT_VERSION:
      raise IngestError(
          f"unlabelled.path: {path!r} was written by ingest format "
          f"{self.manifest.get('format_version')}, this bssl reads "
          f"{FORMAT_VERSION} ({_FORMAT_CHANGE}): ingest again into a new "
          f"--out (`python -m bssl.ingest --input=<the same input> "
          f"--out=<new folder>`); a tags file written for the old ids must "
          f"follow the new order"
      )
    self.root, self.channels, self.class_names = root, channels, None
    self.n = int(self.manifest["num_images"])
    self.offsets = np.asarray(
        self.manifest.get("shard_offsets") or shard_offsets(root, self.manifest), np.int64
    )
    self.remote = workdir_lib.is_remote(path)
    # the host cache is keyed by what the shards hold (their content digest), never by
    # their path: an ingest redone behind the same path gets a cache of its own
    digest = self.manifest.get("content_digest") or fingerprint(
        [str(root), self.manifest["input_fingerprint"]]
    )
    self.cache_dir = os.path.join(
        cache_dir or os.path.join(tempfile.gettempdir(), "bssl_shards"), digest[:32]
    )
    # sorted id arrays, not dicts: 16-24 bytes per duplicate or placeholder (at 10^9
    # images with 10% duplicates, 1.6 GB per process rather than ~10 GB of Python dict)
    empty = np.zeros(0, np.int64)
    self._dup_ids, self._dup_first = empty, empty
    if drop_duplicates:
      d = workdir_lib.read_npz(root / "duplicates.npz")
      self._dup_ids, self._dup_first = d["ids"].astype(np.int64), d["first"].astype(np.int64)
    # placeholders (one content shared by many images: dead links) are never valid
    ph = root / "placeholders.npz"
    self._ph_ids, self._ph_count, self._ph_first = empty, empty, empty
    if ph.exists():
      p = workdir_lib.read_npz(ph)
      self._ph_ids, self._ph_count, self._ph_first = p["ids"], p["count"], p["first"]
    self._local = threading.local()
    self._lock = threading.Lock()
    self._manifests: dict[int, dict] = {}

  def __len__(self) -> int:
    return self.n

  def identity(self) -> str:
    """What these shards hold: the input list's fingerprint and the ingest parameters."""
    m = self.manifest
    return (
        f"shards:{m['input_fingerprint']}:n={m['num_images']}:short={m['short_side']}:"
        f"q={m['quality']}:dups={'dropped' if len(self._dup_ids) else 'kept'}"
    )

  def __getstate__(self):  # to decode worker processes: no open readers, no lock
    state = dict(self.__dict__)
    del state["_local"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local, self._lock = threading.local(), threading.Lock()

  def _shard_path(self, s: int) -> str:
    name = f"{shard_name(s)}.array_record"
    if not self.remote:
      return str(self.root / "shards" / name)
    local = os.path.join(self.cache_dir, name)
    if not os.path.exists(local):
      with self._lock:
        if not os.path.exists(local):
          data = (self.root / "shards" / name).read_bytes()
          workdir_lib.write_bytes(local, data)
    return local

  def _reader(self, s: int):
    from array_record.python import array_record_module as ar

    readers = getattr(self._local, "readers", None)
    if readers is None:
      readers = self._local.readers = {}
    r = readers.get(s)
    if r is None:
      if len(readers) >= 4:  # a few open shards per thread; reads go in id order
        old = readers.pop(next(iter(readers)))
        old.close()
      r = readers[s] = ar.ArrayRecordReader(self._shard_path(s), "readahead_buffer_size:0")
    return r

  def locate(self, i: int) -> tuple[int, int]:
    """(shard, position in it) of id ``i``."""
    i = int(i)
    if not 0 <= i < self.n:
      raise IndexError(f"id {i} is not in [0, {self.n})")
    s = int(np.searchsorted(self.offsets, i, side="right")) - 1
    return s, i - int(self.offsets[s])

  def record_bytes(self, i: int) -> bytes:
    s, j = self.locate(i)
    return self._reader(s).read([j])[0]

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    rec = {"label": np.int32(-1), "id": np.int64(i)}
    data = (
        b""
        if _find(self._dup_ids, i) >= 0 or _find(self._ph_ids, i) >= 0
        else (self.record_bytes(i))
    )
    if data:
      try:
        return dict(rec, image=decode_lib.decode(data, self.channels), valid=True)
      except decode_lib.DecodeError:
        pass
    return dict(rec, image=np.zeros((1, 1, self.channels), np.uint8), valid=False)

  def _shard_manifest(self, s: int) -> dict:
    if s not in self._manifests:
      self._manifests[s] = workdir_lib.read_npz(self.root / "shards" / f"{shard_name(s)}.npz")
    return self._manifests[s]

  def name_of(self, i: int) -> str:
    s, j = self.locate(i)
    return str(self._shard_manifest(s)["path"][j])

  def field_of(self, i: int, field: str) -> str:
    """A manifest field of id ``i``: see :meth:`fields`."""
    self.locate(i)  # (an id out of range is an IndexError)
    return str(self.fields([i], field)[0])

  def fields(self, ids, field: str) -> np.ndarray:
    """A manifest field of many ids (read shard by shard): ``key``, ``url``, ``caption`` of
    tar shards; an ingest of files has its path as ``key`` and "" for the others."""
    ids = np.asarray(ids, np.int64)
    out = np.empty(len(ids), object)
    shard = np.searchsorted(self.offsets, ids, side="right") - 1
    for s in np.unique(shard):
      sel = shard == s
      m = self._shard_manifest(int(s))
      col = m[field] if field in m else (m["path"] if field == "key" else None)
      out[sel] = "" if col is None else col[ids[sel] - self.offsets[s]].astype(object)
    return out

  def invalid_ids(self) -> np.ndarray:
    """Sorted ids that are never valid: bad files, placeholders and (when dropped)
    duplicates."""
    bad = [
        self.offsets[s] + np.flatnonzero(self._shard_manifest(s)["reason"] != "")
        for s in range(len(self.offsets) - 1)
    ]
    return np.unique(np.concatenate(bad + [self._dup_ids, self._ph_ids]).astype(np.int64))

  def reason_of(self, i: int) -> str:
    i = int(i)
    if (k := _find(self._dup_ids, i)) >= 0:
      return f"exact duplicate of id {self._dup_first[k]} (same content hash)"
    if (k := _find(self._ph_ids, i)) >= 0:
      c, f = self._ph_count[k], self._ph_first[k]
      return (
          f"placeholder: the same content as {c - 1} other images (first id {f}), as a "
          f"dead link's placeholder is"
      )
    s, j = self.locate(i)
    return str(self._shard_manifest(s)["reason"][j]) or "cannot be decoded"
