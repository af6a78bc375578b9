"""Host memory allocator settings for XLA:CPU.

XLA:CPU allocates each executable's temporary buffers afresh on every call. With glibc's
defaults every large allocation is a new ``mmap`` whose pages fault in on first touch and
are returned on ``free``: for the demo's small ResNet that is 40-150 ms of kernel time
per train step. Never ``mmap``-ing and never trimming lets freed pages be reused.
``benchmarks/train_step.py --malloc tuned|default`` measures it (resnet_small, batch 64,
2-core CPU: 552 -> 764 images/s; see docs/performance.md, "Speed on this machine (CPU)").

``BSSL_MALLOC`` in the environment: ``tuned`` (default: no mmap, no trimming),
``one_arena`` (also a single malloc arena for all threads) or ``default`` (glibc's own).
This module imports nothing heavy, so it can run before JAX starts its threads.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_malloc() -> bool:
  """Applies the settings above; True when they took effect (glibc, not opted out)."""
  mode = os.environ.get("BSSL_MALLOC", "tuned")
  if mode == "default":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    ok = bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if mode == "one_arena":
      ok = ok and bool(libc.mallopt(_M_ARENA_MAX, 1))
    return ok
  except (OSError, AttributeError):  # not glibc
    return False
