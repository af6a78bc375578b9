"""The recipe's data: D, validation, test and U, opened from the config (cheap: no image is
decoded here). Every source is checked to be non-empty before any work starts."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bssl.config import VIDEO_DATA_KINDS
from bssl.data import pipelines, sources
from bssl.data import video as video_lib



@dataclasses.dataclass
class Data:
  labelled: Any          # D
  val: Any | None        # carved from the training data, for choosing hyperparameters
  test: Any              # never used to choose anything
  unlabelled: Any        # U (record ids = positions in U)
  unlabelled_true_labels: np.ndarray | None
  spec: Any             # pipelines.ImageSpec, or video.VideoSpec for video data
  class_names: tuple
  splits: dict
  # What U's files are, for the fingerprints of the stages that read U (the config names
  # a folder or an ingest; their contents can change under the same name): None when the
  # config alone determines U.
  unlabelled_identity: str | None = None
  # The same for D, validation and test read from folders (data.kind='image_folder'): every
  # stage depends on them.
  data_identity: str | None = None
  # What opening the data left out or changed, said once at start-up (e.g. listed videos
  # that do not exist).
  notes: tuple = ()


def _labelled_files(d, suffix: str, counted: str, open_set):
  """D's, test's and (when given) validation's sources read from files: ``data.train_<suffix>``,
  ``data.test_<suffix>``, ``data.val_<suffix>``, opened by ``open_set(field, class_names)``
  (the test and validation sets take the training set's classes). Returns (train, test,
  val, their files' identity, their notes). Files are listed class by class: a fixed
  shuffle (the same for every seed) so that data.subset and unlabelled.limit (first N) take
  every class, nested."""
  train = open_set(f"train_{suffix}", None)
  if len(train.class_names) != d.num_classes:
    raise sources.DataError(
        f"data.num_classes={d.num_classes} but data.train_{suffix} {d[f'train_{suffix}']!r} "
        f"{counted.format(n=len(train.class_names))} {list(train.class_names)[:10]}; "
        f"set --config.data.num_classes={len(train.class_names)}")
  test = open_set(f"test_{suffix}", train.class_names)
  val = open_set(f"val_{suffix}", train.class_names) if d.get(f"val_{suffix}") else None
  sets = (("train", train), ("test", test), ("val", val))
  identity = ";".join(f"{k}={s.identity()}" for k, s in sets if s is not None)
  notes = [n for _, s in sets if s is not None for n in getattr(s, "notes", ())]
  return (train.subset(np.random.default_rng(0).permutation(len(train))),
          test.subset(np.random.default_rng(1).permutation(len(test))), val, identity, notes)


def build_data(cfg) -> Data:
  """Opens the sources (cheap: no training) and fails clearly when data is missing."""
  d = cfg.data
  video = d.kind in VIDEO_DATA_KINDS
  if video:
    spec = video_lib.VideoSpec(size=d.image_size, channels=d.channels, clip_len=d.clip_len,
                               frame_stride=d.frame_stride, num_clips=d.num_clips,
                               augment=d.augment, pad=d.get("pad", 0))
  else:
    spec = pipelines.ImageSpec(size=d.image_size, channels=d.channels, augment=d.augment,
                               eval_transform=d.eval_transform, pad=d.get("pad", 4))
  rng = np.random.default_rng(cfg.seed)
  splits: dict = {}
  val = None
  data_identity = None
  notes: list[str] = []
  if d.kind in ("fashion_mnist", "fake", "image_folder") + VIDEO_DATA_KINDS:
    if d.kind == "moving_fashion_mnist":
      train_all, test = video_lib.moving_fashion_mnist(
          d.folder, frames=d.video_frames, size=d.image_size, garment=d.garment_size)
    elif d.kind == "fake_video":
      train_all = video_lib.fake_videos(d.fake_train_size, spec, d.video_frames,
                                        d.num_classes, seed=1)
      test = video_lib.fake_videos(d.fake_test_size, spec, d.video_frames, d.num_classes,
                                   seed=2)
    elif d.kind == "video_folder":
      kw = dict(video_dir=d.get("video_dir"), max_frames=d.get("max_frames"))
      train_all, test, val, data_identity, notes = _labelled_files(
          d, "csv", "names {n} classes",
          lambda field, classes: video_lib.VideoFolderSource(
              d[field], spec, class_names=classes, field=f"data.{field}", **kw))
    elif d.kind == "fashion_mnist":
      train_all, test = sources.load_fashion_mnist(d.folder)
    elif d.kind == "image_folder":
      train_all, test, val, data_identity, notes = _labelled_files(
          d, "dir", "has {n} class folders",
          lambda field, classes: sources.LabelledFolderSource(
              d[field], d.channels, classes, field=f"data.{field}"))
    else:
      shape = (d.image_size, d.image_size, d.channels)
      train_all = sources.fake_source(d.fake_train_size, shape, d.num_classes, seed=1)
      test = sources.fake_source(d.fake_test_size, shape, d.num_classes, seed=2)
    if d.subset is not None:
      train_all = train_all.subset(np.arange(min(d.subset, len(train_all))))
      test = test.subset(np.arange(min(max(d.subset // 4, 1), len(test))))
    if d.labelled_per_class:
      lab_idx = sources.class_balanced_indices(train_all.labels, d.labelled_per_class,
                                               d.num_classes, rng)
    else:
      lab_idx = np.arange(len(train_all))
    val_idx = np.zeros(0, np.int64)
    if d.val_per_class and val is None:
      val_idx = sources.class_balanced_indices(train_all.labels, d.val_per_class,
                                               d.num_classes, rng, exclude=lab_idx)
      val = train_all.subset(val_idx)
    labelled = train_all.subset(lab_idx)
    rest = np.setdiff1d(np.arange(len(train_all)), np.concatenate([lab_idx, val_idx]))
    splits = {"labelled": lab_idx.tolist(), "val": val_idx.tolist(),
              "unlabelled": "the other training images, in index order"}
    class_names = train_all.class_names
  else:  # tfds
    labelled = sources.TFDSSource(d.tfds_name, d.train_split, d.tfds_data_dir)
    test = sources.TFDSSource(d.tfds_name, d.test_split, d.tfds_data_dir)
    if d.get("val_split"):
      val = sources.TFDSSource(d.tfds_name, d.val_split, d.tfds_data_dir)
    class_names = labelled.class_names or tuple(str(c) for c in range(d.num_classes))
    rest = None

  u = cfg.unlabelled
  true_u = None
  if u.kind == "rest_of_train":
    unl = sources.SubsetView(train_all, rest, hide_labels=True, reindex=True)
    true_u = train_all.labels[rest]
  elif u.kind == "image_folder":
    unl = sources.ImageFileSource(u.path, channels=d.channels)
  elif u.kind == "video_list":
    unl = video_lib.VideoListSource(u.path, spec, max_frames=d.get("max_frames"))
  elif u.kind == "shards":
    from bssl.data import ingest
    try:
      unl = ingest.ShardSource(u.path, channels=d.channels,
                               drop_duplicates=bool(u.get("drop_duplicates", True)),
                               cache_dir=u.get("cache_dir"))
    except ingest.IngestError as e:
      raise sources.DataError(str(e)) from None
  elif u.kind == "tfds":
    base = sources.TFDSSource(u.tfds_name, u.split, u.get("tfds_data_dir"))
    unl = sources.SubsetView(base, np.arange(len(base)), hide_labels=True, reindex=True)
  else:  # fake
    shape = ((d.video_frames,) if video else ()) + (d.image_size, d.image_size, d.channels)
    base = sources.fake_source(u.size, shape, d.num_classes, seed=3)
    unl = sources.SubsetView(base, np.arange(len(base)), hide_labels=True, reindex=True)
    true_u = base.labels
  identity = unl.identity() if hasattr(unl, "identity") and u.kind != "rest_of_train" \
      else None
  if u.limit is not None:
    n = min(int(u.limit), len(unl))
    unl = sources.SubsetView(unl, np.arange(n), reindex=True)
    true_u = None if true_u is None else true_u[:n]
  for what, src, field in (("D (the labelled set)", labelled, "data"),
                           ("the test set", test, "data"),
                           ("U (the unlabelled set)", unl, "unlabelled")):
    if len(src) == 0:
      raise sources.DataError(f"{field}: {what} is empty with this config; nothing to "
                              f"train, score or evaluate (check {field}.* limits and sizes)")
  return Data(labelled, val, test, unl, true_u, spec, tuple(class_names or ()), splits,
              identity, data_identity, tuple(notes))
