"""Target data sets of the transfer stage (the paper's CUB-2011 table).

``transfer.target``:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes,
  offline), scaled from 0..16 to 0..255 and resized (bilinear) to the model's input size
  and channels. Split by the seed, per class: 30% test, then 20% of the rest validation.
- ``tfds``: a TFDS dataset (default ``caltech_birds2011``: CUB-200-2011, 200 classes),
  its ``transfer.train_split`` and ``transfer.test_split``; validation = 20% of train,
  per class, by the seed. Prepare it once with ``tfds build caltech_birds2011
  --data_dir=<dir> --file_format=array_record`` (needs TensorFlow at build time only) and
  set ``--config.transfer.tfds_data_dir=<dir>``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from bssl.config.names import TRANSFER_TARGETS as TARGETS
from bssl.data import recipe, sources


@dataclasses.dataclass
class Target:
  name: str
  train: object
  val: object
  test: object
  num_classes: int


def _split(labels: np.ndarray, fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
  """(rest, taken): ``fraction`` of each class's indices taken, by ``rng``."""
  taken = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    taken.append(rng.choice(idx, max(1, int(round(fraction * len(idx)))), replace=False))
  taken = np.sort(np.concatenate(taken))
  rest = np.setdiff1d(np.arange(len(labels)), taken)
  return rest, taken


def _digits(size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:  # pragma: no cover - a pinned requirement
    raise sources.DataError(
        "transfer.target='digits' needs scikit-learn (in " "requirements.txt: run `bash setup.sh`)"
    ) from e
  d = load_digits()
  imgs = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
  out = np.stack(
      [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in imgs]
  )[..., None]
  if channels == 3:
    out = np.repeat(out, 3, axis=-1)
  return out, d.target.astype(np.int32)


def build(cfg) -> Target:
  t, d = cfg.transfer, cfg.data
  rng = np.random.default_rng([int(cfg.seed), 23])
  if t.target == "digits":
    images, labels = _digits(int(d.image_size), int(d.channels))
    rest, test = _split(labels, 0.3, rng)
    full = sources.ArraySource(images, labels, class_names=tuple(str(i) for i in range(10)))
    train_all = full.subset(rest)
    num_classes, test_src = 10, full.subset(test)
  elif t.target == "tfds":
    train_all = sources.TFDSSource(t.tfds_name, t.train_split, t.get("tfds_data_dir"))
    test_src = sources.TFDSSource(t.tfds_name, t.test_split, t.get("tfds_data_dir"))
    recipe.note_tfds("transfer.tfds_data_dir:build", train_all)
    num_classes = len(train_all.class_names or ()) or int(t.num_classes or 0)
    if not num_classes:
      raise sources.DataError(
          f"transfer: {t.tfds_name!r} does not say its classes; set " f"transfer.num_classes"
      )
  else:
    raise sources.DataError(f"transfer.target must be one of {TARGETS}, got {t.target!r}")
  labels = np.asarray([int(train_all[i]["label"]) for i in range(len(train_all))])
  tr, va = _split(labels, 0.2, rng)
  return Target(
      t.target,
      sources.SubsetView(train_all, tr),
      sources.SubsetView(train_all, va),
      test_src,
      num_classes,
  )
