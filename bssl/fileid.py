"""Files by content, fast: the identity of a file is the MD5 of its bytes (``md5:<hex>``),
whatever path it is reached by (a moved folder, a symlink, a file list, a ``gs://`` copy:
the same bytes are the same file).

Hashing is done once per file version. A local file's digest is remembered in a cache
under what a user cannot keep constant by accident: device and inode, size, mtime and
ctime in nanoseconds (the idea of git's index and DVC's state database). ``mv``, ``touch
-d`` and ``tar -x`` keep or set mtimes, but any write or rename of the file itself sets
its ctime to now; a file swapped for another has another inode. A file whose mtime or
ctime is less than :data:`RACY_SECONDS` old when it is hashed is not cached (it could
still change within the same timestamp tick: git's "racily clean" case).

On object storage the store's own MD5 (``md5Hash`` of the object's metadata, computed by
the store on upload) is used without reading the object; an object without one (a
composite upload) is read and hashed, cached under its path and generation (a rewritten
object always gets a new generation).

MD5 detects accidental change (a rewritten, swapped or re-extracted file), which is what a
record needs; it is not meant to resist a forger.

The cache is an SQLite file in ``$BSSL_CACHE_DIR`` (default ``~/.cache/bssl``), shared by
every process of the machine; when it cannot be opened, digests are kept for this process
only (and a line says so once).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from bssl import storage

RACY_SECONDS = 2.0
CACHE_ENV = "BSSL_CACHE_DIR"
_BATCH = 500  # keys per SQL lookup


def cache_dir() -> str:
  d = os.environ.get(CACHE_ENV)
  if d:
    return d
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "bssl")


class _Cache:
  """``key -> (stamp, digest)``: key ``dev:ino`` (local) or the object's path (remote);
  stamp the version of the file the digest is of."""

  def __init__(self):
    self._lock = threading.Lock()
    self._db: sqlite3.Connection | None = None
    self._where: str | None = None
    self._memory: dict[str, tuple[str, str]] = {}
    self._sets: dict[str, str] = {}
    self._warned = False

  def _conn(self) -> sqlite3.Connection | None:
    where = os.path.join(cache_dir(), "fileid.sqlite3")
    if self._db is not None and self._where == where:
      return self._db
    self._db, self._where = None, where
    try:
      os.makedirs(os.path.dirname(where), exist_ok=True)
      db = sqlite3.connect(where, timeout=60, check_same_thread=False, isolation_level=None)
      db.execute("PRAGMA journal_mode=WAL")
      db.execute("PRAGMA synchronous=NORMAL")
      db.execute(
          "CREATE TABLE IF NOT EXISTS ids (key TEXT PRIMARY KEY, stamp TEXT NOT NULL, "
          "digest TEXT NOT NULL)"
      )
      db.execute("CREATE TABLE IF NOT EXISTS sets (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
      self._db = db
    except (OSError, sqlite3.Error) as e:
      if not self._warned:
        print(
            f"bssl: note: cannot use the file-identity cache {where} ({e}); files are "
            f"hashed again by every process (set {CACHE_ENV} to a writable folder)",
            file=sys.stderr,
        )
        self._warned = True
    return self._db

  def get_many(self, keys: Sequence[str]) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    with self._lock:
      for k in keys:
        if k in self._memory:
          out[k] = self._memory[k]
      rest = [k for k in keys if k not in out]
      db = self._conn() if rest else None
      if db is None:
        return out
      try:
        for i in range(0, len(rest), _BATCH):
          part = rest[i : i + _BATCH]
          q = "SELECT key, stamp, digest FROM ids WHERE key IN (%s)" % ",".join("?" * len(part))
          for k, stamp, digest in db.execute(q, part):
            out[k] = (stamp, digest)
      except sqlite3.Error:
        pass
    return out

  def put_many(self, rows: Sequence[tuple[str, str, str]]) -> None:
    if not rows:
      return
    with self._lock:
      for k, stamp, digest in rows:
        self._memory[k] = (stamp, digest)
      db = self._conn()
      if db is None:
        return
      with contextlib.suppress(sqlite3.Error):
        db.execute("BEGIN")
        db.executemany("INSERT OR REPLACE INTO ids VALUES (?, ?, ?)", list(rows))
        db.execute("COMMIT")

  def get_set(self, key: str) -> str | None:
    with self._lock:
      if key in self._sets:
        return self._sets[key]
      db = self._conn()
      if db is None:
        return None
      try:
        row = db.execute("SELECT value FROM sets WHERE key = ?", (key,)).fetchone()
      except sqlite3.Error:
        return None
      return row[0] if row else None

  def put_set(self, key: str, value: str) -> None:
    with self._lock:
      self._sets[key] = value
      db = self._conn()
      if db is not None:
        with contextlib.suppress(sqlite3.Error):
          db.execute("INSERT OR REPLACE INTO sets VALUES (?, ?)", (key, value))

  def forget(self) -> None:
    """Drops this process's copy (tests that rewrite files within one tick)."""
    with self._lock:
      self._memory.clear()
      self._sets.clear()


_cache = _Cache()


def _md5_file(path: str) -> str:
  h = hashlib.md5()
  for chunk in storage.read_chunks(path):
    h.update(chunk)
  return h.hexdigest()


def _local_stamp(st: os.stat_result) -> tuple[str, str]:
  return f"{st.st_dev}:{st.st_ino}", f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _remote_info(path: str) -> dict:
  import fsspec

  fs, rel = fsspec.core.url_to_fs(path)
  return fs.info(rel)


def _one(path: str) -> tuple[str, str | None, str | None, str | None]:
  """(identity, cache key, stamp, digest to cache) of one file."""
  if storage.is_remote(path):
    info = _remote_info(path)
    md5 = info.get("md5Hash")
    if md5:
      return "md5:" + base64.b64decode(md5).hex(), None, None, None
    key, stamp = path, f"{info.get('size')}:{info.get('generation') or info.get('updated')}"
    hit = _cache.get_many([key]).get(key)
    if hit and hit[0] == stamp:
      return "md5:" + hit[1], None, None, None
    d = _md5_file(path)
    return "md5:" + d, key, stamp, d
  st = os.stat(path)
  key, stamp = _local_stamp(st)
  d = _md5_file(path)
  if os.stat(path).st_ctime_ns != st.st_ctime_ns:  # changed while read: hash what is there now
    return _one(path)
  racy = time.time() - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 < RACY_SECONDS
  return "md5:" + d, (None if racy else key), stamp, d


_LIST_FROM = 32  # remote files from which one listing is cheaper than one request each


def _listed_md5s(paths: Sequence[str]) -> dict[str, str]:
  """{path: identity} of the remote ``paths`` whose MD5 the store lists: one paginated
  listing of their common folder (1,000 objects a request) instead of one request per
  object; {} when it cannot be listed."""
  prefix = os.path.commonprefix(list(paths))
  prefix = prefix[: prefix.rfind("/") + 1]
  if "://" not in prefix or prefix.index("://") + 3 >= len(prefix):
    return {}
  try:
    import fsspec

    proto = prefix.split("://", 1)[0]
    fs, root = fsspec.core.url_to_fs(prefix)
    infos = fs.find(root, detail=True)
  except (OSError, ValueError):
    return {}
  want = set(paths)
  out = {}
  for name, info in infos.items():
    p = f"{proto}://{name}"
    md5 = info.get("md5Hash")
    if md5 and p in want:
      out[p] = "md5:" + base64.b64decode(md5).hex()
  return out


def content_ids(
    paths: Sequence[str],
    workers: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
  """The identity (``md5:<hex>``) of each file of ``paths``, in order; ``"missing"`` for
  a file that does not exist (or cannot be read). Local files whose (device, inode, size,
  mtime, ctime) are cached are not read; the others are hashed in ``workers`` threads
  (``progress(done, total)`` is called now and then while they are)."""
  paths = [os.fspath(p) for p in paths]
  out: list[str | None] = [None] * len(paths)
  todo: list[int] = []
  keys: dict[int, tuple[str, str]] = {}
  remote = [i for i, p in enumerate(paths) if storage.is_remote(p)]
  listed = _listed_md5s([paths[i] for i in remote]) if len(remote) >= _LIST_FROM else {}
  for i, p in enumerate(paths):
    if storage.is_remote(p):
      if p in listed:
        out[i] = listed[p]
      else:
        todo.append(i)
      continue
    try:
      keys[i] = _local_stamp(os.stat(p))
    except OSError:
      out[i] = "missing"
  hits = _cache.get_many(sorted({k for k, _ in keys.values()}))
  for i, (k, stamp) in keys.items():
    hit = hits.get(k)
    if hit is not None and hit[0] == stamp:
      out[i] = "md5:" + hit[1]
    else:
      todo.append(i)
  todo.sort()
  if todo:
    rows: list[tuple[str, str, str]] = []

    def work(i: int):
      try:
        return i, _one(paths[i])
      except (OSError, FileNotFoundError):
        return i, ("missing", None, None, None)

    done = 0
    with ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
      for i, (ident, key, stamp, digest) in pool.map(work, todo):
        out[i] = ident
        if key is not None:
          rows.append((key, stamp, digest))
        done += 1
        if progress is not None and (done % 1000 == 0 or done == len(todo)):
          progress(done, len(todo))
        if len(rows) >= 10000:
          _cache.put_many(rows)
          rows = []
    _cache.put_many(rows)
  return [str(x) for x in out]


def stamps_digest(paths: Sequence[str], salt: str = "") -> str | None:
  """A digest of the versions of the files ``paths`` (each one's device, inode, size, mtime
  and ctime, in order; ``salt``: whatever else a value derived from them depends on, e.g.
  the names the files are known by): the key under which :func:`remember` keeps such a
  value. None when some path is remote, missing, or was changed less than
  :data:`RACY_SECONDS` ago (a value derived from it is not kept). Costs one ``stat`` per
  file: what lets a rerun that changed nothing skip the per-file lookups of
  :func:`content_ids`."""
  paths = [os.fspath(p) for p in paths]
  if any("://" in p for p in paths):
    return None
  stat, pack = os.stat, struct.Struct("<QQQqq").pack
  try:
    sts = [stat(p) for p in paths]
    blob = b"".join(
        [pack(s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in sts]
    )
  except (OSError, struct.error):
    return None
  newest = max((max(s.st_mtime_ns, s.st_ctime_ns) for s in sts), default=0)
  if time.time() - newest / 1e9 < RACY_SECONDS:
    return None
  h = hashlib.blake2b(salt.encode("utf-8", "surrogateescape"), digest_size=20)
  h.update(blob)
  return h.hexdigest()


def recall(key: str | None) -> str | None:
  """The value :func:`remember` kept under ``key`` (a :func:`stamps_digest`), or None."""
  return None if key is None else _cache.get_set(key)


def remember(key: str | None, value: str) -> None:
  """Keeps ``value`` (derived from the contents of the files whose versions ``key``
  digests) in the cache, for :func:`recall`."""
  if key is not None:
    _cache.put_set(key, value)


def content_id(path: str) -> str:
  """:func:`content_ids` of one file."""
  return content_ids([path])[0]


def forget() -> None:
  _cache.forget()
