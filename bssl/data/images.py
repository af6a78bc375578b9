"""Images at a path, opened one way for U, the weak set and everything else: an ingest's
shards (:class:`bssl.data.shards.ShardSource`) or image files, a folder or a file list
(:class:`bssl.data.sources.ImageFileSource`). Both give image ``i`` the id ``i``, its
position in :func:`bssl.data.listing.list_inputs`' order.

Each source says what it is (``identity()``); that is what a stage's record stores for the
path it read. The kinds of a path that a rerun identifies again without opening the data
through the recipe, ``shards`` and ``filelist``, and an ingest's metadata
(``shards_captions``, ``shards_keys``), are registered with the record here
(:func:`bssl.deps.register_identity`), so :mod:`bssl.deps` itself knows no data format.
"""

from __future__ import annotations

from bssl import deps, storage
from bssl.data import shards, sources

KINDS = ("shards", "files")


def kind_of(path: str) -> str:
  """``shards`` for an ingest's output folder (complete or not), else ``files``."""
  p = storage.path(path)
  return "shards" if (p / "manifest.json").exists() or (p / "ingest.json").exists() else "files"


def open_images(
    path: str,
    channels: int = 3,
    *,
    kind: str | None = None,
    drop_duplicates: bool = True,
    cache_dir: str | None = None,
):
  """The images at ``path`` as a source: ``kind`` ``shards`` (an ingest's ``--out``) or
  ``files`` (an image folder or file list); None: :func:`kind_of` the path.
  ``drop_duplicates`` and ``cache_dir`` are the shards' (:class:`bssl.data.shards.
  ShardSource`). An ingest that cannot be read is a :class:`bssl.data.sources.DataError`."""
  kind = kind or kind_of(path)
  if kind == "files":
    return sources.ImageFileSource(path, channels=channels)
  if kind != "shards":
    raise ValueError(f"images at a path are one of {KINDS}, got {kind!r}")
  try:
    return shards.ShardSource(
        path, channels=channels, drop_duplicates=drop_duplicates, cache_dir=cache_dir
    )
  except (shards.IngestError, FileNotFoundError) as e:
    raise sources.DataError(str(e)) from None


def record_kind(src) -> str:
  """The kind a stage's record notes the images of ``src`` under (the name a rerun
  identifies them again by)."""
  return "shards" if isinstance(src, shards.ShardSource) else "filelist"


def note_images(key: str, path: str, src) -> None:
  """Notes the images ``src`` opened at ``path`` as input ``key`` of the running stage, by
  the source's own identity (a rerun opens the path again, :func:`open_images`). An
  ingest's metadata is noted apart, by whoever reads it: ``<key>:captions`` and
  ``<key>:keys`` when a stage reads its captions, or its keys, urls or paths
  (:meth:`bssl.data.shards.ShardSource.fields`)."""
  if hasattr(src, "noted_as"):  # its metadata or file names, noted when a stage reads them
    src.noted_as = (key, str(path))
  deps.note_input(key, record_kind(src), path, src.identity())


deps.register_identity("shards", shards.identity_of)
for _group in shards.METADATA:
  deps.register_identity(f"shards_{_group}", lambda p, g=_group: shards.metadata_identity_of(p, g))


def _filelist_identity(path: str) -> str:
  """Image files at ``path`` again, as a path opened without a kind (:func:`kind_of`) would
  be now: an ingest's output there now is another input, not the files."""
  if kind_of(path) != "files":
    return "an ingest's output (opened as shards now)"
  return open_images(path, kind="files").identity()


deps.register_identity("filelist", _filelist_identity)
# the folder the names of image files are under (D̂'s keys of an image-file U, or of the
# rest of a class-folder training set): a list is listed again, a folder is its path
deps.register_identity("filelist_keys", lambda p: open_images(p, kind="files").keys_identity())
deps.register_identity("folder_keys", lambda p: sources.names_under(str(storage.path(p))))
