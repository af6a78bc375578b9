"""Errors before work (bssl/data/checks.py): a data.num_classes that is not the data's own
class count, and undecodable files of an image or video folder, are found before any
training - every bad labelled file in one error, U's bad files marked so scoring skips and
lists them - and the scan is not repeated for files that have not changed."""

import os
import types

import numpy as np
import pytest
from PIL import Image

from bssl.configs import demo
from bssl.data import checks, recipe, sources

needs_fmnist = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist (the README's commands install it)",
)


# ----------------------------------------------------------------------------- classes


@needs_fmnist
def test_fashion_mnist_with_another_num_classes_is_refused_naming_the_count():
  cfg = demo.get_config("tiny")
  cfg.data.num_classes = 5  # used to train a 5-way head on classes 0-4, test on 0-9
  data = recipe.build_data(cfg)
  with pytest.raises(
      sources.DataError,
      match=r"data.num_classes=5 but Fashion-MNIST has 10 " r"classes .*num_classes=10",
  ):
    checks.check_num_classes(data, cfg)
  cfg.data.num_classes = 10
  checks.check_num_classes(recipe.build_data(cfg), cfg)  # the right count passes


@needs_fmnist
def test_the_command_refuses_another_num_classes_before_any_work(tmp_path):
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "bssl.main",
          "--config=configs/demo.py:tiny",
          f"--workdir={tmp_path / 'run'}",
          "--config.data.num_classes=5",
      ],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "data.num_classes=5 but Fashion-MNIST has 10 classes" in r.stderr
  assert not (tmp_path / "run").exists()


def _data(labels, class_names=(), **kw):
  src = sources.ArraySource(np.zeros((len(labels), 2, 2, 1), np.uint8), np.asarray(labels))
  return types.SimpleNamespace(labelled=src, val=None, test=src, class_names=class_names, **kw)


def test_labels_outside_num_classes_and_a_tfds_class_count_are_refused():
  cfg = demo.get_config("tiny")
  cfg.data.kind, cfg.data.num_classes = "fake", 3
  with pytest.raises(
      sources.DataError, match=r"D \(the labelled set\).*labels \[3, 7\] " r"outside \[0, 3\)"
  ):
    checks.check_num_classes(_data([0, 2, 3, 7]), cfg)
  checks.check_num_classes(_data([0, 2, 1]), cfg)
  cfg.data.kind, cfg.data.tfds_name = "tfds", "imagenet2012"
  tfds_like = types.SimpleNamespace(num_classes=1000)  # the dataset info's ClassLabel
  with pytest.raises(sources.DataError, match="has 1000 classes"):
    checks.check_num_classes(
        types.SimpleNamespace(labelled=tfds_like, val=None, test=tfds_like, class_names=()), cfg
    )


# ----------------------------------------------------------------------------- decodable


def _png(path, seed, size=(12, 10)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _folder_cfg(root):
  cfg = demo.get_config("tiny")
  cfg.data.kind, cfg.data.channels, cfg.data.num_classes = "image_folder", 3, 2
  cfg.data.train_dir, cfg.data.test_dir = str(root / "train"), str(root / "test")
  cfg.data.mean, cfg.data.std = (128.0,), (64.0,)
  cfg.data.subset = None
  cfg.data.labelled_per_class, cfg.data.val_per_class = 2, 1
  return cfg


def test_every_bad_file_of_d_val_and_test_in_one_error_and_u_skipped_and_cached(
    tmp_path, monkeypatch
):
  root = tmp_path / "shapes"
  for c in ("a", "b"):
    for i in range(6):
      _png(str(root / "train" / c / f"{i}.png"), 10 * ord(c) + i)
    for i in range(2):
      _png(str(root / "test" / c / f"{i}.png"), 100 + 10 * ord(c) + i)
  cfg = _folder_cfg(root)
  data = recipe.build_data(cfg)  # opens, decodes nothing: the files may break afterwards
  d_file, v_file = data.labelled.name_of(1), data.val.name_of(0)
  u_files = [data.unlabelled.name_of(i) for i in (0, 3)]
  t_file = data.test.name_of(2)
  for f in (d_file, v_file, t_file, *u_files):
    with open(f, "wb") as fh:
      fh.write(b"not an image")
  cache = str(tmp_path / "cache")
  with pytest.raises(sources.DataError) as e:
    checks.scan_decodable(data, cfg, log=lambda m: None, cache_dir=cache, workers=2)
  msg = str(e.value)
  # all of them, at once, each with its reason; none of U's (they are not fatal)
  assert "3 file(s) of the labelled sets" in msg and msg.count("not an image") == 3
  for f in (d_file, v_file, t_file):
    assert f in msg
  assert not any(f in msg for f in u_files)
  assert "D (data.train_dir): 1 of 4" in msg and "test (data.test_dir): 1 of 4" in msg

  # the labelled files fixed: U's bad files are returned, marked and skipped by scoring
  for f, seed in ((d_file, 1), (v_file, 2), (t_file, 3)):
    _png(f, seed)
  lines = []
  bad = checks.scan_decodable(data, cfg, log=lines.append, cache_dir=cache, workers=2)
  assert sorted(bad) == [0, 3] and all("not an image" in r for r in bad.values())
  assert "2 of U's 6 files" in lines[-1]
  rec = data.unlabelled[3]
  assert rec["valid"] is False and int(rec["id"]) == 3
  assert "not an image" in data.unlabelled.reason_of(3)
  assert data.unlabelled.name_of(3) == u_files[1]
  assert data.unlabelled[1].get("valid", True)  # the others read as before

  # a rerun decodes only what changed since (and the bad ones, which are never cached)
  decoded = []
  real = sources.decode_image
  monkeypatch.setattr(sources, "decode_image", lambda p, c=3: decoded.append(p) or real(p, c))
  checks.scan_decodable(recipe.build_data(cfg), cfg, log=lambda m: None, cache_dir=cache)
  assert sorted(decoded) == sorted(u_files)
  decoded.clear()
  _png(t_file, 4, size=(13, 10))  # rewritten: another size and time
  os.utime(t_file, ns=(1, 1))
  checks.scan_decodable(recipe.build_data(cfg), cfg, log=lambda m: None, cache_dir=cache)
  assert sorted(decoded) == sorted(u_files + [t_file])


def test_a_long_scan_says_its_progress_and_other_data_is_not_scanned(tmp_path, monkeypatch):
  root = tmp_path / "shapes"
  for c in ("a", "b"):
    for i in range(3):
      _png(str(root / "train" / c / f"{i}.png"), i)
    _png(str(root / "test" / c / "0.png"), 9)
  cfg = _folder_cfg(root)
  cfg.data.labelled_per_class, cfg.data.val_per_class = 1, None
  data = recipe.build_data(cfg)
  lines = []
  # progress every 0 s: a line per chunk of 2 files with the rate and ETA (whatever the speed)
  monkeypatch.setattr(checks, "_CHUNK", 2)
  assert (
      checks.scan_decodable(
          data,
          cfg,
          log=lines.append,
          cache_dir=str(tmp_path / "c"),
          workers=1,
          progress_seconds=0.0,
      )
      == {}
  )
  progress = [l for l in lines if l.startswith("data check: decoded ") and "eta" in l]
  assert progress and "files/s" in progress[0]
  cfg.data.kind = "fashion_mnist"  # not files: nothing to scan
  assert checks.scan_decodable(data, cfg, log=lines.append) == {}


def _write_video(path, frames=6, size=(20, 16)):
  import av

  with av.open(str(path), "w") as out:
    s = out.add_stream("mpeg4", rate=8)
    s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
    for _ in range(frames):
      a = np.full((size[1], size[0], 3), 90, np.uint8)
      for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
        out.mux(p)
    for p in s.encode():
      out.mux(p)


def test_undecodable_videos_of_d_and_test_are_named_before_training(tmp_path):
  from bssl.data import video

  for name in ("a0", "b0", "a1"):
    _write_video(tmp_path / f"{name}.mp4")
  (tmp_path / "broken.mp4").write_bytes(b"nope")
  (tmp_path / "train.csv").write_text("path,label\na0.mp4,a\nb0.mp4,b\nbroken.mp4,b\n")
  (tmp_path / "test.csv").write_text("path,label\na1.mp4,a\nbroken.mp4,a\n")
  cfg = demo.get_config("tiny")
  cfg.data.kind, cfg.data.channels, cfg.data.max_frames = "video_folder", 3, None
  cfg.data.train_csv, cfg.data.test_csv = str(tmp_path / "train.csv"), str(tmp_path / "test.csv")
  cfg.unlabelled.kind = "video_list"
  spec = video.VideoSpec(size=8, channels=3, clip_len=2, num_clips=1)
  train = video.VideoFolderSource(cfg.data.train_csv, spec)
  test = video.VideoFolderSource(
      cfg.data.test_csv, spec, class_names=train.class_names, field="data.test_csv"
  )
  data = types.SimpleNamespace(
      labelled=train, val=None, test=test, unlabelled=None, spec=spec, class_names=train.class_names
  )
  with pytest.raises(
      sources.DataError,
      match=r"D \(data.train_csv\): 1 of 3 examples cannot "
      r"be decoded: .*broken.mp4.* \| test \(data.test_csv\): 1 of 2 examples "
      r"cannot be decoded: .*broken.mp4",
  ):
    checks.scan_decodable(data, cfg, log=lambda m: None, cache_dir=str(tmp_path / "c"))
