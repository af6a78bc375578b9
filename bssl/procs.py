"""Processes of this machine, as the engine's stage owners and a sweep's ``running/``
entries name them (host, pid and the pid's start time). No JAX here: a sweep's parent
process uses it."""

from __future__ import annotations

import os
import socket


def num_cores() -> int:
  """The cores this process may use (its affinity mask: a Slurm task's CPUs, a taskset),
  at least 1."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not Linux
    return max(1, os.cpu_count() or 1)


def owner() -> dict:
  """This process as the owner of a running stage: host, pid and the pid's start time
  (so that a reused pid is not taken for it)."""
  return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}


def proc_stat(pid: int):
  """(state, parent pid, start time in clock ticks after boot) of a process, from
  /proc/<pid>/stat; None without /proc or without that process."""
  try:
    with open(f"/proc/{pid}/stat") as fh:
      text = fh.read()
    fields = text[text.rindex(")") + 2 :].split()  # the name (field 2) may hold spaces
    return fields[0], int(fields[1]), fields[19]
  except (OSError, ValueError, IndexError):
    return None


def process_start(pid: int) -> str | None:
  """When process ``pid`` started (clock ticks since boot, from /proc), or None."""
  st = proc_stat(pid)
  return st and st[2]


def owner_alive(owner: dict | None, host_checked: bool = False) -> bool:
  """Whether the owner of a running stage (or of a sweep's ``running/`` entry) still
  runs: the pid exists, is not a zombie and started when the owner says (a reused pid is
  another process). An owner on another machine cannot be checked: taken as gone (its
  stage may then be computed twice, never wrongly), unless the caller has already
  restricted itself to this machine's owners (``host_checked``)."""
  if not owner or not host_checked and owner.get("host") != socket.gethostname():
    return False
  try:
    pid = int(owner["pid"])
    os.kill(pid, 0)
  except PermissionError:
    pass  # another user's live process
  except (OSError, ValueError, KeyError, TypeError):
    return False
  st = proc_stat(pid)
  if st is None:
    return True  # no /proc: os.kill's word
  return st[0] not in ("Z", "X") and owner.get("start") in (None, st[2])
