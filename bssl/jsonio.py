"""Small JSON files that mark progress (``done.json``, reports): written atomically, so
a crash never leaves a half-written file that a rerun would trust."""
from __future__ import annotations

import json
import os


def write_json(path: str, obj) -> None:
  """Writes ``obj`` to ``path`` through a temporary file and a rename; numpy scalars
  become floats."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def read_json(path: str):
  with open(path) as f:
    return json.load(f)
