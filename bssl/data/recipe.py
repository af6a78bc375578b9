"""The recipe's data: D, validation, test and U, opened from the config (cheap: no image is
decoded here). Every source is checked to be non-empty before any work starts."""

from __future__ import annotations

import os

import numpy as np

from bssl import deps, fileid
from bssl.config.base import is_video
from bssl.config.names import VIDEO_DATA_KINDS
from bssl.data import images, pipelines, sources
from bssl.data import video as video_lib


class Data:
  """D, validation, test and U, each made once (at start-up, so that missing or empty data
  stops the run before any work) under a record of what making it read
  (:class:`bssl.deps.Memo`). A stage that uses a part records what that part was made
  from: the baseline, which never touches U, does not depend on ``unlabelled.*``; the
  score stage does. The test set is a part of its own: only what reads it (the evaluate
  stage, the copy filter of the score stage) depends on it, so a test image added or
  changed leaves the trained models valid."""

  def __init__(self, spec, labelled, test, unlabelled, notes=()):
    self._spec, self._labelled, self._test = spec, labelled, test
    self._unlabelled = unlabelled
    self.notes = tuple(notes)

  # the image or video view (sizes, augmentation): pipelines.ImageSpec / video.VideoSpec
  spec = property(lambda self: self._spec.get())
  labelled = property(lambda self: self._labelled.get()["labelled"])  # D
  val = property(lambda self: self._labelled.get()["val"])  # for choosing hyperparameters
  test = property(lambda self: self._test.get()["test"])  # never used to choose
  class_names = property(lambda self: self._labelled.get()["class_names"])
  splits = property(lambda self: self._labelled.get()["splits"])
  unlabelled = property(lambda self: self._unlabelled.get()["unlabelled"])  # ids = positions
  unlabelled_true_labels = property(lambda self: self._unlabelled.get()["true_labels"])

  def records(self) -> list:
    """The records of the parts (what each was made from: the files each opened, and where
    it found them), to check a rerun against."""
    return [self._spec.rec, self._labelled.rec, self._test.rec, self._unlabelled.rec]


def _note_files(field: str, src, path: str, content: bool) -> None:
  """Notes a set read from files by the source's identity (paths, labels, contents),
  checked against the data opened again."""
  deps.note_input(field, "data", str(path), src.identity(content))
  if hasattr(src, "keys_identity"):  # a stage that reads its file names notes them too
    src.noted_as = (field, str(path))


def _note_resolved(key: str, folder: str, path: str) -> None:
  """Notes the file a run chose for input ``key`` among candidates (``x.gz`` or ``x``, in
  ``folder``) by its name in the folder and its content: a rerun compares the choice it
  makes then (another candidate, another content) with this one, not the recorded file
  at its recorded path."""
  rel = os.path.relpath(path, folder) if folder else os.path.basename(path)
  deps.note_input(key, "data", path, f"{rel}|{fileid.content_id(path)}")


def _fashion_mnist(d, split: str) -> dict[str, str]:
  """The idx files of Fashion-MNIST's ``split`` (train or test), found in data.folder (or the
  default folders), each noted as the resolution it is (``data.folder:<split>_images``,
  ``..._labels``)."""
  paths = sources.find_fashion_mnist(d.folder)
  for part in ("images", "labels"):
    f = paths[f"{split}_{part}"]
    _note_resolved(f"data.folder:{split}_{part}", os.path.dirname(f), f)
  return paths


def _open_labelled_files(d, suffix: str, counted: str, open_set, content: bool):
  """D's and (when given) validation's sources read from files: ``data.train_<suffix>``,
  ``data.val_<suffix>``, opened by ``open_set(field, class_names)`` (the validation set takes
  the training set's classes). Returns (train, val, their notes); their identities are
  noted as inputs. Files are listed class by class: a fixed shuffle (the same for every
  seed) so that data.subset and unlabelled.limit (first N) take every class, nested."""
  train = open_set(f"train_{suffix}", None)
  if len(train.class_names) != d.num_classes:
    raise sources.DataError(
        f"data.num_classes={d.num_classes} but data.train_{suffix} {d[f'train_{suffix}']!r} "
        f"{counted.format(n=len(train.class_names))} {list(train.class_names)[:10]}; "
        f"set --config.data.num_classes={len(train.class_names)}"
    )
  val = open_set(f"val_{suffix}", train.class_names) if d.get(f"val_{suffix}") else None
  sets = (("train", train), ("val", val))
  for k, s in sets:
    if s is not None:
      _note_files(f"data.{k}_{suffix}", s, getattr(s, "root", None) or d[f"{k}_{suffix}"], content)
  notes = [n for _, s in sets if s is not None for n in getattr(s, "notes", ())]
  return train.subset(np.random.default_rng(0).permutation(len(train))), val, notes


def _open_test_files(d, suffix: str, open_set, classes, content: bool):
  """The test set read from files (``data.test_<suffix>``, with the training set's
  ``classes``), noted as an input; (test, its notes)."""
  test = open_set(f"test_{suffix}", classes)
  _note_files(
      f"data.test_{suffix}", test, getattr(test, "root", None) or d[f"test_{suffix}"], content
  )
  return test.subset(np.random.default_rng(1).permutation(len(test))), list(
      getattr(test, "notes", ())
  )


def _video_folder_opener(d, spec):
  kw = dict(video_dir=d.get("video_dir"), max_frames=d.get("max_frames"))
  return lambda field, classes: video_lib.VideoFolderSource(
      d[field], spec, class_names=classes, field=f"data.{field}", **kw
  )


def _image_folder_opener(d):
  return lambda field, classes: sources.LabelledFolderSource(
      d[field], d.channels, classes, field=f"data.{field}"
  )


def _spec(cfg):
  d = cfg.data
  if is_video(cfg):
    return video_lib.VideoSpec(
        size=d.image_size,
        channels=d.channels,
        clip_len=d.clip_len,
        frame_stride=d.frame_stride,
        num_clips=d.num_clips,
        augment=d.augment,
        pad=d.get("pad", 0),
    )
  return pipelines.ImageSpec(
      size=d.image_size,
      channels=d.channels,
      augment=d.augment,
      eval_transform=d.eval_transform,
      pad=d.get("pad", 4),
  )


def _labelled(cfg, spec, content: bool) -> dict:
  """D, validation, the class names and the splits (plus, for U = the rest of the
  training set, the training set and the rest's indices). Nothing of the test set
  (:func:`_test`)."""
  d = cfg.data
  rng = np.random.default_rng(cfg.seed)
  splits: dict = {}
  val = None
  notes: list[str] = []
  train_all = rest = None
  if d.kind in ("fashion_mnist", "fake", "image_folder") + VIDEO_DATA_KINDS:
    if d.kind == "moving_fashion_mnist":
      train_all = video_lib.moving_fashion_split(
          _fashion_mnist(d, "train"),
          "train",
          frames=d.video_frames,
          size=d.image_size,
          garment=d.garment_size,
      )
    elif d.kind == "fake_video":
      train_all = video_lib.fake_videos(
          d.fake_train_size, spec, d.video_frames, d.num_classes, seed=1
      )
    elif d.kind == "video_folder":
      for f in ("train_csv", "val_csv"):
        if d.get(f):
          deps.note_input(f"data.{f}:csv", "file", d[f])
      train_all, val, notes = _open_labelled_files(
          d, "csv", "names {n} classes", _video_folder_opener(d, spec), content
      )
    elif d.kind == "fashion_mnist":
      train_all = sources.fashion_mnist_split(_fashion_mnist(d, "train"), "train")
    elif d.kind == "image_folder":
      train_all, val, notes = _open_labelled_files(
          d, "dir", "has {n} class folders", _image_folder_opener(d), content
      )
    else:
      shape = (d.image_size, d.image_size, d.channels)
      train_all = sources.fake_source(d.fake_train_size, shape, d.num_classes, seed=1)
    if d.subset is not None:
      train_all = train_all.subset(np.arange(min(d.subset, len(train_all))))
    if d.labelled_per_class:
      lab_idx = sources.class_balanced_indices(
          train_all.labels, d.labelled_per_class, d.num_classes, rng
      )
    else:
      lab_idx = np.arange(len(train_all))
    val_idx = np.zeros(0, np.int64)
    if d.val_per_class and val is None:
      val_idx = sources.class_balanced_indices(
          train_all.labels, d.val_per_class, d.num_classes, rng, exclude=lab_idx
      )
      val = train_all.subset(val_idx)
    labelled = train_all.subset(lab_idx)
    rest = np.setdiff1d(np.arange(len(train_all)), np.concatenate([lab_idx, val_idx]))
    splits = {
        "labelled": lab_idx.tolist(),
        "val": val_idx.tolist(),
        "unlabelled": "the other training images, in index order",
    }
    class_names = train_all.class_names
  else:  # tfds
    labelled = sources.TFDSSource(d.tfds_name, d.train_split, d.tfds_data_dir)
    if d.get("val_split"):
      val = sources.TFDSSource(d.tfds_name, d.val_split, d.tfds_data_dir)
    note_tfds("data.tfds_data_dir:build", labelled)
    class_names = labelled.class_names or tuple(str(c) for c in range(d.num_classes))
  return {
      "labelled": labelled,
      "val": val,
      "class_names": tuple(class_names or ()),
      "splits": splits,
      "train_all": train_all,
      "rest": rest,
      "notes": notes,
  }


def _test(cfg, spec: deps.Memo, lab: deps.Memo, content: bool) -> dict:
  """The test set (and its notes), made under a record of its own: what opening it read
  (its files, ``data.test_*``, ``data.fake_test_size``, ...). A test folder or CSV takes
  the training set's classes: that part replays D's record (``lab``) into the test's; a
  video set, the video view's (``spec``)."""
  d = cfg.data
  notes: list[str] = []
  if d.kind == "moving_fashion_mnist":
    test = video_lib.moving_fashion_split(
        _fashion_mnist(d, "test"),
        "test",
        frames=d.video_frames,
        size=d.image_size,
        garment=d.garment_size,
    )
  elif d.kind == "fake_video":
    test = video_lib.fake_videos(
        d.fake_test_size, spec.get(), d.video_frames, d.num_classes, seed=2
    )
  elif d.kind == "video_folder":
    deps.note_input("data.test_csv:csv", "file", d.test_csv)
    classes = lab.get()["class_names"]
    opener = _video_folder_opener(d, spec.get())
    test, notes = _open_test_files(d, "csv", opener, classes, content)
  elif d.kind == "fashion_mnist":
    test = sources.fashion_mnist_split(_fashion_mnist(d, "test"), "test")
  elif d.kind == "image_folder":
    classes = lab.get()["class_names"]
    test, notes = _open_test_files(d, "dir", _image_folder_opener(d), classes, content)
  elif d.kind == "fake":
    shape = (d.image_size, d.image_size, d.channels)
    test = sources.fake_source(d.fake_test_size, shape, d.num_classes, seed=2)
  else:  # tfds
    test = sources.TFDSSource(d.tfds_name, d.test_split, d.tfds_data_dir)
    note_tfds("data.tfds_data_dir:build", test)
    return {"test": test, "notes": notes}
  if d.subset is not None:
    test = test.subset(np.arange(min(max(d.subset // 4, 1), len(test))))
  return {"test": test, "notes": notes}


def note_tfds(key: str, src) -> None:
  """A TFDS dataset by its build folder's files (relative paths, contents), under a key
  of the ``tfds_data_dir`` field it was found through (``<section>.tfds_data_dir:build``):
  the same build moved is the same input."""
  folder = getattr(getattr(getattr(src, "_src", None), "dataset_info", None), "data_dir", None)
  if folder:
    deps.note_input(key, "tree", str(folder))


def _unlabelled(cfg, spec, lab: dict, content: bool) -> dict:
  d, u = cfg.data, cfg.unlabelled
  video = is_video(cfg)
  true_u = None
  if u.kind == "rest_of_train":
    train_all, rest = lab["train_all"], lab["rest"]
    unl = sources.SubsetView(train_all, rest, hide_labels=True, reindex=True)
    true_u = train_all.labels[rest]
  elif u.kind == "image_folder":
    unl = images.open_images(u.path, d.channels, kind="files")
    _note_files("unlabelled.path", unl, u.path, content)
  elif u.kind == "video_list":
    unl = video_lib.VideoListSource(u.path, spec, max_frames=d.get("max_frames"))
    deps.note_input("unlabelled.path", "data", u.path, unl.identity(content))
  elif u.kind == "shards":
    unl = images.open_images(
        u.path,
        d.channels,
        kind="shards",
        drop_duplicates=bool(u.get("drop_duplicates", True)),
        cache_dir=u.get("cache_dir"),
    )
    images.note_images("unlabelled.path", u.path, unl)
  elif u.kind == "tfds":
    base = sources.TFDSSource(u.tfds_name, u.split, u.get("tfds_data_dir"))
    note_tfds("unlabelled.tfds_data_dir:build", base)
    unl = sources.SubsetView(base, np.arange(len(base)), hide_labels=True, reindex=True)
  else:  # fake
    shape = ((d.video_frames,) if video else ()) + (d.image_size, d.image_size, d.channels)
    base = sources.fake_source(u.size, shape, d.num_classes, seed=3)
    unl = sources.SubsetView(base, np.arange(len(base)), hide_labels=True, reindex=True)
    true_u = base.labels
  if u.limit is not None:
    n = min(int(u.limit), len(unl))
    unl = sources.SubsetView(unl, np.arange(n), reindex=True)
    true_u = None if true_u is None else true_u[:n]
  return {"unlabelled": unl, "true_labels": true_u}


def build_data(cfg) -> Data:
  """Opens the sources (cheap: no training) and fails clearly when data is missing. Each
  part is made under a record of the config fields and input files it read
  (:class:`Data`); ``cfg`` may be a ConfigDict or a :class:`bssl.deps.Tracked` view."""
  if not isinstance(cfg, deps.Tracked):
    cfg = deps.Tracked(cfg)
  # how folders are identified (cosmetic: not a field of any record)
  content = bool(cfg.data.get("identify_by_content", False))
  spec = deps.Memo.compute(lambda: _spec(cfg))
  lab = deps.Memo.compute(lambda: _labelled(cfg, spec.get(), content), spec)
  test = deps.Memo.compute(lambda: _test(cfg, spec, lab, content))
  unl = deps.Memo.compute(lambda: _unlabelled(cfg, spec.get(), lab.get(), content), spec, lab)
  for what, src, field in (
      ("D (the labelled set)", lab.value["labelled"], "data"),
      ("the test set", test.value["test"], "data"),
      ("U (the unlabelled set)", unl.value["unlabelled"], "unlabelled"),
  ):
    if len(src) == 0:
      raise sources.DataError(
          f"{field}: {what} is empty with this config; nothing to "
          f"train, score or evaluate (check {field}.* limits and sizes)"
      )
  return Data(spec, lab, test, unl, lab.value["notes"] + test.value["notes"])
