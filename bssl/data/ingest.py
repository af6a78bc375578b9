"""Ingest U once: image files (or WebDataset tar shards, :mod:`bssl.data.webdataset`) ->
ArrayRecord shards of images re-encoded at a working size, exact duplicates and
placeholders found, and a manifest: the format :mod:`bssl.data.shards` describes and reads.

Ids are positions in the input list sorted as whole path strings
(:func:`bssl.data.listing.list_inputs`: the same for a folder, a file list of its files and
a ``gs://`` copy of it; stable across runs and hosts). Shard ``s`` holds ids
``[s*S, (s+1)*S)``; process ``i`` of ``n`` ingests shards ``i, i+n, ...``. A shard is
complete when its ``.npz`` exists: it is written after the ``.array_record``, so a killed
ingest leaves each shard complete or absent, and a rerun makes only the missing ones
(byte-identical to what an uninterrupted run writes: encoding is deterministic).

What an ``--out`` was made from, checked by every rerun into it:

- ``ingest.json``: the parameters and the input's listing, as the input paths relative to
  their common folder (``input_paths``): a folder, a file list of it, the folder moved or
  reached through a symlink give the same listing; another list of files is refused.
- each shard's ``input_md5``: the MD5 of every input file it was made from (of the bytes
  read; a tar shard's: the tar's). A rerun (a resume after a kill, or the same command
  again) compares the finished shards' with the files' content ids now
  (:func:`bssl.fileid.content_ids`: cached under device, inode, size, mtime and ctime, so
  unchanged files are not read again) and refuses a changed input (:class:`IngestError`
  naming a changed file): an ``--out`` never mixes shards of two versions of a file.
- ``manifest.json``'s ``input_content``: the digest of every input's MD5 in id order, so a
  rerun of a complete ingest is "already complete" after one stat per input file (and,
  the first time, one cache lookup per file: :func:`bssl.fileid.stamps_digest`), and
  ``metadata_digests`` (:mod:`bssl.data.shards`: captions, keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
from array_record.python import array_record_module as ar
from PIL import Image

from bssl import fileid, storage
from bssl.data import decode as decode_lib
from bssl.data import webdataset
from bssl.data.listing import IMAGE_EXTENSIONS, ListingError, fingerprint, list_inputs
from bssl.data.shards import (
    FORMAT_CHANGE,
    FORMAT_VERSION,
    METADATA,
    IngestError,
    MetadataDigest,
    content_digest_of,
    shard_name,
    shard_offsets,
)
from bssl.progress import eta

EXTENSIONS = IMAGE_EXTENSIONS  # what an ingest of files takes (bssl-ingest --extensions)
# ingest.json's ``input_ids``: each input file is identified by the MD5 of its bytes, kept
# per shard (``input_md5``); an ``--out`` without it was made by an older bssl
INPUT_IDS = "md5 per input file, in each shard's input_md5"
_NO_MD5 = bytes(16)  # a file that could not be read (or is gone)
_GREY = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


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


def _writer_options() -> str:
  return "group_size:1"  # random access: one record per chunk


def ingest_shard(files: Sequence[str], first_id: int, params: Params, out, s: int) -> dict:
  """Writes shard ``s`` (``files`` = its inputs, ids from ``first_id``): the array_record,
  then its manifest npz. Returns counts."""
  out = storage.path(out)
  n = len(files)
  orig = np.zeros((n, 2), np.int32)
  stored = np.zeros((n, 2), np.int32)
  hashes = np.zeros((n, 16), np.uint8)
  md5 = np.zeros((n, 16), np.uint8)  # of the bytes read: what the shard was made from
  reasons = [""] * n
  with tempfile.TemporaryDirectory(prefix="bssl_ingest_") as tmp:
    local = os.path.join(tmp, "shard.array_record")
    w = ar.ArrayRecordWriter(local, _writer_options())
    try:
      for j, f in enumerate(files):
        rec = b""
        try:
          data = decode_lib.read_bytes(f)
          md5[j] = np.frombuffer(hashlib.md5(data).digest(), np.uint8)
          hashes[j] = np.frombuffer(content_hash(data), np.uint8)
          rec, orig[j], stored[j] = encode_one(data, params)
        except decode_lib.DecodeError as e:
          reasons[j] = e.reason
        w.write(rec)
    finally:
      w.close()
    with open(local, "rb") as fh:
      storage.write_bytes(out / "shards" / f"{shard_name(s)}.array_record", fh.read())
  storage.write_npz(
      out / "shards" / f"{shard_name(s)}.npz",
      ids=np.arange(first_id, first_id + n, dtype=np.int64),
      path=np.asarray(files, dtype=str),
      orig_hw=orig,
      stored_hw=stored,
      hash=hashes,
      reason=np.asarray(reasons, dtype=str),
      input_md5=md5,
  )
  return {"images": n, "bad": sum(1 for r in reasons if r)}


def _shard_done(out, s: int) -> bool:
  return (storage.path(out) / "shards" / f"{shard_name(s)}.npz").exists()


def _done_shards(out) -> set[int]:
  d = storage.path(out) / "shards"
  if not d.exists():
    return set()
  done = set()
  for name in storage.listdir(d):
    if name.startswith("u-") and name.endswith(".npz"):
      done.add(int(name[2:-4]))
  return done


def relative_inputs(paths: Sequence[str]) -> list[str]:
  """``paths`` (sorted) relative to their common folder (the common prefix of the first and
  the last path, which a sorted list's every path shares, cut at its last ``/``): the
  names an ingest's input listing is identified by, so that the folder moved, reached
  through a symlink or given as a file list of its files is the same input."""
  if not paths:
    return []
  prefix = os.path.commonprefix([paths[0], paths[-1]])
  n = prefix.rfind("/") + 1
  return [p[n:] for p in paths]


def _md5_rows(ids: Sequence[str]) -> np.ndarray:
  """[n, 16] uint8 of content ids ``md5:<hex>`` (:mod:`bssl.fileid`); zeros for a file that
  is missing or cannot be read."""
  raw = b"".join(bytes.fromhex(c[4:]) if c.startswith("md5:") else _NO_MD5 for c in ids)
  return np.frombuffer(raw, np.uint8).reshape(-1, 16)


def input_content_of(rows) -> str:
  """The digest (blake2b-128, hex) of the inputs' MD5s [n, 16] in id order (given in any
  number of pieces): ``manifest.json``'s ``input_content``."""
  h = hashlib.blake2b(digest_size=16)
  h.update(b"input-md5\n")
  for a in rows:
    h.update(np.ascontiguousarray(a, np.uint8).tobytes())
  return h.hexdigest()


def _header(files, params: Params) -> dict:
  n = len(files)
  return {
      "format_version": FORMAT_VERSION,
      "num_images": n,
      "input_paths": fingerprint(relative_inputs(files)),
      "input_ids": INPUT_IDS,
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
  p = storage.path(out) / "ingest.json"
  if p.exists():
    old = storage.read_json(p)
    if old.get("format_version") != header["format_version"]:
      raise IngestError(
          f"--out {out} holds an ingest of format {old.get('format_version')}, "
          f"this bssl writes format {header['format_version']} "
          f"({FORMAT_CHANGE}); use another --out, or delete it to ingest again"
      )
    if old.get("input_ids") != header["input_ids"]:
      raise IngestError(
          f"--out {out} holds an ingest made by an older bssl, which did not record what "
          f"its input files contained, so a rerun cannot tell whether they changed since; "
          f"use another --out, or delete it to ingest again (as it is, the ingest stays "
          f"readable)"
      )
    diff = {k: (old.get(k), v) for k, v in header.items() if old.get(k) != v}
    if diff:
      what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
      raise IngestError(
          f"--out {out} holds an ingest of another input or with other "
          f"parameters ({what}); use another --out, or delete it to redo it"
      )
  elif write:
    storage.write_json(p, header)


def _part_path(out, k: int, n: int):
  return storage.path(out) / "dedup" / f"part-{k:05d}-of-{n:05d}.npz"


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
    m = storage.read_npz(
        storage.path(out) / "shards" / f"{shard_name(s)}.npz", keys=("hash", "reason")
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
  storage.write_npz(_part_path(out, k, n), **part)
  return part


def _all_shards_done(out, header) -> bool:
  return len(_done_shards(out)) == int(header["num_shards"])


def finalize(out, header: dict, n_parts: int = 1, log: Callable[[str], None] = print) -> dict:
  """duplicates.npz, placeholders.npz, bad.json and manifest.json (with
  :func:`bssl.data.shards.content_digest`) from every shard's manifest and the ``n_parts`` dedup
  partitions (computing the missing ones). Deterministic: any process may write them, with
  the same bytes."""
  out = storage.path(out)
  offsets = shard_offsets(out, header)
  header = dict(header, num_images=int(offsets[-1]))
  if header["num_images"] == 0:
    errs = [
        str(storage.read_npz(out / "shards" / f"{shard_name(s)}.npz")["tar_error"])
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
        storage.read_npz(p) if p.exists() else dedup_partition(out, header, offsets, k, n_parts)
    )
  cat = {key: np.concatenate([q[key] for q in parts]) for key in parts[0]}
  o = np.argsort(cat["dup_ids"], kind="stable")
  storage.write_npz(
      out / "duplicates.npz",
      ids=cat["dup_ids"][o].astype(np.int64),
      first=cat["dup_first"][o].astype(np.int64),
  )
  o = np.argsort(cat["placeholder_ids"], kind="stable")
  ph = {k: cat[f"placeholder_{k}"][o].astype(np.int64) for k in ("ids", "count", "first")}
  storage.write_npz(out / "placeholders.npz", **ph)
  ph_of = dict(zip(ph["ids"].tolist(), zip(ph["count"].tolist(), ph["first"].tolist())))
  bad, all_hashes, num_ok, skipped, tar_errors = [], [], 0, 0, []
  input_md5: list | None = []
  meta = {g: MetadataDigest(g) for g in METADATA}
  for s in range(int(header["num_shards"])):
    m = storage.read_npz(out / "shards" / f"{shard_name(s)}.npz")
    all_hashes.append(m["hash"])
    if input_md5 is not None and "input_md5" in m:
      input_md5.append(m["input_md5"])
    else:
      input_md5 = None  # (a shard of an older bssl: refused before this)
    for d in meta.values():
      d.update(m)
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
  storage.write_json(out / "bad.json", bad)
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
      content_digest=content_digest_of(header, all_hashes),
      input_content=None if input_md5 is None else input_content_of(input_md5),
      metadata_digests={g: d.hexdigest() for g, d in meta.items()},
  )
  storage.write_json(out / "manifest.json", manifest)
  log(
      f"ingest: complete: {header['num_images']} images, {len(bad)} bad (listed in "
      f"{out / 'bad.json'}; {len(ph['ids'])} of them placeholders), {ndup} exact "
      f"duplicates ({out / 'duplicates.npz'})"
      + (f", {skipped} samples skipped (json status not success)" if skipped else "")
      + (f"; {len(tar_errors)} damaged tar shard(s): {tar_errors[0]}" if tar_errors else "")
  )
  return manifest


def _current_ids(files: Sequence[str], log: Callable[[str], None]) -> list[str]:
  """:func:`bssl.fileid.content_ids` of ``files``, with a progress line every minute while
  files are read (files unchanged since they were hashed are not)."""
  told = [time.time()]
  t0 = told[0]

  def progress(done: int, total: int):
    if time.time() - told[0] > 60:
      told[0] = time.time()
      log(
          f"ingest: reading {total} changed or new input files to check them: {done}/{total}, "
          f"eta {eta(done, total, time.time() - t0)}"
      )

  return fileid.content_ids(files, progress=progress)


def check_inputs(
    out, inputs_of: Sequence[Sequence[str]], done: set[int], log: Callable[[str], None] = print
) -> dict | None:
  """Checks an ``--out`` against the input files now (its header already checked: the same
  listing and parameters). A complete ingest whose inputs all have the content recorded
  in ``manifest.json`` (``input_content``) is returned as it is ("already complete": one
  stat per file when they were checked before, :func:`bssl.fileid.stamps_digest`, else
  one cache lookup per file too, :func:`bssl.fileid.content_ids`); otherwise None, once
  every finished shard's ``input_md5`` is found equal to its input files' MD5 now. A
  changed (or vanished) input of a finished shard is an :class:`IngestError` naming one
  and counting them, before any work: a rerun never mixes shards of two versions of a
  file. ``inputs_of[s]``: the input files of shard ``s``."""
  root = storage.path(out)
  known: dict[str, str] = {}
  mf = root / "manifest.json"
  manifest = storage.read_json(mf) if mf.exists() else None
  if manifest is not None and manifest.get("input_content") and len(done) == len(inputs_of):
    files = [f for fs in inputs_of for f in fs]
    # the files' versions (inode, size, times) as last checked: one stat per file
    stamps = fileid.stamps_digest(files, "bssl.ingest input_content")
    same = fileid.recall(stamps) == manifest["input_content"]
    if not same:
      ids = _current_ids(files, log)
      now = input_content_of([_md5_rows(ids)])
      fileid.remember(stamps, now)
      same = now == manifest["input_content"]
      known = dict(zip(files, ids))
    if same:
      log(
          f"ingest: already complete: {manifest['num_images']} images in {out}, its "
          f"{len(files)} input file(s) unchanged since they were ingested; nothing to do"
      )
      return manifest
  shards = sorted(done)
  if not shards:
    return None
  files = [f for s in shards for f in inputs_of[s]]
  todo = [f for f in files if f not in known]
  known.update(zip(todo, _current_ids(todo, log) if todo else []))
  changed = []
  for s in shards:
    stored = storage.read_npz(root / "shards" / f"{shard_name(s)}.npz", keys=("input_md5",))
    stored = stored.get("input_md5")
    now = _md5_rows([known[f] for f in inputs_of[s]])
    if stored is None or stored.shape != now.shape:
      changed += list(inputs_of[s])
    else:
      changed += [inputs_of[s][j] for j in np.flatnonzero((stored != now).any(1))]
  if changed:
    whole = len(shards) == len(inputs_of)
    raise IngestError(
        f"--out {out} holds an ingest of other contents: {len(changed)} of the "
        f"{len(files)} input files of its "
        f"{'shards' if whole else '%d finished shard(s)' % len(shards)} changed since they "
        f"were ingested (e.g. {changed[0]}"
        f"{', now gone' if known.get(changed[0]) == 'missing' else ''}); use another --out, "
        f"or delete {out} to ingest again"
    )
  return None


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
  params.check()
  if not 0 <= process_index < process_count:
    raise IngestError(f"process index {process_index} is not in [0, {process_count})")
  listed: dict = {}
  try:
    tars = webdataset.tar_inputs(input_path, listed)
  except webdataset.TarInputError as e:
    raise IngestError(str(e)) from None
  tar = tars is not None
  if tar:
    stats = [webdataset.tar_stat(t) for t in tars]  # (sizes: the progress lines' work)
    header = _tar_header(tars, params)
    units = tars
    inputs_of = [[t] for t in tars]
  else:
    try:
      if "images" in listed and tuple(extensions or ()) == IMAGE_EXTENSIONS:
        files = listed["images"]  # (the folder as tar_inputs listed it: not listed twice)
      else:
        files = list_inputs(input_path, extensions)
    except ListingError as e:
      raise IngestError(str(e)) from None
    header = _header(files, params)
    size = params.shard_size
    units = [files[s * size : (s + 1) * size] for s in range(header["num_shards"])]
    inputs_of = units
  check_or_write_header(out, header, write=(process_index == 0))
  if process_index != 0:  # wait for process 0's header, then check it
    for _ in range(600):
      if (storage.path(out) / "ingest.json").exists():
        break
      time.sleep(0.1)
    check_or_write_header(out, header, write=False)
  ns = header["num_shards"]
  done = _done_shards(out)
  complete = check_inputs(out, inputs_of, done, log)
  if complete is not None:
    return complete
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
    # the inputs' content ids, cached now (the shard stores the MD5 of the bytes it read):
    # a rerun then checks them by stat alone
    ids = fileid.content_ids(inputs_of[s])
    if tar:
      got = ingest_tar_shard(tars[s], params, out, s, input_id=ids[0])
    else:
      got = ingest_shard(units[s], s * params.shard_size, params, out, s)
    made += got["images"]
    bad += got["bad"]
    progress += work[c]
    el = time.time() - t0
    log(
        f"ingest: shard {s} done ({c + 1}/{len(mine)} of this process), {made} images, "
        f"{bad} bad, {made / max(el, 1e-9):.0f} img/s, {progress}/{total} {unit}, eta "
        f"{eta(progress, total, el)}"
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


def _tar_header(tars, params: Params) -> dict:
  """ingest.json of tar input: the shards' paths relative to their common folder (their
  contents are in each output shard's ``input_md5``)."""
  return {
      "format_version": FORMAT_VERSION,
      "input_kind": "webdataset",
      "num_images": None,
      "input_paths": fingerprint(relative_inputs(tars)),
      "input_ids": INPUT_IDS,
      "short_side": params.short_side,
      "quality": params.quality,
      "shard_size": None,
      "num_shards": len(tars),
      "encoding": "jpeg",
      "writer_options": _writer_options(),
      "placeholder_min": params.placeholder_min,
  }


def ingest_tar_shard(
    tar_path: str, params: Params, out, s: int, input_id: str | None = None
) -> dict:
  """Writes output shard ``s`` from input tar shard ``tar_path``: one record per sample
  (stream order) whose json status, if any, is ``success``; then its manifest npz (key,
  url, caption, sizes, content hash, bad reason, the count of skipped samples, the tar's
  damage, if any, and ``input_md5``: the tar's content id ``input_id``, read before it, by
  default :func:`bssl.fileid.content_id`)."""
  if input_id is None:
    input_id = fileid.content_id(tar_path)
  out = storage.path(out)
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
      storage.write_bytes(out / "shards" / f"{shard_name(s)}.array_record", fh.read())
  n = len(keys)
  storage.write_npz(
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
      input_md5=_md5_rows([input_id]),
  )
  return {"images": n, "bad": sum(1 for r in reasons if r), "skipped": skipped}
