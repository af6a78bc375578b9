"""The recipe's data: D, validation, test and U, opened from the config (cheap: no image is
decoded here). Every source is checked to be non-empty before any work starts."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bssl.data import pipelines, sources
from bssl.data import video as video_lib

VIDEO_KINDS = ("moving_fashion_mnist", "video_folder", "fake_video")


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


def build_data(cfg) -> Data:
  """Opens the sources (cheap: no training) and fails clearly when data is missing."""
  d = cfg.data
  video = d.kind in VIDEO_KINDS
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
  if d.kind in ("fashion_mnist", "fake", "image_folder") + VIDEO_KINDS:
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
      train_all = video_lib.VideoFolderSource(d.train_csv, spec, field="data.train_csv", **kw)
      if len(train_all.class_names) != d.num_classes:
        raise sources.DataError(
            f"data.num_classes={d.num_classes} but data.train_csv {d.train_csv!r} names "
            f"{len(train_all.class_names)} classes {list(train_all.class_names)[:10]}; set "
            f"--config.data.num_classes={len(train_all.class_names)}")
      test = video_lib.VideoFolderSource(d.test_csv, spec, class_names=train_all.class_names,
                                         field="data.test_csv", **kw)
      if d.get("val_csv"):
        val = video_lib.VideoFolderSource(d.val_csv, spec, class_names=train_all.class_names,
                                          field="data.val_csv", **kw)
      data_identity = ";".join(f"{k}={s.identity()}" for k, s in (
          ("train", train_all), ("test", test), ("val", val)) if s is not None)
      train_all = train_all.subset(np.random.default_rng(0).permutation(len(train_all)))
      test = test.subset(np.random.default_rng(1).permutation(len(test)))
    elif d.kind == "fashion_mnist":
      train_all, test = sources.load_fashion_mnist(d.folder)
    elif d.kind == "image_folder":
      train_all = sources.LabelledFolderSource(d.train_dir, d.channels, field="data.train_dir")
      if len(train_all.class_names) != d.num_classes:
        raise sources.DataError(
            f"data.num_classes={d.num_classes} but data.train_dir {d.train_dir!r} has "
            f"{len(train_all.class_names)} class folders {list(train_all.class_names)[:10]}; "
            f"set --config.data.num_classes={len(train_all.class_names)}")
      test = sources.LabelledFolderSource(d.test_dir, d.channels, train_all.class_names,
                                          field="data.test_dir")
      if d.get("val_dir"):
        val = sources.LabelledFolderSource(d.val_dir, d.channels, train_all.class_names,
                                           field="data.val_dir")
      data_identity = ";".join(f"{k}={s.identity()}" for k, s in (
          ("train", train_all), ("test", test), ("val", val)) if s is not None)
      # Folders list their images class by class: a fixed shuffle (the same for every
      # seed) so that data.subset and unlabelled.limit (first N) take every class, nested.
      train_all = train_all.subset(np.random.default_rng(0).permutation(len(train_all)))
      test = test.subset(np.random.default_rng(1).permutation(len(test)))
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
  notes = tuple(n for s in (locals().get("train_all"), test, val)
                for n in (getattr(s, "notes", None) or ()))
  return Data(labelled, val, test, unl, true_u, spec, tuple(class_names or ()), splits,
              identity, data_identity, notes)
