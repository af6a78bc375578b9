"""The listing rule every image id rests on: the files of an input (a folder, local or
``gs://``, or a text file listing one path per line) sorted as whole path strings; an
image's id is its position in this list. Image sources, video lists, WebDataset inputs and
the ingest all list through :func:`list_inputs`, so a folder, a list of its files and a
``gs://`` copy of it give the same ids everywhere.

:data:`IMAGE_EXTENSIONS` is the one list of the image files bssl reads.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from bssl import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ListingError(ValueError):
  """An input that cannot be listed: missing, empty, or a file that is not a list (the
  message names ``--input``; callers that read another field say theirs)."""


def _walk_local(root: str, extensions) -> list[str]:
  """Files under ``root`` (following symlinked folders, each real folder once), relative,
  in walk order (:func:`list_inputs` sorts them)."""
  out, seen = [], set()

  def walk(d: str, rel: str):
    real = os.path.realpath(d)
    if real in seen:  # a symlink loop, or a folder linked twice
      return
    seen.add(real)
    try:
      entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
      return
    for e in entries:
      r = f"{rel}{e.name}"
      if e.is_dir(follow_symlinks=True):
        walk(e.path, r + "/")
      elif _wanted(e.name, extensions) and (
          e.is_file(follow_symlinks=True) or not os.path.exists(e.path)
      ):
        out.append(r)  # (a dangling link is kept: listed as bad, with its reason)

  walk(root, "")
  return out


def _wanted(name: str, extensions) -> bool:
  return extensions is None or name.lower().endswith(tuple(extensions))


def list_inputs(input_path: str, extensions=IMAGE_EXTENSIONS) -> list[str]:
  """The image paths of ``input_path``: a folder (recursive, local or gs://) or a text file
  with one path per line (relative to the list's folder). ``extensions=None`` takes every
  file of a folder.

  One order, on which every image id rests (ids are positions in this list): paths sorted
  as whole strings (Python's order: by code point). A folder's files are sorted by their
  path relative to the folder (``a.jpg`` before ``a/b.jpg``, as ``.`` < ``/``; not the
  walk's folder-by-folder order); a file list's lines are resolved (joined to the list's
  folder, local paths normalised: ``./x`` and ``d/../x`` are ``x``) and the resolved paths
  sorted. So a folder, a list of its files written relative to it (in any order) and a
  ``gs://`` copy of it give the same ids; a tags file "in id order" is in this order."""
  p = storage.path(input_path)
  if not p.exists():
    raise ListingError(
        f"--input: {input_path!r} does not exist. Accepted: a folder of images "
        f"(searched recursively) or a text file listing one path per line."
    )
  if p.is_dir():
    if storage.is_remote(input_path):
      # one paginated listing of the prefix (epath refuses recursive globs on GCS)
      import fsspec

      fs, root = fsspec.core.url_to_fs(str(p))
      proto = str(p).split("://", 1)[0]
      files = sorted(
          f"{proto}://{f}" for f in fs.find(root) if _wanted(f.rsplit("/", 1)[-1], extensions)
      )
    else:
      root = str(p)
      files = [os.path.join(root, r) for r in sorted(_walk_local(root, extensions))]
  else:
    base = str(p.parent)
    remote_base = storage.is_remote(base)
    files = []
    try:
      text = p.read_text()
    except UnicodeDecodeError:
      raise ListingError(
          f"--input: {input_path!r} is a file but not a text list of paths "
          f"(one per line); give the folder that holds it, or a list"
      ) from None
    for line in text.splitlines():
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      if "://" in line:
        files.append(line)
      elif line.startswith("/"):
        files.append(os.path.normpath(line))
      elif remote_base:
        files.append(base.rstrip("/") + "/" + line)
      else:
        files.append(os.path.normpath(os.path.join(base, line)))
    files.sort()
  if not files:
    raise ListingError(
        f"--input: no image files in {input_path!r} (extensions "
        f"{', '.join(extensions or ['any'])})"
    )
  return files


def fingerprint(files: Sequence[str]) -> str:
  """A list of paths (or of other strings) in its order, as 32 hex digits: the identity of
  what a listing's ids mean (files added, removed or renamed change it)."""
  h = hashlib.sha256()
  for f in files:
    h.update(f.encode("utf-8", "surrogateescape") + b"\0")
  return h.hexdigest()[:32]
