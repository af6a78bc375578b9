"""Checks of the opened data that must pass before any work (exit 2 through
:class:`bssl.data.sources.DataError`, the config's one-line error path):

- :func:`check_num_classes`: ``data.num_classes`` is the data's own class count and every
  label of D, validation and test lies in ``[0, num_classes)``. (Fashion-MNIST with
  ``num_classes=5`` would otherwise train a 5-way head on classes 0-4 and test it on 0-9.)
- :func:`scan_decodable`: with files as data (``data.kind`` ``image_folder`` or
  ``video_folder``), every file of D, validation, test and - when U is the rest of the
  training folder - U is decoded once, in threads, before any training. D's, validation's
  and test's bad files stop the run with one error naming every one of them (instead of
  one per run, each found after the baseline has trained); U's are marked, so scoring
  skips and lists them.

Files that decoded before are not decoded again while their (path, size, mtime) stays the
same: a cache of 8-byte keys of the files that decoded, one small ``.npz`` per data set in
a user cache folder (``$BSSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/bssl/decodable``, else
``~/.cache/bssl/decodable``). Not the work directory: the verdict is about this host's files,
not a run's, so reruns into new work directories and the runs of a sweep share it, and a
``gs://`` work directory would make it slow. An unwritable cache folder only costs the
decoding again. Bad files are never cached: they are decoded (and their reason read) on
every run, and there are few of them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np

from bssl import procs, storage
from bssl.data import decode, sources
from bssl.data import video as video_lib
from bssl.data.sources import DataError
from bssl.progress import format_duration

FILE_KINDS = ("image_folder", "video_folder")
# Part of every cache key: bump when what "decodes" means changes (decoder, conversions).
_SCAN_VERSION = 1
_CHUNK = 1024  # files decoded between progress checks
_PROGRESS_SECONDS = 15.0
_SAVE_SECONDS = 120.0  # a long first scan saves what it learnt as it goes (a kill keeps it)


# ----------------------------------------------------------------------------- classes


def _labels(src) -> np.ndarray | None:
  """The labels [N] of a labelled source held in memory, or None (TFDS: not read here)."""
  if src is None:
    return None
  if isinstance(src, sources.SubsetView):
    return src.true_labels()
  labels = getattr(src, "labels", None)
  return None if labels is None else np.asarray(labels)


def data_num_classes(data, cfg) -> int | None:
  """The data's own class count: a TFDS dataset's info (its ClassLabel), else the classes
  the sources were opened with (Fashion-MNIST's 10, the class folders, the CSV's classes,
  the fake data's); None when the data does not say."""
  if cfg.data.kind == "tfds":
    n = getattr(data.labelled, "num_classes", None)
    return int(n) if n else None
  return len(data.class_names) if data.class_names else None


def check_num_classes(data, cfg) -> None:
  """Raises DataError unless ``cfg.data.num_classes`` equals the data's class count (when it
  says one) and every label of D, validation and test is in ``[0, num_classes)``.

  ``data``: a :class:`bssl.data.recipe.Data`. Cheap: labels are in memory (TFDS labels are
  not read; its info's class count is checked)."""
  d = cfg.data
  want = int(d.num_classes)
  have = data_num_classes(data, cfg)
  what = {
      "fashion_mnist": "Fashion-MNIST",
      "tfds": f"TFDS dataset {d.get('tfds_name')!r}",
      "image_folder": f"data.train_dir {d.get('train_dir')!r}",
      "video_folder": f"data.train_csv {d.get('train_csv')!r}",
      "moving_fashion_mnist": "moving Fashion-MNIST",
  }.get(d.kind, f"data.kind={d.kind!r}")
  if have is not None and have != want:
    names = list(data.class_names or ())
    shown = (
        f" ({', '.join(map(str, names[:10]))}{', ...' if len(names) > 10 else ''})" if names else ""
    )
    raise DataError(
        f"data.num_classes={want} but {what} has {have} classes{shown}; set "
        f"--config.data.num_classes={have} (the model's head has one output per "
        f"class, and every class is trained and tested)"
    )
  for name, src in (
      ("D (the labelled set)", data.labelled),
      ("the validation set", data.val),
      ("the test set", data.test),
  ):
    labels = _labels(src)
    if labels is None or not len(labels):
      continue
    out = np.unique(labels[(labels < 0) | (labels >= want)])
    if out.size:
      raise DataError(
          f"data.num_classes={want} but {name} of {what} has labels "
          f"{out[:10].tolist()}{'...' if out.size > 10 else ''} outside "
          f"[0, {want}); set --config.data.num_classes to the data's class count "
          f"(labels 0..{int(labels.max())} seen)"
      )


# ----------------------------------------------------------------------------- decodable


def _field_names(cfg) -> dict[str, str]:
  d = cfg.data
  if d.kind == "video_folder":
    return {
        "D": "data.train_csv",
        "validation": "data.val_csv" if d.get("val_csv") else "data.train_csv",
        "test": "data.test_csv",
        "U": "data.train_csv",
    }
  return {
      "D": "data.train_dir",
      "validation": "data.val_dir" if d.get("val_dir") else "data.train_dir",
      "test": "data.test_dir",
      "U": "data.train_dir",
  }


def _decoder(data, cfg) -> tuple[Callable[[str], str], str]:
  """(path -> "" or why it does not decode, the parameters that decide it): exactly what the
  sources do with the file (the image sources' decoder; videos at the spec's short side)."""
  d = cfg.data
  if d.kind == "video_folder":
    short, ch, mf = data.spec.decode_short_side, int(d.channels), d.get("max_frames")

    def video(path: str) -> str:
      try:
        video_lib.decode_video(path, short, ch, mf)
      except (ValueError, OSError) as e:
        return str(e)[:300] or type(e).__name__
      return ""

    return video, f"video:{short}:{ch}:{mf}"

  ch = int(d.channels)

  def image(path: str) -> str:
    try:
      sources.decode_image(path, ch)
    except decode.DecodeError as e:
      return e.reason
    return ""

  return image, f"image:{ch}"


def _stat(path: str) -> str | None:
  """What changes when the file changes: its size and modification time in ns (a remote
  file: size and generation, else its update time); None when it cannot be read."""
  try:
    if storage.is_remote(path):
      import fsspec

      fs, p = fsspec.core.url_to_fs(path)
      info = fs.info(p)
      when = (
          info.get("generation")
          or info.get("mtime")
          or info.get("updated")
          or info.get("etag")
          or info.get("ETag")
      )
      return None if when is None else f"{info.get('size')}:{when}"
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"
  except Exception:
    return None


def _key(params: str, path: str, stat: str) -> int:
  h = hashlib.blake2b(
      f"{_SCAN_VERSION}|{params}|{path}|{stat}".encode("utf-8", "surrogateescape"), digest_size=8
  )
  return int.from_bytes(h.digest(), "little")


def default_cache_dir() -> str:
  if os.environ.get("BSSL_CACHE_DIR"):
    return os.environ["BSSL_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "bssl", "decodable")


def _cache_file(cfg, cache_dir: str) -> str:
  """One file per data set (the configured roots, made absolute), so it holds about as many
  keys as the data set has files."""
  d = cfg.data
  fields = (
      ("train_csv", "val_csv", "test_csv", "video_dir")
      if d.kind == "video_folder"
      else ("train_dir", "val_dir", "test_dir")
  )
  roots = [
      str(d.get(f))
      if d.get(f) is None or storage.is_remote(str(d.get(f)))
      else os.path.abspath(str(d.get(f)))
      for f in fields
  ]
  name = hashlib.sha256("|".join([d.kind] + roots).encode()).hexdigest()[:24]
  return os.path.join(cache_dir, f"{name}.npz")


def _load_keys(path: str) -> np.ndarray:
  try:
    with np.load(path) as z:
      return np.asarray(z["good"], np.uint64)
  except Exception:
    return np.zeros(0, np.uint64)


def _save_keys(path: str, keys: np.ndarray, keep_at_most: int) -> bool:
  """Writes the union of ``keys`` and what the file holds now (another run may have added
  some), atomically; keys of files changed since are dropped when the file has grown past
  ``keep_at_most``. False when the folder is not writable."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    union = np.union1d(_load_keys(path), keys)
    if len(union) > keep_at_most:
      union = np.unique(keys)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp.npz")
    with os.fdopen(fd, "wb") as f:
      np.savez(f, good=union.astype(np.uint64))
    os.replace(tmp, path)
    return True
  except OSError:
    return False


def scan_decodable(
    data,
    cfg,
    log: Callable[[str], None] = print,
    *,
    cache_dir: str | None = None,
    workers: int | None = None,
    progress_seconds: float = _PROGRESS_SECONDS,
) -> dict[int, str]:
  """Decodes every file of D, validation, test and (``unlabelled.kind='rest_of_train'``) U
  once, before any training, when the data is files (``data.kind`` in :data:`FILE_KINDS`;
  otherwise returns ``{}`` at once).

  - D's, validation's and test's undecodable files: one DataError naming every one, with
    its reason, set by set (nothing has been trained yet);
  - U's: skipped, not fatal. They are marked in ``data.unlabelled`` (a
    :class:`bssl.data.sources.SubsetView` of the training folder:
    ``data.unlabelled.unreadable[id] = reason``), so scoring gives them ``valid == False``
    without reading them (the training folder's source would raise), and the select
    stage lists them with their reason in ``bad_images.json``. Returns them: {U id: reason}.

  Decoding runs in ``workers`` threads (default: this process's cores; Pillow and PyAV
  decode without the GIL), with a progress line (rate, ETA) every ``progress_seconds`` of
  a long scan. Files unchanged since they last decoded are not decoded again (module
  docstring: the cache, in ``cache_dir``, default :func:`default_cache_dir`)."""
  d = cfg.data
  if d.kind not in FILE_KINDS:
    return {}
  fields = _field_names(cfg)
  sets = [("D", data.labelled), ("validation", data.val), ("test", data.test)]
  if cfg.unlabelled.kind == "rest_of_train":
    sets.append(("U", data.unlabelled))
  names = {k: [src.name_of(i) for i in range(len(src))] for k, src in sets if src is not None}
  paths = sorted({p for ps in names.values() for p in ps})
  decode_one, params = _decoder(data, cfg)
  cache = _cache_file(cfg, cache_dir or default_cache_dir())
  known = _load_keys(cache)
  workers = int(workers or procs.num_cores())

  # which files changed since they last decoded (stat in threads: a remote file is a request)
  with concurrent.futures.ThreadPoolExecutor(workers) as ex:
    stats = [
        s
        for c in range(0, len(paths), 8 * _CHUNK)
        for s in ex.map(_stat, paths[c : c + 8 * _CHUNK])
    ]
  keys = np.array(
      [_key(params, p, s) if s is not None else 0 for p, s in zip(paths, stats)], np.uint64
  )
  cached = np.isin(keys, known) & np.array([s is not None for s in stats], bool)
  todo = [j for j in range(len(paths)) if not cached[j]]
  reasons: dict[str, str] = {}
  good_new: list[int] = []
  big = len(todo) >= 1000
  if big:
    log(
        f"data check: {len(paths)} files of {', '.join(k for k, _ in sets if k in names)}: "
        f"{int(cached.sum())} unchanged since they last decoded, {len(todo)} to decode "
        f"({workers} threads; cache {cache})"
    )
  t0 = t_log = t_save = time.time()
  done = 0
  if todo:
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
      for c in range(0, len(todo), _CHUNK):
        chunk = todo[c : c + _CHUNK]
        for j, why in zip(chunk, ex.map(lambda j: decode_one(paths[j]), chunk)):
          if why:
            reasons[paths[j]] = why
          elif stats[j] is not None:
            good_new.append(int(keys[j]))
        done += len(chunk)
        now = time.time()
        if now - t_save >= _SAVE_SECONDS and done < len(todo):
          _save_keys(
              cache,
              np.concatenate([keys[cached], np.asarray(good_new, np.uint64)]),
              2 * len(paths) + 1000,
          )
          t_save = now
        if now - t_log >= progress_seconds and done < len(todo):
          rate = done / max(now - t0, 1e-9)
          log(
              f"data check: decoded {done}/{len(todo)} files "
              f"({100 * done / len(todo):.0f}%), {len(reasons)} bad, {rate:.0f} files/s, "
              f"eta {format_duration((len(todo) - done) / max(rate, 1e-9))}"
          )
          t_log = now
    good = np.concatenate([keys[cached], np.asarray(good_new, np.uint64)])
    if not _save_keys(cache, good, 2 * len(paths) + 1000) and big:
      log(
          f"data check: note: cannot write the cache {cache} (set BSSL_CACHE_DIR to a "
          f"writable folder); these files will be decoded again next run"
      )
    if big:
      rate = done / max(time.time() - t0, 1e-9)
      log(
          f"data check: decoded {done} files in {format_duration(time.time() - t0)} "
          f"({rate:.0f} files/s), {len(reasons)} bad"
      )

  # the labelled sets must be whole: one error naming every bad file
  parts, total = [], 0
  for k in ("D", "validation", "test"):
    bad = [p for p in names.get(k, ()) if p in reasons]
    if bad:
      total += len(bad)
      parts.append(
          f"{k} ({fields[k]}): {len(bad)} of {len(names[k])} examples cannot be "
          f"decoded: " + "; ".join(f"{p} ({reasons[p]})" for p in bad)
      )
  if parts:
    raise DataError(
        f"data: {total} file(s) of the labelled sets cannot be decoded (found "
        f"before any training; D, validation and test must be whole: remove or "
        f"replace each, then rerun): " + " | ".join(parts)
    )
  # U: marked, skipped by scoring, listed by select
  out: dict[int, str] = {}
  if "U" in names:
    out = {i: reasons[p] for i, p in enumerate(names["U"]) if p in reasons}
    if out:
      unl = data.unlabelled
      if isinstance(unl, sources.SubsetView):
        unl.unreadable.update(out)
      shown = "; ".join(f"{names['U'][i]} ({r})" for i, r in list(out.items())[:5])
      log(
          f"data check: {len(out)} of U's {len(names['U'])} files (the rest of "
          f"{fields['U']}) cannot be decoded: they are not scored, and the select stage lists "
          f"them in bad_images.json (e.g. {shown})"
      )
  return out
