"""What a rerun opens now is what its record is compared with (issue 29, items 4, 7, 14),
run as a user would (``python -m bssl.main``):

* a ``.gz`` labels file put beside the plain idx file (which the loader prefers) makes the
  baseline stale (exit 2, naming the input), and ``splits.json`` is not rewritten;
* an image added to the test folder leaves the trained models valid (skipped), while the
  evaluation measures the new test set;
* a symlink in a class folder to the class folder or its parent is an error before any
  work (exit 2, naming the link), as is an image reached from two class folders; links
  to folders outside the data keep working."""

import gzip
import json
import os
import struct

import numpy as np
import pytest
from test_own_data import bssl_main, flags, make_folder

from bssl.data import listing, sources


def _write_idx(path, arr):
  arr = np.ascontiguousarray(arr, np.uint8)
  head = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(head + arr.tobytes())


def _fashion_folder(root, n_train=300, n_test=60):
  """Fashion-MNIST's four idx files (plain), small: each class its own mean pattern."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  protos = rng.integers(0, 160, (10, 28, 28))
  for split, n in (("train", n_train), ("t10k", n_test)):
    labels = np.arange(n) % 10
    imgs = np.clip(protos[labels] + rng.integers(0, 96, (n, 28, 28)), 0, 255)
    _write_idx(os.path.join(root, f"{split}-images-idx3-ubyte"), imgs)
    _write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte"), labels)


def _run(wd, *args):
  return bssl_main(f"--workdir={wd}", *args, timeout=600)


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory):
  """A baseline trained on a Fashion-MNIST-format folder of plain idx files."""
  base = tmp_path_factory.mktemp("fashion")
  folder, wd = str(base / "fmnist"), str(base / "run")
  _fashion_folder(folder)
  args = (f"--config.data.folder={folder}", "--config.stages=baseline")
  r = _run(wd, *args)
  assert r.returncode == 0, r.stderr[-3000:]
  return folder, wd, args


def test_gz_beside_the_plain_idx_file_makes_the_baseline_stale(fashion_run):
  folder, wd, args = fashion_run
  r = _run(wd, *args)  # nothing changed: the record holds
  assert r.returncode == 0 and "[baseline] complete" in r.stdout, r.stderr[-2000:]
  splits = os.path.join(wd, "splits.json")
  before = open(splits, "rb").read()
  mtime = os.stat(splits).st_mtime_ns
  # other labels in a .gz beside the plain file: the loader reads the .gz now
  plain = os.path.join(folder, "train-labels-idx1-ubyte")
  labels = sources._read_idx(plain)
  _write_idx(plain + ".gz", (labels + 3) % 10)
  assert sources.find_fashion_mnist(folder)["train_labels"] == plain + ".gz"
  r = _run(wd, *args)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  err = r.stderr
  assert "data.folder:train_labels" in err and "train-labels-idx1-ubyte.gz" in err, err
  assert "baseline" in err
  assert open(splits, "rb").read() == before and os.stat(splits).st_mtime_ns == mtime
  os.remove(plain + ".gz")  # (the module's work directory as it was)


@pytest.fixture(scope="module")
def image_folder_run(tmp_path_factory):
  """baseline, teacher (the baseline itself) and evaluate on a class-per-folder set."""
  base = tmp_path_factory.mktemp("own")
  data, wd = base / "shapes", str(base / "run")
  make_folder(str(data), {"train": 20, "test": 5})
  args = (*flags(data), "--config.stages=baseline,teacher,evaluate")
  r = _run(wd, *args)
  assert r.returncode == 0, r.stderr[-3000:]
  return data, wd, args


def _done(wd, stage):
  with open(os.path.join(wd, stage, "done.json")) as f:
    return json.load(f)


def test_an_image_added_to_the_test_set_leaves_the_models_valid(image_folder_run):
  data, wd, args = image_folder_run
  base = _done(wd, "baseline")
  # the models' records hold nothing of the test set; the evaluation's does
  assert not [k for k in base["record"]["files"] if "test" in k], base["record"]["files"]
  assert not [k for k in base["record"]["fields"] if k.startswith("data.test")]
  ev = _done(wd, "evaluate")
  assert "data.test_dir" in ev["baseline"]["record"]["files"]
  assert ev["baseline"]["num_examples"] == 15
  aids = {s: _done(wd, s)["artifact_id"] for s in ("baseline", "teacher")}
  make_folder(str(data.parent / "more"), {"test": 1})
  os.replace(data.parent / "more" / "test" / "red" / "0.png", data / "test" / "red" / "new.png")
  r = _run(wd, *args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "[baseline] complete" in r.stdout and "[teacher] complete" in r.stdout, r.stdout
  assert {s: _done(wd, s)["artifact_id"] for s in aids} == aids
  ev = _done(wd, "evaluate")
  assert ev["baseline"]["num_examples"] == 16  # measured again, on the new test set
  assert "measured before" not in r.stdout


def _linked_folder(root):
  make_folder(str(root), {"train": 8, "test": 2})
  return root


@pytest.mark.parametrize("target", ["..", "../.."])
def test_a_symlink_to_a_class_folders_parent_is_an_error_before_work(tmp_path, target):
  data = _linked_folder(tmp_path / "shapes")
  link = data / "train" / "red" / "up"
  os.symlink(target, link)
  wd = tmp_path / "run"
  r = _run(wd, *flags(data, labelled_per_class=2, val_per_class=1), "--config.stages=baseline")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  line = r.stderr.strip().splitlines()[-1]
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert str(link) in line and "symlink" in line and "Accepted" in line, line
  assert "data.train_dir" in line
  assert not (wd / "baseline").exists()


def test_an_image_reached_from_two_class_folders_is_refused(tmp_path):
  data = _linked_folder(tmp_path / "shapes")
  train = data / "train"
  # a link into another class folder
  os.symlink("../green", train / "red" / "greens")
  with pytest.raises(sources.DataError, match=r"red/greens.*two labels"):
    sources.LabelledFolderSource(str(train))
  os.remove(train / "red" / "greens")
  # a class folder that is another
  os.symlink("green", train / "lime")
  with pytest.raises(
      sources.DataError,
      match=r"class folder .*lime is a symlink to .green.*the same folder as class folder .*green",
  ):
    sources.LabelledFolderSource(str(train))
  os.remove(train / "lime")
  # two links to one outside file, from two classes
  outside = tmp_path / "outside"
  os.makedirs(outside)
  os.replace(train / "blue" / "0.png", outside / "x.png")
  os.symlink(outside / "x.png", train / "blue" / "x.png")
  os.symlink(outside / "x.png", train / "red" / "x.png")
  with pytest.raises(sources.DataError, match=r"two labels"):
    sources.LabelledFolderSource(str(train))
  os.remove(train / "red" / "x.png")
  os.remove(train / "blue" / "x.png")
  # links to data outside the class folders keep working, each image with its class
  os.symlink(outside, train / "green" / "more")
  src = sources.LabelledFolderSource(str(train))
  got = {f: src.class_names[c] for f, c in zip(src.files, src.labels)}
  assert got[str(train / "green" / "more" / "x.png")] == "green"
  assert len(src) == 3 * 8


def test_unlabelled_folders_refuse_a_link_to_their_parent(tmp_path):
  u = tmp_path / "u"
  make_folder(str(u), {"a": 2})
  os.symlink("../..", u / "a" / "red" / "up")
  with pytest.raises(listing.LinkError, match=r"up.*symlink"):
    listing.list_inputs(str(u))
  with pytest.raises(sources.DataError, match=r"^unlabelled.path: .*up is a symlink"):
    sources.ImageFileSource(str(u))


def test_a_weak_image_folder_that_became_an_ingest_is_another_input(tmp_path):
  """weak.path opened without a kind (files, or an ingest's shards when it holds one): a
  rerun identifies it as it would open it now."""
  from bssl import deps

  folder = tmp_path / "imgs"
  make_folder(str(folder), {"a": 1})
  before = deps.identity("filelist", str(folder))
  assert before.startswith(sources.FILES_IDENTITY)
  (folder / "ingest.json").write_text("{}")  # an ingest started into it
  deps.forget_identities()
  assert deps.identity("filelist", str(folder)) != before
