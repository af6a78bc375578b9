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
"""

from __future__ import annotations

import os

from etils import epath

from bssl import storage


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
    """The stage's done.json, or None when the stage is not complete."""
    p = self.done_path(name)
    return storage.read_json(p) if p.exists() else None

  def started(self, name: str) -> dict | None:
    p = self.started_path(name)
    return storage.read_json(p) if p.exists() else None

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
