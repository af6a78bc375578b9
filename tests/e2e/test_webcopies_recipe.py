"""The recipe on img2dataset-style WebDataset tars with web copies planted (issue 30,
"Acceptance"), as a new user would check it: labelled and test images are tiles of real
photographs (benchmarks/webcopies.py: scikit-image, scikit-learn, matplotlib) in a
class-per-subfolder folder; U is tar shards (``<key>.jpg``, ``.json`` with status and url,
``.txt``) made with ``tarfile`` and read through ``bssl.data.ingest.run_ingest``. Planted in
U: web copies of test images (bssl/data/webcopy.py: caption band, crop to 60%, rotation,
padding to a square, text) and families of near-duplicates (a clean U image and 1-3 web
copies of it). One tiny run (demo:tiny, K = 50, P = 2, every U image a candidate of each
class) shared by the tests: the copies of test images are named in select/eval_copies.json
with their source and none is in D̂; each family has at most one member per class in D̂ and
the others are listed in select/near_duplicates.parquet; the clean images are kept; and
the acceptance as written: every copy out, no family twice. (Until 2026-12-08 these last
two were strict xfails: a caption band and a text over low-texture tiles were missed at
the recipe's 32-px input, below the local path's 48 px then.)"""

import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from bssl.data import webcopy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
webcopies = pytest.importorskip("webcopies")  # (scikit-image: a dev requirement)

TEST_COPY_FAMILIES = ("caption", "crop", "rotate", "pad_square", "text")
NEAR_DUP_FAMILIES = ("crop", "caption", "jpeg", "pad_square", "color", "text", "rotate")
CLASSES = ("left", "right")
NUM_TEST, NUM_TRAIN, NUM_CLEAN, NUM_FAMILIES = 15, 40, 30, 6


def _add(tf, name, data):
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
  tf.addfile(info, io.BytesIO(data))


def _jpeg(img):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _make_data(root):
  """Writes ``root/train/<class>/*.png``, ``root/test/<class>/*.png`` (evaluation tiles of
  the photographs) and ``root/tars/0000{0,1}.tar`` (U: the clean look-alike tiles of the
  same photographs, the planted copies of test images and the near-duplicate families, in
  a shuffled order). Returns what each U key is: ``("clean",)``, ``("test_copy", family,
  test file name)`` or ``("family", f, how made)``."""
  rng = np.random.default_rng(0)
  ev, _, clean, _ = webcopies.tiles(webcopies.photos(), seed=0)
  order = rng.permutation(len(ev))
  test_ix, train_ix = order[:NUM_TEST], order[NUM_TEST : NUM_TEST + NUM_TRAIN]
  for split, ix in (("test", test_ix), ("train", train_ix)):
    for j, i in enumerate(ix):
      folder = os.path.join(root, split, CLASSES[j % 2])
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(ev[i]).save(os.path.join(folder, f"{split}{j:03d}.png"))
  u = []  # (image, role)
  corder = rng.permutation(len(clean))
  for i in corder[:NUM_CLEAN]:
    u.append((clean[i], ("clean",)))
  for j, i in enumerate(test_ix):
    fam = TEST_COPY_FAMILIES[j % len(TEST_COPY_FAMILIES)]
    u.append((webcopy.web_copy(ev[i], fam, rng), ("test_copy", fam, f"test{j:03d}.png")))
  for f, i in enumerate(corder[NUM_CLEAN : NUM_CLEAN + NUM_FAMILIES]):
    u.append((clean[i], ("family", f, "original")))
    for c in range(1 + f % 3):  # families of 2, 3 and 4 images
      fam = NEAR_DUP_FAMILIES[(f + c) % len(NEAR_DUP_FAMILIES)]
      u.append((webcopy.web_copy(clean[i], fam, rng), ("family", f, fam)))
  roles = {}
  os.makedirs(os.path.join(root, "tars"))
  perm = rng.permutation(len(u))
  for s, part in enumerate(np.array_split(perm, 2)):
    with tarfile.open(os.path.join(root, "tars", f"{s:05d}.tar"), "w") as tf:
      for j, i in enumerate(part):
        img, role = u[i]
        key = f"{s:05d}{j:04d}"
        roles[key] = role
        meta = {"url": f"https://example.com/{key}.jpg", "caption": key, "key": key}
        meta.update(status="success", width=img.shape[1], height=img.shape[0])
        _add(tf, f"{key}.jpg", _jpeg(img))
        _add(tf, f"{key}.json", json.dumps(meta).encode())
        _add(tf, f"{key}.txt", key.encode())
  return roles


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One recipe run (baseline, teacher, score, select, report) on the data above."""
  from bssl import engine
  from bssl.configs import demo
  from bssl.data import ingest, recipe

  tmp = tmp_path_factory.mktemp("webcopies_recipe")
  roles = _make_data(str(tmp))
  out = str(tmp / "u")
  ingest.run_ingest(str(tmp / "tars"), out, log=lambda m: None)
  cfg = demo.get_config("tiny")
  d = cfg.data
  d.kind, d.train_dir, d.test_dir = "image_folder", str(tmp / "train"), str(tmp / "test")
  d.num_classes, d.channels, d.image_size = len(CLASSES), 3, 32
  d.mean, d.std = (128.0,), (64.0,)
  d.augment, d.eval_transform = "random_resized_crop_flip", "resize_center_crop"
  d.labelled_per_class, d.val_per_class = 12, 4
  cfg.unlabelled.kind, cfg.unlabelled.path = "shards", out
  cfg.score.eval_copies = "exclude"
  cfg.select.near_duplicates = "collapse"  # (the default)
  cfg.select.k, cfg.select.p = 50, 2  # K' = 63 >= |U|: every U image a candidate of each class
  cfg.stages = "baseline,teacher,score,select,report"
  wd = str(tmp / "w")
  engine.run_recipe(cfg, wd)
  test = recipe.build_data(cfg).test  # the run's test split: matched ids are its positions
  test_id = {os.path.basename(f): i for i, f in enumerate(test.files)}
  return roles, test_id, wd


def _dhat_rows(wd):
  import pyarrow.parquet as pq

  t = pq.read_table(os.path.join(wd, "select", "dhat.parquet")).to_pydict()
  return list(zip(t["key"], t["class"]))


def _near_dups(wd):
  import pyarrow.parquet as pq

  return pq.read_table(os.path.join(wd, "select", "near_duplicates.parquet")).to_pydict()


def _test_copies(run):
  """(planted copies of test images {key: role}, removed {key: eval_copies.json entry},
  missed {key: family}: planted copies not removed as copies of their own test image)."""
  roles, test_id, wd = run
  copies = json.load(open(os.path.join(wd, "select", "eval_copies.json")))
  removed = {c["key"]: c for c in copies if c["removed"]}
  planted = {k: r for k, r in roles.items() if r[0] == "test_copy"}
  missed = {
      k: r[1]
      for k, r in planted.items()
      if k not in removed
      or removed[k]["split"] != "test"
      or removed[k]["matched_id"] != test_id[r[2]]
  }
  return planted, removed, missed


def _family_repeats(run):
  """{(family, class): [(key, how made)]} of the families with more than one member in the
  class's D̂."""
  roles, _, wd = run
  per = {}
  for key, c in _dhat_rows(wd):
    if roles[key][0] == "family":
      per.setdefault((roles[key][1], c), []).append((key, roles[key][2]))
  return {f: v for f, v in per.items() if len(v) > 1}, per


def test_copies_of_test_images_named_and_kept_out_of_dhat(run):
  """The planted copies of test images (caption band, 60% crop, rotation, padding to a
  square, text; 3 each) are found at the issue's per-family target overall (>= 85%), each
  found one is in select/eval_copies.json as removed, split "test", with the id of its own
  source in the test split, and none of them is in D̂; no clean image is removed; the
  report counts them."""
  roles, _, wd = run
  planted, removed, missed = _test_copies(run)
  assert len(planted) - len(missed) >= 0.85 * len(planted), missed
  assert set(removed) <= set(planted), set(removed) - set(planted)  # no clean image removed
  assert not set(removed) & set(missed)  # removed ones name their own source
  assert not set(removed) & {k for k, _ in _dhat_rows(wd)}
  res = json.load(open(os.path.join(wd, "report", "results.json")))
  assert res["selection"]["eval_copies"]["num_removed"] == len(removed)


def test_every_copy_of_a_test_image_is_kept_out_of_dhat(run):
  """The acceptance as written: every planted copy of a test image is named and none is in
  D̂."""
  roles, _, wd = run
  planted, _, missed = _test_copies(run)
  assert not missed, missed
  assert not set(planted) & {k for k, _ in _dhat_rows(wd)}


def test_near_duplicate_families_collapsed_in_dhat(run):
  """Every U image is a candidate of each class (K' = 63 >= |U|), so without the collapse
  every family member would be in D̂ of both classes (12 repeats a class). With it: at
  most one repeat over all families in a class, each family still has a member in D̂, and
  every clean image is in D̂ of both classes (none collapsed away)."""
  roles, _, wd = run
  rows = _dhat_rows(wd)
  twice, per = _family_repeats(run)
  for c in range(len(CLASSES)):
    assert sum(len(v) - 1 for (_, cc), v in twice.items() if cc == c) <= 1, twice
  assert len(per) == NUM_FAMILIES * len(CLASSES)  # each family still has its best member
  clean = {k for k, r in roles.items() if r[0] == "clean"}
  for c in range(len(CLASSES)):
    keys = {k for k, cc in rows if cc == c}
    assert clean <= keys, sorted(clean - keys)
  done = json.load(open(os.path.join(wd, "select", "done.json")))["near_duplicates"]
  _, removed, _ = _test_copies(run)
  assert done["candidates_per_class"] == 63
  assert done["num_candidates"] == len(CLASSES) * (len(roles) - len(removed))


def test_at_most_one_member_per_family_per_class_in_dhat(run):
  """The acceptance as written: no family has two members in D̂ of a class."""
  twice, _ = _family_repeats(run)
  assert not twice, twice


def test_near_duplicate_list_names_the_collapsed_members(run):
  """select/near_duplicates.parquet lists exactly the family members left out of D̂, in
  each class, each with the selected member of its own family (better ranked); counted in
  done.json and in the report."""
  roles, _, wd = run
  t = _near_dups(wd)
  chosen = set(_dhat_rows(wd))
  for c, kept, dropped, kr, dr in zip(
      t["class"], t["kept_key"], t["dropped_key"], t["kept_rank"], t["dropped_candidate_rank"]
  ):
    assert roles[dropped][0] == "family" and roles[kept][1] == roles[dropped][1], (kept, dropped)
    assert (kept, c) in chosen and (dropped, c) not in chosen and kr <= dr
  want = {
      (k, c)
      for k, r in roles.items()
      if r[0] == "family"
      for c in range(len(CLASSES))
      if (k, c) not in chosen
  }
  assert set(zip(t["dropped_key"], t["class"])) == want
  # families of 2, 3 and 4 images, twice each: 12 members to leave out per class
  assert len(want) >= len(CLASSES) * (12 - 1), len(want)
  done = json.load(open(os.path.join(wd, "select", "done.json")))
  n = done["near_duplicates"]["num_dropped"]
  assert n == len(t["dropped_key"])
  md = open(os.path.join(wd, "report", "results.md")).read()
  assert f"near-duplicates within U collapsed in D̂: {n:,}" in md
