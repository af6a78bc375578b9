"""Weak labels (hashtag-like tags) for the semi-weakly supervised teacher.

A weak data set is images with a variable number of tag ids each, a tag vocabulary, and
optionally a tag -> class map (for the report). Records are ``{'image', 'label': int32
[max_tags] (tag ids, padded with -1), 'id'}``; the train step turns them into targets of
1/k on each of an image's k tags (:func:`bssl.train.tag_targets`).

Sources (``weak.kind``):

- ``synthetic`` (the offline demo): the tags of U's images are drawn from their hidden
  labels: each class has ``synonyms_per_class`` tags of its own, and there are
  ``distractors`` tags that belong to no class. An image carries one of its class's tags
  with probability ``p_class_tag`` (a second one with probability ``p_class_tag / 3``),
  plus 0..``max_noise_tags`` tags drawn uniformly from the whole vocabulary. Tags are a
  pure function of (seed, image id). So, as with hashtags, tags are informative but
  noisy, several name one class, many name none, and some images carry none of their class.
- ``tags_file``: ``weak.path`` holds the images (an ingest's ``--out`` or a folder / file
  list) and ``weak.tags_file`` one line per image id, in id order (ids: positions in the
  input's paths sorted as whole strings, :func:`bssl.data.listing.list_inputs`), of
  whitespace-separated tag names (an empty line: no tags). The vocabulary is the sorted
  set of names, or ``weak.vocab_file`` (one name per line, ``name<TAB>class id`` for the
  report's map).

- ``captions``: ``weak.path`` is the ``--out`` of ``bssl.ingest`` run on WebDataset tar
  shards (:mod:`bssl.data.webdataset`); each image's tags come from its caption (the
  sample's ``.txt``, else the json's ``caption``): :func:`caption_tags` — lower-cased
  words of letters and digits starting with a letter, 2+ characters, stop words left out,
  ``#word`` counting as ``word`` (``weak.caption_tags='words'``), or only the
  ``#hashtags`` (``'hashtags'``). The vocabulary is ``weak.vocab_file`` (``name<TAB>class
  id`` lines map tags to classes, for the report), else the ``weak.vocab_size`` tags
  carried by the most images, at least ``weak.min_tag_images`` each (ties by name,
  then sorted by name); tags outside it are dropped. Bad, duplicate and placeholder images
  of the ingest carry no tags.

Resampling (``weak.resample``): ``none``, ``sqrt`` (each image drawn with probability
proportional to the mean of ``f(t)^-1/2`` over its tags, ``f(t)`` the tag's frequency:
square-root sampling, so the long tail is seen) or ``inverse`` (``f(t)^-1``). The draw
(with replacement, as many draws as tagged images) is fixed by the seed.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np

from bssl import deps, storage
from bssl.config.names import RESAMPLING, WEAK_KINDS
from bssl.data import images as images_lib
from bssl.data.sources import DataError

# left out of caption tags (words only; a #hashtag is always kept)
STOP_WORDS = frozenset("""a an and are as at be been but by for from has have he her his i in
is it its of on or our she that the their them they this to was we were will with you your
my me not no so if then than there these those what when where which who why how all any
can just into out up down over under very too also more most such only own same other""".split())


class WeakDataError(DataError):
  """A weak-label source that cannot be used (exit 2)."""


@dataclasses.dataclass
class WeakData:
  source: object  # records with 'label' = tag ids [max_tags]
  num_tags: int
  tag_names: tuple
  tag_to_class: np.ndarray  # [num_tags] class id or -1
  num_images: int  # tagged images before resampling
  tag_frequency: np.ndarray  # [num_tags] images carrying each tag


class TaggedSource:
  """``images[ids[r]]`` with tag ids ``tags[r]`` (padded with -1) as its label."""

  def __init__(self, images, ids: np.ndarray, tags: np.ndarray):
    self.images, self.ids, self.tags = images, np.asarray(ids, np.int64), tags
    self.class_names = None

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, r: int) -> dict:
    rec = dict(self.images[int(self.ids[r])])
    rec["label"] = self.tags[r]
    return rec


def synthetic_vocabulary(num_classes: int, synonyms: int, distractors: int):
  """(names, tag -> class): class c owns tags ``c*synonyms .. c*synonyms+synonyms-1``."""
  names = [f"c{c}_syn{j}" for c in range(num_classes) for j in range(synonyms)]
  names += [f"noise{j}" for j in range(distractors)]
  to_class = np.full(len(names), -1, np.int64)
  to_class[: num_classes * synonyms] = np.repeat(np.arange(num_classes), synonyms)
  return tuple(names), to_class


def synthetic_tags(
    labels: np.ndarray,
    ids: np.ndarray,
    *,
    num_classes: int,
    synonyms: int,
    distractors: int,
    p_class_tag: float,
    max_noise_tags: int,
    seed: int,
) -> np.ndarray:
  """Tag ids [N, max_tags] (padded with -1) of images with hidden ``labels``; image ``i``'s
  tags depend on (seed, ids[i]) only."""
  v = num_classes * synonyms + distractors
  width = 2 + max_noise_tags
  out = np.full((len(labels), width), -1, np.int32)
  for r, (y, i) in enumerate(zip(np.asarray(labels), np.asarray(ids))):
    rng = np.random.default_rng([seed, 7, int(i)])
    tags = []
    if rng.random() < p_class_tag:
      tags.append(int(y) * synonyms + int(rng.integers(synonyms)))
      if rng.random() < p_class_tag / 3:
        tags.append(int(y) * synonyms + int(rng.integers(synonyms)))
    tags += [int(t) for t in rng.integers(0, v, int(rng.integers(0, max_noise_tags + 1)))]
    tags = sorted(set(tags))
    out[r, : len(tags)] = tags
  return out


def resampling_weights(tags: np.ndarray, num_tags: int, mode: str) -> np.ndarray:
  """Per-image sampling weight (sums to 1): the mean over the image's tags of
  ``freq(tag)^-alpha`` (alpha 0, 1/2, 1 for none, sqrt, inverse)."""
  if mode not in RESAMPLING:
    raise WeakDataError(f"weak.resample must be one of {RESAMPLING}, got {mode!r}")
  alpha = {"none": 0.0, "sqrt": 0.5, "inverse": 1.0}[mode]
  valid = tags >= 0
  freq = np.bincount(tags[valid], minlength=num_tags).astype(np.float64)
  per_tag = np.where(freq > 0, np.maximum(freq, 1.0) ** -alpha, 0.0)
  w = np.where(valid, per_tag[np.where(valid, tags, 0)], 0.0).sum(1) / np.maximum(valid.sum(1), 1)
  return w / w.sum()


def _read_vocab(path: str):
  """(names, tag -> class id or -1) of a vocabulary file: ``name[<TAB>class id]`` lines."""
  vl = [l.split("\t") for l in storage.path(path).read_text().splitlines() if l.strip()]
  names = tuple(x[0].strip() for x in vl)
  to_class = np.array([int(x[1]) if len(x) > 1 and x[1].strip() else -1 for x in vl], np.int64)
  return names, to_class


def _read_tags_file(path: str, n: int, vocab_file: str | None):
  try:
    lines = storage.path(path).read_text().splitlines()
  except OSError as e:
    raise WeakDataError(f"weak.tags_file: cannot read {path!r}: {e}") from None
  if len(lines) != n:
    raise WeakDataError(
        f"weak.tags_file: {path!r} has {len(lines)} lines, the images of "
        f"weak.path are {n}: one line per image id, in id order, is needed"
    )
  words = [l.split() for l in lines]
  if vocab_file:
    names, to_class = _read_vocab(vocab_file)
  else:
    names = tuple(sorted({w for ws in words for w in ws}))
    to_class = np.full(len(names), -1, np.int64)
  index = {t: j for j, t in enumerate(names)}
  unknown = sorted({w for ws in words for w in ws if w not in index})
  if unknown:
    raise WeakDataError(f"weak.tags_file: tags not in weak.vocab_file: {unknown[:10]}")
  width = max(1, max((len(set(ws)) for ws in words), default=1))
  tags = np.full((n, width), -1, np.int32)
  for i, ws in enumerate(words):
    ids = sorted({index[w] for w in ws})
    tags[i, : len(ids)] = ids
  return tags, names, to_class


_WORD = re.compile(r"#?[a-z][a-z0-9]+")


def caption_tags(caption: str, mode: str = "words") -> list[str]:
  """The tags of one caption (see the module doc), sorted, each once."""
  words = _WORD.findall(caption.lower())
  if mode == "hashtags":
    return sorted({w[1:] for w in words if w.startswith("#")})
  return sorted({w.lstrip("#") for w in words if w.startswith("#") or w not in STOP_WORDS})


def _caption_tags(images, w):
  """(tags [n, width], names, tag -> class) from the captions of a tar ingest."""
  n = len(images)
  caps = images.fields(np.arange(n), "caption").astype(str)
  mode = str(w.caption_tags)
  per_image = [caption_tags(c, mode) for c in caps]
  bad = images.invalid_ids()
  for i in bad:
    per_image[int(i)] = []
  if w.get("vocab_file"):
    names, to_class = _read_vocab(w.vocab_file)
  else:
    counts = Counter(t for ts in per_image for t in ts)
    kept = [
        t
        for t, c in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))
        if c >= int(w.min_tag_images)
    ][: int(w.vocab_size)]
    names = tuple(sorted(kept))
    to_class = np.full(len(names), -1, np.int64)
  index = {t: j for j, t in enumerate(names)}
  ids = [sorted({index[t] for t in ts if t in index}) for ts in per_image]
  width = max(1, max((len(x) for x in ids), default=1))
  tags = np.full((n, width), -1, np.int32)
  for i, x in enumerate(ids):
    tags[i, : len(x)] = x
  return tags, names, to_class


def num_tags(cfg, data=None) -> int:
  """Vocabulary size of the configured weak data (the weak model's head)."""
  w = cfg.weak
  if w.kind == "synthetic":
    return int(cfg.data.num_classes) * int(w.synonyms_per_class) + int(w.distractors)
  return build(cfg, data).num_tags


def build(cfg, data) -> WeakData:
  """The weak training set of ``cfg.weak`` (resampled), over ``data`` (a recipe Data)."""
  w = cfg.weak
  if w.kind == "synthetic":
    if data.unlabelled_true_labels is None:
      raise WeakDataError(
          "weak.kind='synthetic' draws tags from U's hidden labels, which "
          "this U does not have (use data/unlabelled from Fashion-MNIST or "
          "fake data, or weak.kind='tags_file')"
      )
    images = data.unlabelled
    labels = np.asarray(data.unlabelled_true_labels)
    ids = np.arange(len(images))
    tags = synthetic_tags(
        labels,
        ids,
        num_classes=int(cfg.data.num_classes),
        synonyms=int(w.synonyms_per_class),
        distractors=int(w.distractors),
        p_class_tag=float(w.p_class_tag),
        max_noise_tags=int(w.max_noise_tags),
        seed=int(cfg.seed),
    )
    names, to_class = synthetic_vocabulary(
        int(cfg.data.num_classes), int(w.synonyms_per_class), int(w.distractors)
    )
  elif w.kind == "tags_file":
    if not (w.get("path") and w.get("tags_file")):
      raise WeakDataError(
          "weak.kind='tags_file' needs weak.path (the images: an ingest's "
          "--out or an image folder / file list) and weak.tags_file"
      )
    # the files enter the stage's record by what they contain (a rerun compares them)
    deps.note_input("weak.tags_file", "file", w.tags_file)
    if w.get("vocab_file"):
      deps.note_input("weak.vocab_file", "file", w.vocab_file)
    images = images_lib.open_images(w.path, int(cfg.data.channels), drop_duplicates=False)
    images_lib.note_images("weak.path", w.path, images)
    tags, names, to_class = _read_tags_file(w.tags_file, len(images), w.get("vocab_file"))
    ids = np.arange(len(images))
  elif w.kind == "captions":
    if not w.get("path") or not (storage.path(w.path) / "manifest.json").exists():
      raise WeakDataError(
          f"weak.kind='captions' needs weak.path to be the --out of a "
          f"complete `python -m bssl.ingest` of tar shards, got {w.get('path')!r}"
      )
    images = images_lib.open_images(w.path, int(cfg.data.channels), kind="shards")
    images_lib.note_images("weak.path", w.path, images)
    if w.get("vocab_file"):
      deps.note_input("weak.vocab_file", "file", w.vocab_file)
    if images.manifest.get("input_kind") != "webdataset":
      raise WeakDataError(
          f"weak.kind='captions': {w.path!r} is an ingest of image files, "
          f"which have no captions; ingest WebDataset tar shards (with .txt "
          f"or json captions), or use weak.kind='tags_file'"
      )
    tags, names, to_class = _caption_tags(images, w)
    if not names:
      raise WeakDataError(
          f"weak.kind='captions': no caption tag of {w.path!r} is carried by "
          f"weak.min_tag_images={w.min_tag_images} images or more"
      )
    ids = np.arange(len(images))
  else:
    raise WeakDataError(f"weak.kind must be one of {WEAK_KINDS}, got {w.kind!r}")
  v = len(names)
  keep = np.flatnonzero((tags >= 0).any(1))  # an image without tags teaches nothing
  if len(keep) == 0:
    raise WeakDataError("weak: no image carries a tag")
  tags, ids = tags[keep], ids[keep]
  freq = np.bincount(tags[tags >= 0], minlength=v)
  weights = resampling_weights(tags, v, w.resample)
  if w.resample != "none":
    rng = np.random.default_rng([int(cfg.seed), 11])
    draw = np.sort(rng.choice(len(ids), size=len(ids), replace=True, p=weights))
    tags, ids = tags[draw], ids[draw]
  return WeakData(TaggedSource(images, ids, tags), v, tuple(names), to_class, len(keep), freq)
