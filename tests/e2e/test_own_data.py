"""Your own data: a class-per-subfolder folder of PNG files (made here in a few lines, as
the README's "Your own data" shows) runs the whole recipe end to end through
``python -m bssl.main``; files added afterwards make the finished stages stale (refused,
not silently reused); bad folders are one-line errors before any work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_folder(root, per_class):
  from PIL import Image

  rng = np.random.default_rng(0)
  colours = {"blue": (50, 70, 210), "green": (40, 180, 60), "red": (200, 40, 40)}
  for split, n in per_class.items():
    for name, rgb in colours.items():
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(n):
        size = int(rng.integers(18, 30))  # any size: resized to data.image_size
        img = rng.normal(rgb, 40, (size, size, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, split, name, f"{i}.png"))


def flags(root, **extra):
  f = dict(
      kind="image_folder",
      train_dir=f"{root}/train",
      test_dir=f"{root}/test",
      num_classes=3,
      channels=3,
      image_size=16,
      mean="128,128,128",
      std="64,64,64",
      augment="random_resized_crop_flip",
      eval_transform="resize_center_crop",
      labelled_per_class=4,
      val_per_class=3,
  )
  f.update(extra)
  return [f"--config.data.{k}={v}" for k, v in f.items()] + ["--config.select.k=8"]


def bssl_main(*args, timeout=600):
  return subprocess.run(
      [sys.executable, "-m", "bssl.main", "--config=configs/demo.py:tiny", *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def test_class_per_subfolder_images_run_the_recipe_end_to_end(tmp_path):
  data = tmp_path / "shapes"
  make_folder(str(data), {"train": 20, "test": 5})
  wd = tmp_path / "run"
  r = bssl_main(f"--workdir={wd}", *flags(data))
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(wd / "report" / "results.json"))
  assert res["baseline"]["num_examples"] == 15 and set(res) >= {"student", "selection"}
  sel = res["selection"]
  # U = the 60 - 12 (D) - 9 (validation) = 39 other training images, labels hidden
  assert sel["num_scored"] == 39 and 0 < sel["num_selected"] <= 3 * 8
  assert sel["label_precision"] is not None
  splits = json.load(open(wd / "splits.json"))
  assert len(splits["labelled"]) == 12 and len(splits["val"]) == 9

  # a file added to the training folder: every finished stage is stale, and said so
  make_folder(str(tmp_path / "more"), {"train": 1})
  os.replace(tmp_path / "more" / "train" / "red" / "0.png", data / "train" / "red" / "new.png")
  r = bssl_main(f"--workdir={wd}", *flags(data), timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "data (files)" in r.stderr or "(data.train_dir): its contents changed" in r.stderr


@pytest.mark.parametrize(
    "case", ["num_classes", "unknown_test_class", "not_a_folder", "no_test_dir", "undecodable"]
)
def test_bad_folders_are_one_line_errors_before_any_work(tmp_path, case):
  data = tmp_path / "shapes"
  make_folder(
      str(data), {"train": 8 if case in ("undecodable", "unknown_test_class") else 2, "test": 1}
  )
  extra, msg = {
      "num_classes": ({"num_classes": 4}, "has 3 class folders"),
      "unknown_test_class": ({}, "are not classes of data.train_dir"),
      "not_a_folder": ({"train_dir": str(tmp_path / "nope")}, "is not a folder"),
      "no_test_dir": ({"test_dir": None}, "needs data.test_dir"),
      # every bad file at once, before the baseline trains (bssl/data/checks.py)
      "undecodable": ({}, "test (data.test_dir): 2 of 3 examples cannot be decoded"),
  }[case]
  if case == "unknown_test_class":
    os.makedirs(data / "test" / "purple")
  if case == "undecodable":
    for name in ("blue", "red"):
      (data / "test" / name / "0.png").write_bytes(b"not a png")
  args = [a for a in flags(data, **extra) if not a.endswith("=None")]
  r = bssl_main(f"--workdir={tmp_path / 'run'}", *args, timeout=120)
  assert r.returncode == 2 and msg in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()
  if case == "undecodable":
    assert (
        r.stderr.count("not an image") == 2 and "blue/0.png" in r.stderr and "red/0.png" in r.stderr
    )
