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


class LinkError(ListingError):
  """A symlinked folder that would list files twice or under the wrong name: a link to the
  folder being listed or to a folder holding it (``cat/up -> ..``), or, among class
  folders, an image reached from two class folders (it would get two labels)."""


def _holds(folder: str, path: str) -> bool:
  """Whether real path ``path`` is ``folder`` or inside it."""
  return path == folder or os.path.commonpath([folder, path]) == folder


def _walk_local(root: str, extensions, links: list | None = None) -> list[str]:
  """Files under ``root`` (following symlinked folders, each real folder once), relative,
  in walk order (:func:`list_inputs` sorts them). A symlinked folder that resolves to
  ``root`` or a folder holding it is a :class:`LinkError` (it would list ``root``'s
  neighbours, or ``root`` again, as if they were in it). ``links``, when given, gets
  ``(link, real path, is a folder)`` of every symlink followed: to a folder, or to a listed
  file."""
  out, seen = [], set()
  real_root = os.path.realpath(root)

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
      link = e.is_symlink()
      if e.is_dir(follow_symlinks=True):
        if link:
          to = os.path.realpath(e.path)
          if _holds(to, real_root):
            what = "the folder being listed" if to == real_root else f"a folder holding {root}"
            raise LinkError(
                f"--input: {e.path} is a symlink to {os.readlink(e.path)!r} ({to}), {what}: "
                f"its files would be listed again, or other folders' files as if they were "
                f"in {root}. Accepted: symlinked folders that point outside the folder listed "
                f"and its parents; remove the link or point it elsewhere"
            )
          if links is not None:
            links.append((e.path, to, True))
        walk(e.path, r + "/")
      elif _wanted(e.name, extensions) and (
          e.is_file(follow_symlinks=True) or not os.path.exists(e.path)
      ):
        out.append(r)  # (a dangling link is kept: listed as bad, with its reason)
        if link and links is not None:
          links.append((e.path, os.path.realpath(e.path), False))

  walk(root, "")
  return out


def _owner(path: str, index: dict):
  """``index[f]`` of the nearest of ``path`` and its parent folders ``f`` in ``index``
  (real paths), else None."""
  while True:
    if path in index:
      return index[path]
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent


def _wanted(name: str, extensions) -> bool:
  return extensions is None or name.lower().endswith(tuple(extensions))


def list_inputs(
    input_path: str, extensions=IMAGE_EXTENSIONS, links: list | None = None
) -> list[str]:
  """The image paths of ``input_path``: a folder (recursive, local or gs://) or a text file
  with one path per line (relative to the list's folder). ``extensions=None`` takes every
  file of a folder.

  One order, on which every image id rests (ids are positions in this list): paths sorted
  as whole strings (Python's order: by code point). A folder's files are sorted by their
  path relative to the folder (``a.jpg`` before ``a/b.jpg``, as ``.`` < ``/``; not the
  walk's folder-by-folder order); a file list's lines are resolved (joined to the list's
  folder, local paths normalised: ``./x`` and ``d/../x`` are ``x``) and the resolved paths
  sorted. So a folder, a list of its files written relative to it (in any order) and a
  ``gs://`` copy of it give the same ids; a tags file "in id order" is in this order.

  A local folder's symlinked folders are followed (each real folder once), except one that
  points to the folder itself or a folder holding it (:class:`LinkError`). ``links``, when
  given, gets ``(link, real path, is a folder)`` of every symlink followed (local
  folders)."""
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
      files = [os.path.join(root, r) for r in sorted(_walk_local(root, extensions, links))]
  else:
    base = str(p.parent)
    remote_base = storage.is_remote(base)
    files = []
    raw = p.read_bytes()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      if b"\0" in raw:  # an image or other binary file, not a list
        raise ListingError(
            f"--input: {input_path!r} is a file but not a text list of paths "
            f"(one per line); give the folder that holds it, or a list"
        ) from None
      # names that are not UTF-8 (as `find` lists them): kept as Python keeps file names
      text = raw.decode("utf-8", "surrogateescape")
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


def list_class_folders(root: str, names: Sequence[str], extensions=IMAGE_EXTENSIONS) -> list:
  """The files of each class folder ``root/<name>`` (:func:`list_inputs`; ``[]`` for one
  with no image file), in ``names``' order. An image reached from two class folders would
  get two labels: a class folder that is (or is inside) another, a symlink in one class
  folder to a file or folder of another (or to a folder holding one), or links from two
  classes to one file or folder are a :class:`LinkError` naming the link (as is a link to
  a class folder or its parent, from :func:`list_inputs`). Symlinks to folders or files
  outside the class folders are followed. Cost: a few dictionary lookups per class folder
  and per symlink (none per file)."""
  out, links = [], []
  remote = storage.is_remote(root)
  for name in names:
    folder = str(root).rstrip("/") + "/" + name if remote else os.path.join(str(root), name)
    lk: list = []
    try:
      fs = list_inputs(folder, extensions, None if remote else lk)
    except LinkError as e:
      raise LinkError(
          f"{e} (it is in class folder {name!r}: every image under it would be labelled "
          f"{name!r})"
      ) from None
    except ListingError:
      fs = []
    out.append(fs)
    links.append(lk)
  if remote:  # (no symlinks)
    return out
  accepted = (
      "Accepted: one folder of images per class; symlinks to folders or files outside the "
      "class folders (each image reached from one class folder only)"
  )
  folders = [os.path.join(str(root), name) for name in names]
  reals = [os.path.realpath(f) for f in folders]
  classes: dict[str, int] = {}  # real class folder -> class
  for c, (f, rf) in enumerate(zip(folders, reals)):
    # a class folder that is, or is inside, another
    if rf in classes:
      a, b = (c, classes[rf]) if os.path.islink(f) else (classes[rf], c)
      what = (
          f"a symlink to {os.readlink(folders[a])!r} ({rf})" if os.path.islink(folders[a]) else rf
      )
      raise LinkError(
          f"--input: class folder {folders[a]} is {what}, the same folder as class folder "
          f"{folders[b]}: its images would get two labels. {accepted}; remove the link"
      )
    classes[rf] = c
  held: dict[str, int] = {}  # each folder holding a class folder -> one such class
  for c, rf in enumerate(reals):
    parent = os.path.dirname(rf)
    while parent not in held and parent != os.path.dirname(parent):
      held[parent] = c
      parent = os.path.dirname(parent)
  for c, rf in enumerate(reals):
    outer = _owner(os.path.dirname(rf), classes)
    if outer is not None or rf in held:
      a, b = (c, outer) if outer is not None else (held[rf], c)
      raise LinkError(
          f"--input: class folder {folders[a]} ({reals[a]}) is inside class folder "
          f"{folders[b]} ({reals[b]}): its images would get two labels. {accepted}; "
          f"remove the link"
      )

  def refuse(c, link, real, why):
    raise LinkError(
        f"--input: {link} (in class folder {names[c]!r}) is a symlink to "
        f"{os.readlink(link)!r} ({real}), which {why}: its images would get two labels. "
        f"{accepted}; remove the link"
    )

  every = []  # (real path + "/", class, link, is a folder) of every link followed
  for c, lk in enumerate(links):
    for link, real, is_dir in lk:
      other = _owner(real, classes)  # a file or folder of another class folder
      if other is not None and other != c:
        refuse(c, link, real, f"is in class folder {names[other]!r}")
      other = held.get(real) if is_dir else None  # a folder holding a class folder
      if other is not None and other != c:
        refuse(c, link, real, f"holds class folder {names[other]!r}")
      every.append((real.rstrip("/") + "/", c, link, is_dir))
  # links from two classes to one file or folder, or into a folder another class links to
  every.sort()
  stack: list = []
  for key, c, link, is_dir in every:
    while stack and not key.startswith(stack[-1][0]):
      stack.pop()
    other = next((x for x in stack if x[1] != c), None)
    if other is not None:
      refuse(c, link, key[:-1], f"class folder {names[other[1]]!r} reaches too (by {other[2]})")
    stack.append((key, c, link, is_dir))
  return out


def fingerprint(files: Sequence[str]) -> str:
  """A list of paths (or of other strings) in its order, as 32 hex digits: the identity of
  what a listing's ids mean (files added, removed or renamed change it)."""
  h = hashlib.sha256()
  for f in files:
    h.update(f.encode("utf-8", "surrogateescape") + b"\0")
  return h.hexdigest()[:32]
