"""How long work still takes, written one way in every progress line (training, scoring,
ingest, data checks, eval copies, sweeps). Imports nothing: any layer may use it."""

from __future__ import annotations

import math


def format_duration(seconds: float) -> str:
  """``"12m05s"``, or ``"3h07m"`` from an hour up; ``"?"`` when unknown (inf, nan)."""
  if not math.isfinite(seconds):
    return "?"
  s = int(max(seconds, 0))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def eta(done: float, total: float, elapsed: float) -> str:
  """The time left for ``total`` units of work, at the rate the ``done`` of them took in
  ``elapsed`` seconds, formatted (:func:`format_duration`; ``"?"`` before any is done)."""
  if done <= 0:
    return "?" if total > done else format_duration(0)
  return format_duration((total - done) * elapsed / done)
