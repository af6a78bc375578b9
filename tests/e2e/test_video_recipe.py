"""The recipe on video: the factored (2+1)D convolution against XLA's 3-D one, clips as
data (training clips at random times, the same whatever the process count; N uniform
clips for evaluation and scoring), video files through PyAV (a CSV of labels, Kinetics'
CSV, a file list; undecodable files skipped and listed in scoring, fatal and named in
training), the moving Fashion-MNIST of the demo, config checks, the 10-clip evaluation
of the eval step, and 2 processes x 2 devices scoring the same video-level D̂ as 1 x 4."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bssl import config, evaluation, train
from bssl.data import clips as clips_lib
from bssl.data import video
from bssl.models.video import create_video_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HELPERS = os.path.join(ROOT, "tests", "helpers")
VIDEO = os.path.join(ROOT, "configs", "video.py")


# ----------------------------------------------------------------------------- the model


def test_factored_convolutions_equal_xla_3d_ones_values_and_gradients():
  kw = dict(widths=(8, 16), depths=(1, 1), stem_mid=6, stem_stride=2)
  a = create_video_model("r2plus1d_small", 5, conv_impl="xla", **kw)
  b = create_video_model("r2plus1d_small", 5, conv_impl="factored", **kw)
  x = jax.random.normal(jax.random.key(1), (2, 6, 12, 12, 3))
  v = a.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(v) == jax.tree.structure(b.init(jax.random.key(0), x, train=False))
  y = jax.nn.one_hot(jnp.array([1, 3]), 5)

  def loss(m, p):
    out, _ = m.apply(
        {"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(jax.nn.log_softmax(out) * y), out

  (la, oa), ga = jax.value_and_grad(lambda p: loss(a, p), has_aux=True)(v["params"])
  (lb, ob), gb = jax.value_and_grad(lambda p: loss(b, p), has_aux=True)(v["params"])
  np.testing.assert_allclose(oa, ob, rtol=1e-4, atol=1e-5)
  for (path, ga_), gb_ in zip(jax.tree_util.tree_flatten_with_path(ga)[0], jax.tree.leaves(gb)):
    np.testing.assert_allclose(ga_, gb_, rtol=2e-3, atol=2e-5, err_msg=str(path))


# ----------------------------------------------------------------------------- clips as data


def _counting_source(n=12, frames=10, size=8):
  """Video i: frame t is filled with the value 10 * (i % 20) + t (its identity and time)."""
  vids = np.zeros((n, frames, size, size, 1), np.uint8)
  for i in range(n):
    for t in range(frames):
      vids[i, t] = 10 * (i % 20) + t
  from bssl.data.sources import ArraySource

  return ArraySource(vids, np.arange(n) % 3)


def _global_batches(src, spec, steps, pc, start=0, lbs=4):
  out = []
  its = [
      iter(
          video.train_dataset(
              src,
              spec,
              local_batch_size=lbs,
              seed=7,
              process_index=i,
              process_count=pc,
              start_batch=start,
              read_options=__import__("grain").ReadOptions(),
          )
      )
      for i in range(pc)
  ]
  for _ in range(steps):
    parts = [next(it) for it in its]
    img = np.stack([p["image"] for p in parts], 1).reshape(-1, *parts[0]["image"].shape[1:])
    ids = np.stack([p["id"] for p in parts], 1).reshape(-1)
    out.append((img, ids))
  return out


def test_training_clips_are_contiguous_in_range_and_the_same_for_any_process_count():
  src = _counting_source()
  spec = video.VideoSpec(
      size=8, channels=1, clip_len=4, frame_stride=2, num_clips=3, augment="pad_crop_flip", pad=0
  )
  one = _global_batches(src, spec, 6, pc=1, lbs=8)
  two = _global_batches(src, spec, 6, pc=2, lbs=4)
  starts = set()
  for (a, ia), (b, ib) in zip(one, two):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ia, ib)
    for clip, i in zip(a, ia):
      t = clip[:, 0, 0, 0].astype(int) - 10 * (int(i) % 20)
      assert list(np.diff(t)) == [2, 2, 2]  # every frame_stride-th frame, in order
      assert 0 <= t[0] and t[-1] <= 9  # inside the video (10 frames: span 7)
      starts.add(int(t[0]))
  assert starts == {0, 1, 2, 3}  # every start that fits is drawn
  # a resumed stream at batch 3 is the uninterrupted one from batch 3 on
  resumed = _global_batches(src, spec, 3, pc=2, start=3, lbs=4)
  for (a, _), (b, _) in zip(one[3:], resumed):
    np.testing.assert_array_equal(a, b)


def test_pad_crop_never_flips_and_pad_crop_flip_does_sometimes():
  src = _counting_source(frames=4, size=6)
  for i in range(len(src.images)):  # a left-right gradient to see mirrors
    src.images[i, :, :, :, 0] = np.arange(6, dtype=np.uint8)[None, None, :] * 20
  for aug, expect_flip in (("pad_crop", False), ("pad_crop_flip", True)):
    spec = video.VideoSpec(size=6, channels=1, clip_len=2, num_clips=1, augment=aug, pad=0)
    imgs = np.concatenate([b for b, _ in _global_batches(src, spec, 8, pc=1, lbs=4)])
    flipped = imgs[:, 0, 0, 0, 0] > imgs[:, 0, 0, -1, 0]
    assert flipped.any() == expect_flip


def test_evaluation_batches_hold_uniform_clips_and_mask_undecodable_videos():
  src = _counting_source(n=5)

  class WithBad:

    def __len__(self):
      return 5

    def __getitem__(self, i):
      r = dict(src[i])
      if i == 2:
        r["valid"] = False
      return r

  spec = video.VideoSpec(size=8, channels=1, clip_len=3, frame_stride=1, num_clips=4)
  b = video.VideoRecordsBatch(WithBad(), spec, batch_size=4, bounds=[[2, 5]]).map(0)
  assert b["image"].shape == (4, 4, 3, 8, 8, 1)
  assert list(b["mask"]) == [False, True, True, False] and list(b["id"][:3]) == [2, 3, 4]
  starts = b["image"][1, :, 0, 0, 0, 0].astype(int) - 30
  np.testing.assert_array_equal(starts, clips_lib.uniform_starts(10, 3, 1, 4))
  assert starts[0] == 0 and starts[-1] == 10 - 3


def test_the_eval_step_measures_videos_by_their_clip_averaged_softmax():
  from bssl import parallel

  m = create_video_model("r2plus1d_small", 4, widths=(8,), depths=(1,), stem_mid=4)
  x = jax.random.randint(jax.random.key(3), (4, 10, 3, 8, 8, 1), 0, 255).astype(jnp.uint8)
  v = m.init(jax.random.key(0), jnp.zeros((1, 3, 8, 8, 1)), train=False)
  mean, std = (100.0,), (50.0,)
  per_clip = np.stack(
      [jax.nn.softmax(m.apply(v, train.normalize(x[:, c], mean, std)), -1) for c in range(10)], 1
  )
  probs = per_clip.mean(1)
  np.testing.assert_allclose(
      evaluation.video_probs(m, v, x, mean, std), probs, rtol=1e-5, atol=1e-6
  )
  labels = np.array([int(np.argmax(probs[0])), int(np.argmin(probs[1])), 0, 1], np.int32)
  step = evaluation.make_eval_step(m, parallel.make_mesh(), num_classes=4, mean=mean, std=std)
  out = jax.device_get(
      step(v, {"image": x, "label": labels, "mask": np.array([True, True, True, False])})
  )
  top1 = np.argmax(probs, 1) == labels
  assert out["count"] == 3 and out["top1"] == top1[:3].sum()
  loss = -np.log(probs[np.arange(3), labels[:3]]).sum()
  np.testing.assert_allclose(out["loss"], loss, rtol=1e-4)


# ----------------------------------------------------------------------------- video files


def _write_video(path, frames=12, size=(24, 20), value=None, seed=0):
  import av

  rng = np.random.default_rng(seed)
  with av.open(str(path), "w") as out:
    s = out.add_stream("mpeg4", rate=8)
    s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
    for _t in range(frames):
      a = (
          np.full((size[1], size[0], 3), value, np.uint8)
          if value is not None
          else rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
      )
      for p in s.encode(__import__("av").VideoFrame.from_ndarray(a, format="rgb24")):
        out.mux(p)
    for p in s.encode():
      out.mux(p)


@pytest.fixture(scope="module")
def video_files(tmp_path_factory):
  """A Kinetics-like folder: 2 classes x 6 training videos, 2 x 2 test videos, 6 unlabelled
  ones and one that is not a video."""
  root = tmp_path_factory.mktemp("videos")
  rows, test_rows = [], []
  for c, name in enumerate(("abseiling", "juggling")):
    (root / name).mkdir()
    for j in range(8):
      f = root / name / f"v{j}.mp4"
      _write_video(f, value=40 + 150 * c, frames=10 + j)
      (rows if j < 6 else test_rows).append(f"{name}/v{j}.mp4,{name}")
  (root / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
  (root / "test.csv").write_text("path,label\n" + "\n".join(test_rows) + "\n")
  unl = root / "unlabelled"
  unl.mkdir()
  for j in range(6):
    _write_video(unl / f"u{j}.mp4", value=40 + 150 * (j % 2))
  (unl / "broken.mp4").write_bytes(b"this is not a video")
  return root


def test_decoding_a_csv_folder_kinetics_names_and_a_file_list(video_files, tmp_path):
  spec = video.VideoSpec(size=16, channels=3, clip_len=4, num_clips=2)
  src = video.VideoFolderSource(str(video_files / "train.csv"), spec)
  assert src.class_names == ("abseiling", "juggling") and len(src) == 12
  r = src[7]
  assert r["image"].shape == (11, 18, 22, 3) and r["label"] == 1  # 24x20 -> short side 18
  assert abs(int(r["image"].mean()) - 190) < 8
  # Kinetics' own CSV: files found by <label>/<youtube_id>_<start>_<end>.<ext>
  k = tmp_path / "k"
  (k / "juggling").mkdir(parents=True)
  shutil.copy(video_files / "juggling" / "v0.mp4", k / "juggling" / "abc_000010_000020.mp4")
  (k / "kin.csv").write_text(
      "label,youtube_id,time_start,time_end,split\n"
      "juggling,abc,10,20,train\njuggling,zzz,0,10,train\n"
  )
  ks = video.VideoFolderSource(str(k / "kin.csv"), spec)
  assert len(ks) == 1 and ks.files[0].endswith("juggling/abc_000010_000020.mp4")
  assert ks[0].get("valid", True)
  # a listed file that is not there (downloads have gaps) is left out, named in a note
  assert len(ks.missing) == 1 and "zzz_000000_000010" in ks.missing[0]
  assert "1 of 2 listed videos do not exist" in ks.notes[0]
  for text, match in (
      ("path,label\n", "no rows"),
      ("path,label\nx.mp4,\n", "empty label"),
      ("file,class\nx.mp4,a\n", "lacks the columns"),
      ("path,label\nnope.mp4,a\n", "none of the 1 videos"),
  ):
    (k / "bad.csv").write_text(text)
    with pytest.raises(video.DataError, match=match):
      video.VideoFolderSource(str(k / "bad.csv"), spec)
  lst = video.VideoListSource(str(video_files / "unlabelled"), spec)
  assert len(lst) == 7
  bad = [i for i in range(7) if not lst[i].get("valid", True)]
  assert [os.path.basename(lst.name_of(i)) for i in bad] == ["broken.mp4"]
  assert lst.reason_of(bad[0])


def _video_folder_args(root, workdir, extra=()):
  return [
      sys.executable,
      "-m",
      "bssl.main",
      f"--config={VIDEO}:tiny",
      f"--workdir={workdir}",
      "--config.data.kind=video_folder",
      f"--config.data.train_csv={root / 'train.csv'}",
      f"--config.data.test_csv={root / 'test.csv'}",
      "--config.data.num_classes=2",
      "--config.unlabelled.kind=video_list",
      f"--config.unlabelled.path={root / 'unlabelled'}",
      "--config.select.k=2",
      "--config.select.p=1",
      "--config.data.labelled_per_class=4",
      *extra,
  ]


def _env(devices=1):
  return dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      PYTHONPATH=ROOT,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
  )


def test_video_files_end_to_end_bad_ones_listed_in_scoring_and_fatal_in_training(
    video_files, tmp_path
):
  wd = tmp_path / "run"
  # the teacher is the baseline itself (as the demo's): what is checked is how video files
  # are read, scored and reported, not which model scores them; the tiny preset's own
  # teacher trains in test_recorded_deps.py (its video run) and in
  # test_a_weakly_supervised_video_teacher below
  teacher = [
      "--config.teacher.init_from=baseline",
      "--config.teacher.steps=0",
      "--config.teacher.model_kwargs.depths=1,1",
  ]
  r = subprocess.run(
      _video_folder_args(video_files, wd, teacher),
      env=_env(),
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  score = json.load(open(wd / "score" / "done.json"))
  assert score["num_bad_images"] == 1 and score["num_scored"] == 6
  bad = json.load(open(wd / "select" / "bad_images.json"))
  assert [os.path.basename(f) for f in bad["files"]] == ["broken.mp4"] and bad["reasons"][0]
  res = json.load(open(wd / "report" / "results.json"))
  assert res["baseline"]["num_examples"] == 4  # video-level: 4 test videos
  md = open(wd / "report" / "results.md").read()
  assert "1 videos of U could not be scored" in md and "scored videos" in md
  assert os.path.exists(wd / "report" / "selected_images.png")
  # A labelled video that cannot be decoded stops training, naming the file (exit 2).
  bad_csv = tmp_path / "train_bad.csv"
  (tmp_path / "juggling").mkdir()
  (tmp_path / "juggling" / "broken.mp4").write_bytes(b"nope")
  rows = (video_files / "train.csv").read_text().splitlines()
  # (one juggling video replaced by the broken file: 6 per class, all of them in D)
  bad_csv.write_text(
      "\n".join(
          [rows[0]]
          + [f"{video_files}/{r}" for r in rows[1:-1]]
          + [f"{tmp_path}/juggling/broken.mp4,juggling"]
      )
      + "\n"
  )
  r = subprocess.run(
      _video_folder_args(
          video_files,
          tmp_path / "run2",
          [
              f"--config.data.train_csv={bad_csv}",
              "--config.data.labelled_per_class=6",
              "--config.stages=baseline",
          ],
      ),
      env=_env(),
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
  )
  assert r.returncode == 2, r.stderr[-2000:]
  assert "broken.mp4" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
  # A test video that cannot be decoded: evaluation refuses to measure a partial test set,
  # naming the file (exit 2); one that is listed but absent is left out with a note.
  bad_test = tmp_path / "test_bad.csv"
  trows = (video_files / "test.csv").read_text().splitlines()
  bad_test.write_text(
      "\n".join(
          [trows[0]]
          + [f"{video_files}/{r}" for r in trows[1:]]
          + [f"{tmp_path}/juggling/broken.mp4,juggling", f"{tmp_path}/juggling/absent.mp4,juggling"]
      )
      + "\n"
  )
  r = subprocess.run(
      _video_folder_args(
          video_files,
          tmp_path / "run3",
          [f"--config.data.test_csv={bad_test}", "--config.stages=baseline,evaluate"],
      ),
      env=_env(),
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
  )
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "1 of 5 examples cannot be decoded" in r.stderr and "broken.mp4" in r.stderr
  assert "1 of 6 listed videos do not exist" in r.stdout and "absent.mp4" in r.stdout


# ----------------------------------------------------------------------------- the demo's data


def test_moving_fashion_mnist_classes_need_the_motion():
  pytest.importorskip("bssl.data.sources").find_fashion_mnist(None) if os.path.exists(
      "/usr/share/datasets/fashion-mnist"
  ) else pytest.skip("needs dataset-fashion-mnist")
  train_set, _ = video.moving_fashion_mnist(None, frames=8, size=32, garment=20)
  sub = train_set.subset(np.arange(400))
  assert list(np.unique(sub.labels)) == list(range(20))
  cols_right, cols_left = [], []
  for i in range(400):
    v = sub[i]["image"][..., 0].astype(float)
    d = sub.labels[i] % 2
    assert sub.labels[i] // 2 == sub.garments[i]
    # the garment moves: frame t+1 is frame t rolled by +speed (right) or -speed (left)
    shift = next(s for s in (1, 2, -1, -2) if np.array_equal(np.roll(v[0], s, 1), v[1]))
    assert (shift > 0) == (d == 0)
    (cols_right if d == 0 else cols_left).append(int(sub._draws[i, 2]))
  # where a garment is tells nothing of its direction: both start anywhere on the canvas
  assert min(cols_right) < 4 and max(cols_right) > 27 and min(cols_left) < 4 and max(cols_left) > 27


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "override,match",
    [
        ({"baseline.model": "resnet_small"}, "baseline.model='resnet_small' is an image model"),
        ({"unlabelled.kind": "image_folder", "unlabelled.path": "/x"}, "holds images"),
        ({"data.augment": "random_resized_crop_flip"}, "video clips take"),
        ({"stages": "baseline,transfer"}, "transfer stage"),
        ({"data.kind": "video_folder"}, "needs data.train_csv, data.test_csv"),
        ({"data.clip_len": 6, "data.frame_stride": 2}, "a clip spans"),
    ],
)
def test_video_configs_are_checked_before_any_work(override, match):
  from bssl.configs import video as video_cfg

  cfg = video_cfg.get_config("tiny")
  for k, v in override.items():
    node = cfg
    *head, last = k.split(".")
    for h in head:
      node = node[h]
    node[last] = v
  with pytest.raises(config.ConfigError, match=match):
    config.validate(cfg)


def test_the_kinetics_recipe_says_what_is_missing():
  r = subprocess.run(
      [sys.executable, "-m", "bssl.main", f"--config={VIDEO}", "--workdir=/tmp/bssl_never_written"],
      env=_env(),
      capture_output=True,
      text=True,
      timeout=120,
      cwd=ROOT,
  )
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert (
      "data.train_csv, data.test_csv, unlabelled.path" in r.stderr and "video.py:demo" in r.stderr
  )
  assert not os.path.exists("/tmp/bssl_never_written")


# ----------------------------------------------------------------------------- multi-host


@pytest.mark.slow  # covered faster by: see docs/tests.md
def test_two_processes_by_two_devices_score_the_video_dhat_of_one_by_four(tmp_path):
  args = [f"--config={VIDEO}:tiny", "--config.stages=baseline,teacher,score,select"]
  pod = tmp_path / "pod"
  r = subprocess.run(
      [
          "bash",
          os.path.join(ROOT, "launch", "local.sh"),
          "--num_processes",
          "2",
          "--devices_per_process",
          "2",
          "--log_dir",
          str(tmp_path / "logs"),
          "--",
          *args,
          f"--workdir={pod}",
      ],
      env=_env(2),
      capture_output=True,
      text=True,
      timeout=900,
  )
  logs = "".join(
      open(tmp_path / "logs" / f).read()[-2000:] for f in sorted(os.listdir(tmp_path / "logs"))
  )
  assert r.returncode == 0, r.stderr[-2000:] + logs
  one = tmp_path / "one"
  one.mkdir()
  for n in ("config.json", "splits.json", "baseline", "teacher"):
    (shutil.copytree if (pod / n).is_dir() else shutil.copy)(pod / n, one / n)
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "bssl.main",
          *args,
          f"--workdir={one}",
          "--config.stages=score,select",
      ],
      env=_env(4),
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  from bssl import selection

  a = selection.read_selection(pod / "select" / "dhat")
  b = selection.read_selection(one / "select" / "dhat")
  assert len(a.ids) > 0
  for k in ("ids", "classes", "ranks"):
    np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
  np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
  assert json.load(open(pod / "score" / "done.json"))["num_processes"] == 2


def test_a_weakly_supervised_video_teacher(tmp_path):
  """Semi-weak on video: weak_pretrain on U's synthetic tags, then the teacher fine-tuned
  from it with a new head (the paper's IG-Kinetics teacher, in miniature)."""
  from bssl import engine
  from bssl.configs import video as video_cfg

  cfg = video_cfg.get_config("tiny")
  cfg.stages = "weak_pretrain,teacher"
  cfg.teacher.init_from = "weak_pretrain"
  cfg.weak_pretrain.update(
      model=cfg.teacher.model,
      model_kwargs=dict(cfg.teacher.model_kwargs),
      steps=2,
      epochs=None,
      batch_size=8,
      log_every=1,
      checkpoint_every=0,
      bn_mode="sync",
      dtype="float32",
  )
  engine.run_recipe(cfg, str(tmp_path))
  weak = json.load(open(tmp_path / "weak_pretrain" / "done.json"))
  assert weak["num_tags"] > cfg.data.num_classes and weak["steps"] == 2
  assert json.load(open(tmp_path / "teacher" / "done.json"))["steps"] == 4
