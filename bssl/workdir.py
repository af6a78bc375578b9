"""The layout of one run's work directory (local or ``gs://bucket/prefix``); files are read
and written through :mod:`bssl.storage` (atomic writes, no shared local disk assumed).

Layout (``<stage>`` is any stage of the engine's table)::

  config.json                 the resolved config of the last accepted run
  splits.json                 which training images are D, validation and U
  <stage>/started.json        the input stages and backend the partial state belongs to
  <stage>/reads/p<i>.json     what process i of a started stage has read so far (bssl.deps)
  <stage>/done.json           written last: the stage is complete (info + the record of
                              every config field and input it read, bssl.deps)
  <stage>/...                 the stage's own artifact (final/, checkpoints/, parts/, dhat/)
  lock.json                   while a command runs here: who (WorkdirLock)

One command per work directory: :class:`WorkdirLock` (``lock.json``: host, pid and the
pid's start time, command, since when, a heartbeat), made by an atomic create (a local or
network disk: a hard link of a whole file, which fails if one exists, ``O_CREAT|O_EXCL``
where there are no hard links; ``gs://``: an upload with ``ifGenerationMatch=0``) and
taken over, by a compare-and-swap (a rename away checked by inode and content;
``ifGenerationMatch`` of the generation read), only from an owner that is gone: on this
host, its pid no longer runs or is another process (another start time); on another host,
its heartbeat (rewritten every ``HEARTBEAT_S``) is older than ``STALE_S`` by this host's
clock, or has not changed for ``STALE_S`` while this command waited. Released on exit
(normal, an error, SIGTERM). Limits: hosts' clocks must agree to well within ``STALE_S``
(else a waiting command sees the heartbeat stop changing first); a host that stops
beating for ``STALE_S`` while alive (suspended, cut off) loses its lock (it says so); two
processes on one host in different pid namespaces (containers with one host name) cannot
see each other's pids: give them different host names.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid

from etils import epath

from bssl import procs, storage

LOCK_FILE = "lock.json"
HEARTBEAT_S = 30.0  # the owner rewrites the lock's heartbeat this often
# an owner on another host whose heartbeat is older than this (or unchanged this long while
# another command waits) is taken as gone, its lock taken over; hosts' clocks must agree
# to well within it (NTP does)
STALE_S = 300.0
WAIT_POLL_S = 2.0  # --wait_for_lock: how often the lock is looked at
WAIT_LOG_S = 60.0  # --wait_for_lock: a progress line this often
# an unreadable lock file younger than this is being written (O_CREAT|O_EXCL, no hard
# links); older, it is damaged and taken over
UNREADABLE_GRACE_S = 60.0


class Workdir:
  """The work directory of one run: where each stage's artifacts live."""

  def __init__(self, root: storage.PathLike):
    self.root = storage.path(root)

  def __str__(self) -> str:
    return os.fspath(self.root)

  def stage(self, name: str) -> epath.Path:
    return self.root / name

  def done_path(self, name: str) -> epath.Path:
    return self.stage(name) / "done.json"

  def started_path(self, name: str) -> epath.Path:
    return self.stage(name) / "started.json"

  def done(self, name: str) -> dict | None:
    """The stage's done.json, or None when the stage is not complete. A damaged one (not
    JSON, e.g. truncated, or not what bssl writes) raises storage.CorruptArtifactError
    naming it and what to do (the engine's --recompute_stale deletes that stage)."""
    p = self.done_path(name)
    return self._stage_json(name, p, "finished") if p.exists() else None

  def started(self, name: str) -> dict | None:
    p = self.started_path(name)
    return self._stage_json(name, p, None) if p.exists() else None

  def _stage_json(self, name: str, p: epath.Path, key: str | None) -> dict:
    """A stage's JSON ``p``: an object (with ``key``, which every one bssl wrote has)."""
    try:
      d = json.loads(p.read_bytes())
      bad = None if isinstance(d, dict) and (key is None or key in d) else "not a " + p.name
      bad = bad or _shape_problem(d)
    except (ValueError, UnicodeDecodeError) as e:  # (json.JSONDecodeError is a ValueError)
      bad = f"not JSON: {e}"
    if bad:
      raise storage.CorruptArtifactError(
          f"{p} is damaged ({bad}): delete the stage's "
          f"folder {self.stage(name)} to recompute that stage, or rerun with "
          f"--recompute_stale, which does that"
      )
    return d

  @property
  def config_path(self) -> epath.Path:
    return self.root / "config.json"

  @property
  def splits_path(self) -> epath.Path:
    return self.root / "splits.json"

  def check_usable(self) -> None:
    """Raises NotADirectoryError when the work directory names an existing file."""
    if self.root.exists() and not self.root.is_dir():
      raise NotADirectoryError(
          f"--workdir={self.root} is an existing file, not a directory; "
          f"accepted: a new or existing folder, local or gs://"
      )


def _shape_problem(d: dict) -> str | None:
  """What in a stage's done.json / started.json is not as bssl writes it (a record whose
  parts have other types would be compared wrongly, or not at all), or None."""
  if "finished" in d and not (isinstance(d.get("artifact_id"), str) and d["artifact_id"]):
    return "no artifact_id"
  rec = d.get("record", d if "inputs" in d else None)
  if rec is None:
    return None  # a stage rerun every time (evaluate, report): no record
  if not isinstance(rec, dict):
    return "its record is not an object"
  if "version" in rec and (not isinstance(rec["version"], int) or isinstance(rec["version"], bool)):
    return f"record version {rec['version']!r} is not a number"
  for part in ("fields", "files", "inputs"):
    if part in rec and not isinstance(rec[part], dict):
      return f"record.{part} is not an object"
  if "record" in d and rec.get("version", 1) >= 2:  # (version 1: refused as older)
    for part in ("fields", "files", "version"):
      if part not in rec:
        return f"record.{part} is missing"
  for k, e in (rec.get("files") or {}).items():
    if not (isinstance(e, dict) and all(isinstance(e.get(x), str) for x in ("kind", "path", "id"))):
      return f"record.files[{k!r}] is not an input entry"
  return None


# --------------------------------------------------------------------------- the lock


class LockedError(Exception):
  """The work directory is in use by another live command (the message names it)."""


class _LocalLockFile:
  """``lock.json`` on a local (or network) disk. A version is (inode, digest of the
  content): every write makes a new file, and the content (a fresh token, a new
  heartbeat) tells a new file from an old one whose freed inode number it reuses."""

  def __init__(self, path: str):
    self.path = path

  @staticmethod
  def _version(ino: int, data: bytes):
    return ino, hashlib.blake2b(data, digest_size=16).hexdigest()

  def _read(self, path: str):
    try:
      with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        data = fh.read()
        return data, self._version(st.st_ino, data), time.time() - st.st_mtime
    except FileNotFoundError:
      return None

  def read(self):
    """(content, version, age in s by the file's mtime), or None when there is none."""
    return self._read(self.path)

  def _whole(self, data: bytes) -> str:
    tmp = f"{self.path}.{uuid.uuid4().hex[:12]}.tmp"
    with open(tmp, "wb") as fh:
      fh.write(data)
      fh.flush()
      os.fsync(fh.fileno())
    return tmp

  def create(self, data: bytes):
    """Makes the file unless one exists (then None); returns its version."""
    tmp = self._whole(data)
    try:
      try:
        os.link(tmp, self.path)  # atomic, and the file is whole from its first moment
        return self._version(os.stat(tmp).st_ino, data)
      except FileExistsError:
        return None
      except OSError:  # a filesystem without hard links
        pass
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return None
      with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        return self._version(os.fstat(fh.fileno()).st_ino, data)
    finally:
      os.unlink(tmp)

  def replace(self, data: bytes, version):
    """Compare-and-swap: replaces the file if it is still ``version`` (renamed away, then
    checked; put back if it was another), then creates it anew; None if another won."""
    away = f"{self.path}.{uuid.uuid4().hex[:12]}.old"
    try:
      os.rename(self.path, away)
    except FileNotFoundError:
      return None
    try:
      moved = self._read(away)
      if moved is None or moved[1] != version:  # not the file we judged: put it back
        try:
          os.link(away, self.path)
        except OSError:
          pass
        return None
    finally:
      os.unlink(away)
    return self.create(data)

  def refresh(self, data: bytes, version):
    """The owner's rewrite (heartbeat): the new content if the file is still ``version``."""
    cur = self.read()
    if cur is None or cur[1] != version:
      return None
    tmp = self._whole(data)
    new = self._version(os.stat(tmp).st_ino, data)
    os.replace(tmp, self.path)
    return new

  def delete(self, version) -> None:
    cur = self.read()
    if cur is not None and cur[1] == version:
      os.unlink(self.path)


class _GcsLockFile:
  """``lock.json`` on ``gs://``: a version is the object's generation; creates, takeovers,
  heartbeats and deletes carry the store's own precondition (``ifGenerationMatch``, 0 for
  "must not exist"), so of two writers of one generation exactly one succeeds."""

  def __init__(self, url: str):
    import fsspec  # (as bssl.storage: only for gs://)

    self.fs, rel = fsspec.core.url_to_fs(url)
    self.bucket, self.key = rel.split("/", 1)

  def read(self):
    try:
      headers, body = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
    except FileNotFoundError:
      return None
    gen = headers.get("x-goog-generation")
    if gen is None:  # (a store that does not send it: the metadata's, then that generation)
      meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
      gen = meta["generation"]
      try:
        body = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media", generation=gen)[
            1
        ]
      except FileNotFoundError:
        return self.read()
    return body, int(gen), None

  def _upload(self, data: bytes, match: int):
    meta = json.dumps({"name": self.key, "contentType": "application/json"})
    body = (
        (
            f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
            f"Content-Type: application/json\n\n"
        ).encode()
        + data
        + b"\n--==0==--"
    )
    try:
      out = self.fs.call(
          "POST",
          f"{self.fs._location}/upload/storage/v1/b/{urllib.parse.quote(self.bucket)}/o",
          uploadType="multipart",
          ifGenerationMatch=str(match),
          headers={"Content-Type": 'multipart/related; boundary="==0=="'},
          data=body,
          json_out=True,
      )
    except FileExistsError:  # gcsfs's word for 412 Precondition Failed
      return None
    return int(out["generation"])

  def create(self, data: bytes):
    return self._upload(data, 0)

  def replace(self, data: bytes, version):
    return self._upload(data, version)

  refresh = replace

  def delete(self, version) -> None:
    try:
      self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=str(version))
    except (FileExistsError, FileNotFoundError):
      pass  # taken over meanwhile, or gone


def _when(t) -> str:
  try:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(t)))
  except (TypeError, ValueError, OverflowError):
    return "an unknown time"


def describe_owner(owner: dict) -> str:
  """``pid P on host H since T (command)``."""
  cmd = str(owner.get("command") or "?")
  cmd = cmd if len(cmd) <= 300 else cmd[:297] + "..."
  return (
      f"pid {owner.get('pid')} on host {owner.get('host')} since "
      f"{_when(owner.get('since'))} ({cmd})"
  )


class WorkdirLock:
  """One command per work directory: ``<root>/lock.json`` (module doc). ``acquire(wait)``
  takes it, taking over the lock of an owner that is gone (a line says so), or raises
  :class:`LockedError` naming the live owner (``wait``: waits for it instead, a line now
  and then); ``release()`` (also on SIGTERM while held: then the previous handler, or the
  default action, follows) gives it back. While held, a thread rewrites the heartbeat
  every ``HEARTBEAT_S``. A process holds it on behalf of its whole run: in a multi-process
  run only process 0 takes it (``bssl.engine``)."""

  def __init__(self, root: storage.PathLike, log=print, command: str | None = None):
    self.root = storage.path(root)
    self.path = self.root / LOCK_FILE
    remote = storage.is_remote(self.root)
    self.file = _GcsLockFile(str(self.path)) if remote else _LocalLockFile(os.fspath(self.path))
    self.log = log
    self.command = command if command is not None else shlex.join(sys.argv)
    self.token = uuid.uuid4().hex
    self._version = None
    self._owner: dict = {}
    self._made: list[str] = []  # local folders this lock created (removed again if empty)
    self._mutex = threading.Lock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._previous = None
    self._creating = False  # a create or takeover is in flight: a SIGTERM waits for it
    self._term_pending: tuple | None = None

  @property
  def held(self) -> bool:
    return self._version is not None

  def _gone(self, owner: dict | None, version, age, first_seen: dict) -> str | None:
    """Why the owner of the lock read is gone (its lock may be taken over), or None."""
    if owner is None:  # unreadable: damaged, or being written (O_CREAT|O_EXCL)
      if age is None or age > UNREADABLE_GRACE_S:
        return "its lock file is unreadable"
      return None
    if owner.get("host") == socket.gethostname():
      if procs.owner_alive(owner, host_checked=True):
        return None
      return f"pid {owner.get('pid')} no longer runs on this host"
    now = time.time()
    try:
      beat = now - float(owner.get("heartbeat"))
    except (TypeError, ValueError):
      beat = float("inf")
    if beat > STALE_S:
      return f"its last heartbeat was {beat:.0f}s ago (more than {STALE_S:g}s)"
    # by this host's clock only (immune to clock skew): unchanged while we waited
    seen = first_seen.setdefault(version, now)
    if now - seen > STALE_S:
      return f"its heartbeat has not changed for {now - seen:.0f}s (more than {STALE_S:g}s)"
    return None

  def _refusal(self, owner: dict | None, age) -> str:
    where = f"--workdir {self.root} is in use by another bssl command"
    then = "wait for it to end, rerun with --wait_for_lock to wait for it, or stop it"
    if owner is None:
      return (
          f"{where}: {self.path} is being written ({age:.0f}s ago); {then} and rerun (a "
          f"damaged lock file is taken over once {UNREADABLE_GRACE_S:g}s old)"
      )
    if owner.get("host") == socket.gethostname():
      return f"{where}: {describe_owner(owner)}; {then} (kill {owner.get('pid')}) and rerun"
    try:
      beat = f"{time.time() - float(owner.get('heartbeat')):.0f}s ago"
    except (TypeError, ValueError):
      beat = "never"
    return (
        f"{where}: {describe_owner(owner)}, last heartbeat {beat}; {then} and rerun (its "
        f"lock, {self.path}, is taken over once its heartbeat is {STALE_S:g}s old)"
    )

  def acquire(self, wait: bool = False) -> None:
    """Takes the lock (see the class doc); raises LockedError if a live owner holds it."""
    if self.held:
      return
    if not storage.is_remote(self.root):
      d = os.fspath(self.root)
      while d and not os.path.exists(d):
        self._made.append(d)
        d = os.path.dirname(d)
      os.makedirs(os.fspath(self.root), exist_ok=True)
    t0 = time.time()
    me = dict(procs.owner(), command=self.command, token=self.token)

    def mine() -> bytes:  # (since: when it is taken, not when this command began to wait)
      now = time.time()
      owner.update(me, since=now, heartbeat=now)
      return storage.to_json(owner).encode()

    owner: dict = {}
    first_seen: dict = {}
    told = None
    # SIGTERM from now on releases what is held (nothing yet: then it ends the process as
    # before); one that lands while the lock file is being made waits until its version is
    # known, so the lock made is released, never left behind
    self._catch_sigterm()
    try:
      while True:
        cur = self.file.read()
        if cur is None:
          version = self._made_or_none(lambda: self.file.create(mine()), owner)
          if version is not None:
            break
          time.sleep(0.05)  # another command made it meanwhile: read it
          continue
        body, version, age = cur
        try:
          other = json.loads(body)
          other = other if isinstance(other, dict) else None
        except ValueError:
          other = None
        if other is not None and other.get("token") == self.token:
          owner = other
          break  # ours (a create whose answer was lost and retried)
        why = self._gone(other, version, age, first_seen)
        if why is not None:
          who = describe_owner(other) if other else f"an unreadable {self.path}"
          self.log(f"bssl: taking over the lock of {self.root} from {who}: {why}")
          version = self._made_or_none(lambda v=version: self.file.replace(mine(), v), owner)
          if version is not None:
            break
          time.sleep(0.05)  # another command took it over first: read it
          continue
        if not wait:
          raise LockedError(self._refusal(other, age))
        now = time.time()
        if told is None or now - told >= WAIT_LOG_S:
          who = describe_owner(other) if other else f"an unreadable {self.path}"
          self.log(
              f"bssl: --wait_for_lock: {self.root} is in use by {who}; waiting "
              f"({now - t0:.0f}s so far)"
          )
          told = now
        time.sleep(WAIT_POLL_S)
    except BaseException:
      self._restore_sigterm()
      self._remove_made()
      raise
    if told is not None:
      self.log(f"bssl: took the lock of {self.root} after waiting {time.time() - t0:.0f}s")
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="bssl-workdir-lock", daemon=True)
    self._thread.start()
    if self._term_pending is not None:  # a SIGTERM landed while the lock was being made
      self._on_sigterm(*self._term_pending)

  def _made_or_none(self, make, owner: dict):
    """``make()`` (a create or takeover: the new version, or None when another command
    won), with the version recorded as held before a SIGTERM is let through."""
    self._creating = True
    try:
      version = make()
      if version is not None:
        self._version, self._owner = version, owner
      return version
    finally:
      self._creating = False

  def _beat(self) -> None:
    """Rewrites the heartbeat every HEARTBEAT_S while held."""
    while not self._stop.wait(HEARTBEAT_S):
      with self._mutex:
        if self._version is None or self._stop.is_set():
          return
        owner = dict(self._owner, heartbeat=time.time())
        try:
          version = self.file.refresh(storage.to_json(owner).encode(), self._version)
        except Exception as e:  # a network error: try again at the next beat
          self.log(f"bssl: warning: could not refresh the heartbeat of {self.path}: {e}")
          continue
        if version is None:
          self.log(
              f"bssl: warning: the lock of {self.root} was taken over by another command "
              f"(this one missed {STALE_S:g}s of heartbeats?); two commands may now write there"
          )
          self._version = None
          return
        self._version, self._owner = version, owner

  def _catch_sigterm(self) -> None:
    """Releases on SIGTERM too (outside a training loop, which has its own handler: there
    it raises and the ``finally`` releases); then the previous handler or the default."""
    if threading.current_thread() is not threading.main_thread():
      return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None:
      return
    self._previous = previous
    signal.signal(signal.SIGTERM, self._on_sigterm)

  def _restore_sigterm(self) -> None:
    if self._previous is not None:
      try:
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
          signal.signal(signal.SIGTERM, self._previous)
      except ValueError:  # not the main thread
        pass
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    if self._creating:  # the lock file is being made: release it once its version is known
      self._term_pending = (signum, frame)
      return
    previous = self._previous
    self.release()
    if callable(previous):
      previous(signum, frame)
    else:  # the default action: end the process by the signal
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGTERM)

  def release(self) -> None:
    """Gives the lock back (if still held by this command), on every exit."""
    self._stop.set()
    self._restore_sigterm()
    got = self._mutex.acquire(timeout=10)  # (a SIGTERM may land while the heartbeat writes)
    try:
      version, self._version = self._version, None
      if version is not None:
        try:
          self.file.delete(version)
        except Exception as e:  # the next command takes it over (this pid is gone)
          self.log(f"bssl: warning: could not remove {self.path}: {e}")
    finally:
      if got:
        self._mutex.release()
    self._remove_made()

  def _remove_made(self) -> None:
    """Folders the lock made for nothing (a run stopped before writing) are removed."""
    for d in self._made:
      try:
        os.rmdir(d)
      except OSError:
        break
    self._made = []

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
