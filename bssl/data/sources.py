"""Random-access data sources. Every record is a dict ``{'image': uint8 [H,W,C],
'label': int32 (−1 when unknown), 'id': int64}``; ``id`` is the record's index
in its underlying source, so selections (D̂) can point back into U.

Sources: the offline default Fashion-MNIST (idx files), TFDS datasets through
``tfds.data_source`` (ArrayRecord), an image folder / file list (the form of
YFCC-like unlabelled collections), a deterministic fake source for tests, and
views (subsets, pseudo-labelled rows of D̂).
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence

import numpy as np

from bssl import deps, storage
from bssl.data import decode
from bssl.data.listing import (
    IMAGE_EXTENSIONS,
    LinkError,
    ListingError,
    list_class_folders,
    list_inputs,
)

FASHION_MNIST_DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# The identity tag of sources read from image files; bumped when the id or identity rule
# changes, so recorded identities go stale once (v2: whole-path order, see
# bssl.data.listing.list_inputs; v3: files by content and relative path, bssl.deps.
# files_identity, instead of absolute path, size and mtime).
FILES_IDENTITY = "files-v3"


class DataError(ValueError):
  """Missing or malformed data, with a message that says how to fix it."""


class BadImageError(DataError):
  """An image of a labelled set that cannot be decoded."""


# ----------------------------------------------------------------------------- base


class ArraySource:
  """In-memory arrays: images uint8 [N,H,W,C], labels int32 [N], ids int64 [N]."""

  def __init__(
      self,
      images: np.ndarray,
      labels: np.ndarray | None = None,
      ids: np.ndarray | None = None,
      class_names: Sequence[str] | None = None,
  ):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    self.images = images
    n = len(images)
    self.labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    self.ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    self.class_names = tuple(class_names) if class_names else None

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict:
    return {"image": self.images[i], "label": self.labels[i], "id": self.ids[i]}

  def take(self, positions: np.ndarray) -> dict:
    """Records ``positions`` as arrays (one gather): what ``__getitem__`` gives, batched.
    A run of consecutive positions (scoring's batches of an in-memory U) gives a view of
    the images, not a copy: read-only, for the caller to copy into its batch."""
    positions = np.asarray(positions, np.int64)
    n = len(positions)
    if (
        n
        and positions[0] >= 0
        and positions[-1] - positions[0] == n - 1
        and (n == 1 or np.all(np.diff(positions) == 1))
    ):
      images = self.images[positions[0] : positions[-1] + 1].view()
      images.flags.writeable = False
    else:
      images = self.images[positions]
    return {
        "image": images,
        "label": self.labels[positions],
        "id": self.ids[positions],
        "valid": np.ones(len(positions), bool),
    }

  def subset(self, indices: np.ndarray, hide_labels: bool = False) -> ArraySource:
    indices = np.asarray(indices, np.int64)
    labels = None if hide_labels else self.labels[indices]
    return ArraySource(self.images[indices], labels, self.ids[indices], self.class_names)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: str) -> np.ndarray:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4:
    raise DataError(f"{path} is not an idx file (too short)")
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise DataError(f"{path} is not an unsigned-byte idx file")
  dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
  arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if arr.size != int(np.prod(dims)):
    raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
  return arr.reshape(dims)


def find_fashion_mnist(folder: str | None) -> dict[str, str]:
  """Paths of the four idx files (plain or .gz) in ``folder`` or the default locations."""
  candidates = [folder] if folder else list(FASHION_MNIST_DEFAULT_DIRS)
  for d in candidates:
    paths = {}
    for key, stem in FASHION_MNIST_FILES.items():
      for name in (stem + ".gz", stem):
        if d and os.path.exists(os.path.join(d, name)):
          paths[key] = os.path.join(d, name)
          break
    if len(paths) == 4:
      return paths
  where = folder or ", ".join(FASHION_MNIST_DEFAULT_DIRS)
  raise DataError(
      f"data.folder: Fashion-MNIST idx files not found in {where!r}. Accepted: a folder "
      f"holding {', '.join(FASHION_MNIST_FILES.values())} (optionally .gz). Install them with "
      f"'apt-get install dataset-fashion-mnist' (files go to {FASHION_MNIST_DEFAULT_DIRS[0]}) "
      f"or set --config.data.folder=<dir>."
  )


def load_fashion_mnist(folder: str | None = None) -> tuple[ArraySource, ArraySource]:
  """(train 60k, test 10k) Fashion-MNIST as ArraySources, images [N,28,28,1]."""
  p = find_fashion_mnist(folder)
  return fashion_mnist_split(p, "train"), fashion_mnist_split(p, "test")


def fashion_mnist_split(paths: dict[str, str], split: str) -> ArraySource:
  """Split ``train`` or ``test`` of Fashion-MNIST from the idx files ``paths``
  (:func:`find_fashion_mnist`'s)."""
  return ArraySource(
      _read_idx(paths[f"{split}_images"]),
      _read_idx(paths[f"{split}_labels"]),
      class_names=FASHION_MNIST_CLASSES,
  )


def fake_source(
    num: int, image_shape: Sequence[int], num_classes: int, seed: int, learnable: bool = True
) -> ArraySource:
  """Deterministic fake images; with ``learnable`` each class has its own mean colour
  pattern so tiny runs can learn something."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=num).astype(np.int32)
  noise = rng.integers(0, 96, size=(num, *image_shape), dtype=np.int64)
  if learnable:
    protos = np.random.default_rng(12345).integers(0, 160, size=(num_classes, *image_shape))
    images = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8)
  else:
    images = noise.astype(np.uint8)
  return ArraySource(images, labels, class_names=[f"class_{c}" for c in range(num_classes)])


# ----------------------------------------------------------------------------- image files


def decode_image(data_or_path, channels: int = 3) -> np.ndarray:
  """Decodes an encoded image (bytes or path) into uint8 [H,W,channels] with
  :func:`bssl.data.decode.decode` (EXIF orientation, any mode, 16-bit greys scaled)."""
  data = (
      data_or_path
      if isinstance(data_or_path, (bytes, bytearray))
      else decode.read_bytes(data_or_path)
  )
  return decode.decode(bytes(data), channels)


def _note_names(src) -> None:
  """Notes, once per running stage, that it read ``src``'s file names (they go into what it
  writes: D̂'s keys, the list of bad images): input ``<field>:keys`` of kind
  ``<src.KEYS_KIND>``, identified by the folder the names are under, so the same files
  moved elsewhere (the same contents: no other stage goes stale) make the stages that
  wrote their old names stale."""
  noted = getattr(src, "noted_as", None)
  if noted is None or not deps.active():
    return
  key, path = noted
  deps.note_input(f"{key}:keys", src.KEYS_KIND, path, src.keys_identity())


def names_under(folder: str) -> str:
  """The identity of the names of files under ``folder`` (what ``<field>:keys`` records)."""
  return "names-under:" + str(folder).rstrip("/")


class ImageFileSource:
  """Unlabelled images from a folder (recursively, symlinked folders followed) or a file
  list (one path per line, relative paths resolved against the list's folder); local or
  gs://. Ids are positions in the list of paths sorted as whole strings
  (:func:`bssl.data.listing.list_inputs`: a folder's files by their path relative to it, so
  ``a.jpg`` comes before ``a/b.jpg``; a list's resolved paths), so a folder, a list of its
  files and its ``gs://`` copy give the same ids, stable across runs and hosts.
  For U at scale, ingest it once into shards instead (``python -m bssl.ingest``,
  ``unlabelled.kind='shards'``).

  Records carry ``valid``: False when the file cannot be decoded, so the scoring stage
  skips, counts and lists it (with :meth:`reason_of`) instead of dying on one bad file.
  """

  def __init__(self, path: str, channels: int = 3):
    try:
      files = list_inputs(path, IMAGE_EXTENSIONS) if path else []
    except ListingError as e:
      raise DataError("unlabelled.path: " + str(e).replace("--input: ", "")) from None
    if not files:
      raise DataError(
          f"unlabelled.path: {path!r} does not exist. Accepted: a folder of image files "
          f"({', '.join(IMAGE_EXTENSIONS)}), searched recursively, or a text file listing one "
          f"image path per line."
      )
    self.path, self.files = path, files
    self.channels = channels
    self.class_names = None

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict:
    try:
      img = decode_image(self.files[i], self.channels)
      valid = True
    except decode.DecodeError:
      img = np.zeros((1, 1, self.channels), np.uint8)
      valid = False
    return {"image": img, "label": np.int32(-1), "id": np.int64(i), "valid": valid}

  KEYS_KIND = "filelist_keys"
  noted_as: tuple[str, str] | None = None  # (input key, path) once noted by the recipe

  def name_of(self, i: int) -> str:
    _note_names(self)
    return self.files[i]

  def keys_identity(self) -> str:
    """What the names of these files depend on beyond :meth:`identity`: the folder they
    are under (:func:`bssl.deps.common_folder`)."""
    if getattr(self, "_keys_id", None) is None:  # (asked for every name a stage reads)
      self._keys_id = names_under(deps.common_folder(self.files))
    return self._keys_id

  def identity(self, content: bool = False) -> str:
    """What these images are, as a stage's record stores it: every file by (path relative
    to the files' common folder, content: :func:`bssl.deps.files_identity`), in id order.
    So files added, removed, renamed or rewritten (whatever their mtime) change it; the
    same files as a folder, a list of them, through a symlink, moved or copied (``cp -a``,
    ``gs://``) do not. ``content`` is ignored (files are always identified by content)."""
    del content
    return f"{FILES_IDENTITY}:" + deps.files_identity(self.files)

  def reason_of(self, i: int) -> str:
    """Why image ``i`` is not valid (decoded again: only asked for the bad ones)."""
    try:
      decode_image(self.files[i], self.channels)
    except decode.DecodeError as e:
      return e.reason
    return "decodes now (changed since it was scored?)"


class LabelledFolderSource:
  """Labelled images in one subfolder per class (``root/<class>/*.png``, the convention of
  torchvision's ImageFolder and Keras' ``image_dataset_from_directory``); local or gs://.
  Classes are the sorted subfolder names (or ``classes``, to give a test folder the
  training folder's classes); label ``c`` is the c-th class. Images in subfolders of a
  class folder count for that class. Ids are positions in the list sorted by class, then
  by whole path within the class (:func:`bssl.data.listing.list_inputs`' order). An image
  that cannot be decoded stops training with its file named
  (:func:`bssl.data.checks.scan_decodable` finds them all before any training)."""

  def __init__(
      self,
      root: str,
      channels: int = 3,
      classes: Sequence[str] | None = None,
      field: str = "data.train_dir",
      *,
      _files=None,
      _labels=None,
  ):
    self.root, self.channels, self.field = root, channels, field
    if _files is not None:  # a subset
      self.files, self.labels, self.class_names = _files, _labels, tuple(classes)
      self.ids = np.arange(len(self.files), dtype=np.int64)
      return
    p = storage.path(root) if root else None
    if p is None or not p.is_dir():
      raise DataError(
          f"{field}: {root!r} is not a folder. Accepted: a folder with one "
          f"subfolder of images per class ({', '.join(IMAGE_EXTENSIONS)})."
      )
    found = sorted(c.name for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
    if not found:
      raise DataError(
          f"{field}: {root!r} has no class subfolders (expected "
          f"{root}/<class name>/<image files>)"
      )
    if classes is None:
      classes = found
    else:
      unknown = sorted(set(found) - set(classes))
      if unknown:
        raise DataError(
            f"{field}: class folders {unknown} of {root!r} are not classes of "
            f"data.train_dir ({len(classes)} classes: {list(classes)[:10]}...)"
        )
    self.class_names = tuple(classes)
    files, labels = [], []
    present = [(c, name) for c, name in enumerate(self.class_names) if name in found]
    try:  # (an image reached from two class folders, by a symlink, is refused)
      listed = list_class_folders(str(p), [name for _, name in present], IMAGE_EXTENSIONS)
    except LinkError as e:
      raise DataError(f"{field}: " + str(e).replace("--input: ", "")) from None
    for (c, _), fs in zip(present, listed):
      files += fs
      labels += [c] * len(fs)
    if not files:
      raise DataError(
          f"{field}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under the "
          f"class folders of {root!r}"
      )
    self.files, self.labels = files, np.asarray(labels, np.int32)
    self.ids = np.arange(len(files), dtype=np.int64)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict:
    try:
      img = decode_image(self.files[i], self.channels)
    except decode.DecodeError as e:
      raise BadImageError(
          f"{self.field}: cannot decode {self.files[i]} ({e.reason}); remove " f"or replace it"
      ) from None
    return {"image": img, "label": self.labels[i], "id": self.ids[i]}

  def subset(self, indices, hide_labels: bool = False) -> LabelledFolderSource:
    idx = np.asarray(indices, np.int64)
    labels = np.full(len(idx), -1, np.int32) if hide_labels else self.labels[idx]
    out = LabelledFolderSource(
        self.root,
        self.channels,
        self.class_names,
        self.field,
        _files=[self.files[j] for j in idx],
        _labels=labels,
    )
    out.ids = self.ids[idx]
    out.noted_as = self.noted_as
    return out

  KEYS_KIND = "folder_keys"
  noted_as: tuple[str, str] | None = None  # (input key, path) once noted by the recipe

  def name_of(self, i: int) -> str:
    _note_names(self)
    return self.files[i]

  def keys_identity(self) -> str:
    """What the names of these files depend on beyond :meth:`identity`: their folder."""
    return names_under(str(storage.path(self.root)))

  def identity(self, content: bool = False) -> str:
    """What this labelled set is, as a stage's record stores it: every file by (path
    relative to the folder, label, content: :func:`bssl.deps.files_identity`), in id
    order. So class folders swapped or renamed, files added, removed, moved between classes
    or rewritten (whatever their mtime) change it; the same folder moved, copied or reached
    through a symlink does not. ``content`` is ignored (always by content)."""
    del content
    return f"{FILES_IDENTITY}:" + deps.files_identity(
        self.files, str(storage.path(self.root)), labels=self.labels
    )


# ----------------------------------------------------------------------------- TFDS


class TFDSSource:
  """A TFDS dataset read through ``tfds.data_source`` (ArrayRecord, no TensorFlow)."""

  def __init__(
      self,
      name: str,
      split: str,
      data_dir: str | None = None,
      image_key: str = "image",
      label_key: str = "label",
  ):
    import tensorflow_datasets as tfds

    try:
      self._src = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:
      hint = ""
      if name.startswith("imagenet2012"):
        hint = (
            " ImageNet cannot be downloaded automatically: download ILSVRC2012_img_train.tar "
            "and ILSVRC2012_img_val.tar from image-net.org, put them in "
            "<data_dir>/downloads/manual/, then run once (needs tensorflow) "
            "'tfds build imagenet2012 --data_dir=<data_dir> --file_format=array_record'"
            " and set --config.data.tfds_data_dir=<data_dir>."
        )
      else:
        hint = (
            f" Build it once (needs tensorflow at build time only): 'tfds build {name} "
            f"--data_dir=<data_dir> --file_format=array_record', then point the config's "
            f"tfds_data_dir at <data_dir> (for the transfer target: "
            f"--config.transfer.tfds_data_dir)."
        )
      raise DataError(
          f"data: TFDS dataset {name!r} split {split!r} is not available in "
          f"data_dir={data_dir or '~/tensorflow_datasets'}: {type(e).__name__}: "
          f"{str(e)[:300]}.{hint}"
      ) from e
    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key
    try:
      self.class_names = tuple(self._src.dataset_info.features[label_key].names)
    except Exception:
      self.class_names = None
    try:  # the dataset's own class count (ClassLabel), when its info says it
      self.num_classes = int(self._src.dataset_info.features[label_key].num_classes)
    except Exception:
      self.num_classes = len(self.class_names) if self.class_names else None

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> dict:
    rec = self._src[i]
    img = rec[self.image_key]
    if isinstance(img, (bytes, bytearray)):
      try:
        img = decode_image(img)
      except ValueError as e:
        raise BadImageError(f"{self.name}[{self.split}] record {i} cannot be decoded: {e}") from e
    img = decode.scale_to_uint8(img)  # a 16-bit image feature: scaled, not wrapped
    if img.ndim == 2:
      img = img[..., None]
    return {"image": img, "label": np.int32(rec.get(self.label_key, -1)), "id": np.int64(i)}


# ----------------------------------------------------------------------------- views


class SubsetView:
  """Rows ``indices`` of a source, optionally with labels hidden (−1) and ids
  renumbered to positions in the view.

  ``unreadable`` (view position -> reason) marks rows known not to decode (U's files found
  by :func:`bssl.data.checks.scan_decodable` when U is the rest of a training folder,
  whose source raises on a bad file): they are ``valid == False`` records without being
  read, which scoring skips and lists with the reason."""

  def __init__(self, source, indices: np.ndarray, hide_labels: bool = False, reindex: bool = False):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.hide_labels = hide_labels
    self.reindex = reindex  # ids become positions in this view (U's image ids)
    self.class_names = getattr(source, "class_names", None)
    self.unreadable: dict[int, str] = {}

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if i in self.unreadable:
      return {
          "image": np.zeros((1, 1, 1), np.uint8),
          "label": np.int32(-1),
          "id": np.int64(i if self.reindex else self.indices[i]),
          "valid": False,
      }
    rec = dict(self.source[int(self.indices[i])])
    if self.hide_labels:
      rec["label"] = np.int32(-1)
    if self.reindex:
      rec["id"] = np.int64(i)
    return rec

  def take(self, positions: np.ndarray) -> dict | None:
    """:meth:`__getitem__` of many positions in one gather, when the source can (else
    None); rows marked unreadable are left to the per-record path."""
    inner = getattr(self.source, "take", None)
    positions = np.asarray(positions, np.int64)
    if inner is None or any(int(i) in self.unreadable for i in positions):
      return None
    rows = inner(self.indices[positions])
    if rows is None:
      return None
    rows = dict(rows)
    if self.hide_labels:
      rows["label"] = np.full(len(positions), -1, np.int32)
    if self.reindex:
      rows["id"] = positions.copy()
    return rows

  def name_of(self, i: int) -> str:
    inner = getattr(self.source, "name_of", None)
    return inner(int(self.indices[i])) if inner else f"record {int(self.indices[i])}"

  def reason_of(self, i: int) -> str:
    """Why row ``i`` is not valid: its mark, else the source's own reason."""
    i = int(i)
    if i in self.unreadable:
      return self.unreadable[i]
    inner = getattr(self.source, "reason_of", None)
    return inner(int(self.indices[i])) if inner else "cannot be made the model's input"

  def true_labels(self) -> np.ndarray | None:
    labels = getattr(self.source, "labels", None)
    return None if labels is None else np.asarray(labels)[self.indices]


class PseudoLabelSource:
  """D̂ as a training set: row r is image ``ids[r]`` of U (ids are U's record ids,
  i.e. positions in U) with label ``classes[r]``."""

  def __init__(self, unlabelled, ids: np.ndarray, classes: np.ndarray):
    self.unlabelled = unlabelled
    self.ids = np.asarray(ids, np.int64)
    self.classes = np.asarray(classes, np.int32)
    self.class_names = getattr(unlabelled, "class_names", None)

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, r: int) -> dict:
    rec = dict(self.unlabelled[int(self.ids[r])])
    if not rec.get("valid", True):
      raise BadImageError(f"selected image id {int(self.ids[r])} cannot be decoded")
    rec["label"] = self.classes[r]
    return rec


def class_balanced_indices(
    labels: np.ndarray,
    per_class: int,
    num_classes: int,
    rng: np.random.Generator,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
  """``per_class`` random indices of each class (sorted), skipping ``exclude``."""
  labels = np.asarray(labels)
  mask = np.ones(len(labels), bool)
  if exclude is not None and len(exclude):
    mask[exclude] = False
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero((labels == c) & mask)
    if len(idx) < per_class:
      raise DataError(f"class {c} has only {len(idx)} examples, fewer than {per_class} requested")
    out.append(rng.choice(idx, per_class, replace=False))
  return np.sort(np.concatenate(out))
