"""Stage sharing between the points of a sweep: before a point computes a stage, a
finished copy of it in another point (of this sweep or of the ``--share_from`` sweeps) whose
record (every config field and input it read, :mod:`bssl.deps`) holds for this point is
copied in instead. So one teacher is trained per seed and teacher setting, and one scoring
pass serves a seed's every K and P.

Points in parallel processes coordinate through files only (they may be separate
commands): one lock file per stage name, ``<sweep>/claims/<stage>``, made with an atomic
``os.link`` and taken over when its owner process is gone.
"""

from __future__ import annotations

import json
import os
import time

from bssl import engine, parallel, procs, storage
from bssl import workdir as workdir_lib


def copy_stage(src, dst) -> None:
  """Copies a finished stage's folder, ``done.json`` last (a copy cut short is not done)."""
  src, dst = storage.path(src), storage.path(dst)

  def copy(a, b, top):
    for child in sorted(a.iterdir(), key=lambda c: c.name):
      if top and child.name in ("done.json", "started.json"):
        continue
      if child.is_dir():
        copy(child, b / child.name, False)
      else:
        storage.write_bytes(b / child.name, child.read_bytes())

  copy(src, dst, True)
  storage.write_bytes(dst / "done.json", (src / "done.json").read_bytes())


class Sharer:
  """The engine's share hook for one point: before a stage starts, a finished stage of
  another point (of this sweep, or of the ``--share_from`` sweeps) whose record (every
  config field and input it read, :mod:`bssl.deps`) holds for this point is copied in
  instead of recomputed. With points in parallel processes (``--jobs``), a point that
  reaches a stage another live point is computing, and whose record so far holds for this
  point too, waits for it and then copies it (if its record, once complete, does not hold,
  the point computes its own). The decision and the stage's start happen under one lock
  per stage name (``<root>/claims/<stage>``), so two points do not both start a stage that
  one could share."""

  def __init__(self, root, point: str, share_from=(), log=print, poll_s: float = 2.0):
    self.root, self.point = storage.path(root), point
    self.roots = [self.root] + [storage.path(r) for r in share_from]
    self.log, self.poll_s = log, poll_s
    self.local = not storage.is_remote(self.root)
    self.copied: list[str] = []
    self._held = None

  def _others(self):
    for r in self.roots:
      pts = r / "points"
      if not pts.exists():
        continue
      for d in sorted(pts.iterdir(), key=lambda c: c.name):
        if not (d.name == self.point and r == self.root):
          yield d

  def _find_done(self, name: str, check):
    for d in self._others():
      done = workdir_lib.Workdir(str(d)).done(name)
      if done is not None and done.get("record") and not check(done["record"]):
        return d
    return None

  def _running(self, name: str, check):
    """Another live point computing ``name`` whose record so far holds here."""
    for d in self._others():
      wd = workdir_lib.Workdir(str(d))
      st = wd.started(name)
      if st is None or wd.done(name) is not None or not procs.owner_alive(st.get("owner")):
        continue
      if not check(engine.partial_record(wd, name)):
        return d
    return None

  def __call__(self, name: str, check) -> bool:
    if parallel.process_count() > 1:  # one decision for every host: process 0's
      if parallel.is_main_process():
        self._share(name, check)
      parallel.sync(f"bssl_share_{name}_decided")
      return self.root.joinpath("points", self.point, name, "done.json").exists()
    return self._share(name, check)

  def started(self, name: str) -> None:
    """The engine wrote ``name``'s started.json: other points may now see it."""
    self._release()

  def _lock(self, name: str) -> None:
    if not self.local:
      return
    lock = self.root / "claims" / name
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = procs.owner()
    mine = lock.with_name(f".{name}.{me['pid']}.{me['host']}")
    mine.write_text(json.dumps(me))  # whole before it is linked: a lock is never empty
    while True:
      try:
        os.link(mine, lock)  # atomic, and fails if the lock exists
        mine.unlink(missing_ok=True)
        self._held = lock
        return
      except FileExistsError:
        pass
      try:
        owner = json.loads(lock.read_text() or "{}")
      except (OSError, json.JSONDecodeError):
        owner = {}
      if not owner:  # unreadable: a lock of an older bssl, or gone meanwhile
        try:
          owner = {} if time.time() - os.stat(lock).st_mtime < 10 else {"pid": -1}
        except OSError:
          continue
      if (
          owner.get("pid") == me["pid"]
          and owner.get("host") == me["host"]
          or (owner and not procs.owner_alive(owner))
      ):
        lock.unlink(missing_ok=True)  # ours (a point that stopped), or its process is gone
        continue
      time.sleep(0.2)

  def _release(self) -> None:
    if self._held is not None:
      self._held.unlink(missing_ok=True)
      self._held = None

  def _share(self, name: str, check) -> bool:
    dst = self.root / "points" / self.point / name
    if dst.exists():
      # no started.json and no done.json (the engine calls this hook only then): what is
      # there is a copy cut short by a kill; never resume from it
      storage.rmtree(dst)
    waiting = False
    while True:
      self._lock(name)
      src = self._find_done(name, check)
      if src is not None:
        copy_stage(src / name, dst)
        self._release()
        self.copied.append(name)
        self.log(f"sweep: {name} shared from {src}")
        return True
      other = self._running(name, check) if self.local else None
      if other is None:
        return False  # ours: the lock is released once the engine has started it
      self._release()
      if not waiting:
        self.log(f"sweep: {name} is being computed by point {other.name}; waiting for it")
        waiting = True
      time.sleep(self.poll_s)
