"""Semi-weak supervision: the weak loss, tag resampling, synthetic tags, the
weak_pretrain -> teacher -> student pipeline on configs/semiweak.py:tiny, and a kill -9
of weak_pretrain resumed to the uninterrupted result."""

import json
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from bssl import engine, train
from bssl.data import weak

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_fmnist = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist (the README's commands install it)",
)


def test_weak_loss_is_cross_entropy_against_one_over_k_by_hand():
  logits = np.array(
      [
          [2.0, 0.0, -1.0, 0.5, 0.0, 1.0],
          [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
          [1.0, -2.0, 0.0, 0.0, 3.0, -1.0],
      ],
      np.float32,
  )
  # 1 tag; 2 tags (one repeated, and padding); 5 tags
  tags = np.array([[3, -1, -1, -1, -1, -1], [0, 4, 4, -1, -1, -1], [0, 1, 2, 4, 5, -1]], np.int32)
  want = []
  for z, t in zip(logits.astype(np.float64), [[3], [0, 4], [0, 1, 2, 4, 5]]):
    logp = z - np.log(np.exp(z).sum())
    want.append(-sum(logp[j] for j in t) / len(t))
  got = np.asarray(train.cross_entropy(jnp.asarray(logits), jnp.asarray(tags), 6, 0.0))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  tgt = np.asarray(train.tag_targets(jnp.asarray(tags), 6))
  np.testing.assert_allclose(tgt.sum(1), 1.0)
  assert tgt[1].tolist() == [0.5, 0, 0, 0, 0.5, 0]
  # top-1 counts a prediction that is any of the image's tags
  # (rows 0 and 1 predict classes 0 and 5, not among their tags; row 2 predicts tag 4)
  assert float(train._top1(jnp.asarray(logits), jnp.asarray(tags))) == pytest.approx(1 / 3)


def test_weak_label_smoothing_mixes_the_tag_distribution_with_uniform_by_hand():
  logits = np.array([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 2.0]], np.float32)
  tags = np.array([[3, -1], [0, 2], [-1, -1]], np.int32)  # 1 tag; 2 tags; none
  s, c = 0.2, 4
  want = []
  for z, t in zip(logits.astype(np.float64), [[3], [0, 2], []]):
    logp = z - np.log(np.exp(z).sum())
    # (1 - s) x (1/k on each of the k tags) + s / C everywhere; no tags: no loss
    target = np.array([(1 - s) * (j in t) / len(t) + s / c for j in range(c)]) if t else np.zeros(c)
    want.append(-(target * logp).sum())
  got = np.asarray(train.cross_entropy(jnp.asarray(logits), jnp.asarray(tags), c, s))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] != pytest.approx(
      float(train.cross_entropy(jnp.asarray(logits), jnp.asarray(tags), c, 0.0)[0])
  )


def test_resampling_weights_on_a_known_frequency_table():
  # tag 0 on 4 images, tag 1 on 1 image (image 3 has both), tag 2 on none
  tags = np.array([[0, -1], [0, -1], [0, -1], [0, 1]], np.int32)
  np.testing.assert_allclose(weak.resampling_weights(tags, 3, "none"), [0.25] * 4)
  sq = np.array([0.5, 0.5, 0.5, (0.5 + 1.0) / 2])
  np.testing.assert_allclose(weak.resampling_weights(tags, 3, "sqrt"), sq / sq.sum())
  inv = np.array([0.25, 0.25, 0.25, (0.25 + 1.0) / 2])
  np.testing.assert_allclose(weak.resampling_weights(tags, 3, "inverse"), inv / inv.sum())
  with pytest.raises(weak.WeakDataError, match="resample"):
    weak.resampling_weights(tags, 3, "log")


def test_synthetic_tags_are_noisy_informative_and_a_function_of_the_id():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 4000)
  ids = np.arange(4000)
  kw = dict(num_classes=10, synonyms=3, distractors=20, p_class_tag=0.7, max_noise_tags=2, seed=5)
  t = weak.synthetic_tags(labels, ids, **kw)
  again = weak.synthetic_tags(labels[::-1], ids[::-1], **kw)[::-1]
  np.testing.assert_array_equal(t, again)  # per id, whatever the order
  _, to_class = weak.synthetic_vocabulary(10, 3, 20)
  has_class_tag = np.array([(to_class[r[r >= 0]] == y).any() for r, y in zip(t, labels)])
  # 0.7 of the images draw a tag of their class; noise tags add ~ (1/50 x 3) x 1 more
  assert 0.70 <= has_class_tag.mean() <= 0.76
  noise = [(to_class[r[r >= 0]] != y).sum() for r, y in zip(t, labels)]
  assert 0.8 < np.mean(noise) < 1.1  # 0..2 noise tags, a few hit the image's own class
  assert ((t >= 0).sum(1) == 0).mean() > 0.05  # some images carry no tag at all


@needs_fmnist
def test_semiweak_tiny_pipeline_end_to_end(tmp_path):
  from bssl import config as config_lib
  from bssl.configs import semiweak

  wd = str(tmp_path / "w")
  cfg = semiweak.get_config("tiny")
  # (the transfer stage, also in this recipe, is tested in test_transfer.py)
  cfg.stages = ",".join(s for s in config_lib.ALL_STAGES if s != "transfer")
  engine.run_recipe(cfg, wd)
  wp = json.load(open(os.path.join(wd, "weak_pretrain", "done.json")))
  assert wp["num_tags"] == 50 and wp["resample"] == "sqrt" and wp["steps"] == 6
  t = json.load(open(os.path.join(wd, "teacher", "done.json")))
  assert "variables_from" not in t and t["steps"] == 6
  assert t["record"]["inputs"] == {"weak_pretrain": wp["artifact_id"]}
  res = json.load(open(os.path.join(wd, "report", "results.json")))
  for key in ("baseline", "teacher", "student_pretrained", "student"):
    assert res[key]["num_examples"] == 500
  assert "same_as" not in res["teacher"]
  # the teacher's fine-tuning starts from the weak model's body (not from scratch): its
  # first convolution moved little from the weak model's
  from bssl import parallel
  from bssl.backends import jax as jax_backend
  from bssl.data import recipe

  mesh = parallel.make_mesh()
  spec = recipe.build_data(cfg).spec
  wv = train.load_variables(
      os.path.join(wd, "weak_pretrain", "final"),
      mesh,
      jax_backend.variable_shapes(jax_backend.make_model(cfg.weak_pretrain, 50), spec),
  )
  tv = train.load_variables(
      os.path.join(wd, "teacher", "final"),
      mesh,
      jax_backend.variable_shapes(jax_backend.make_model(cfg.teacher, 10), spec),
  )
  a, b = np.asarray(wv["params"]["conv1"]["kernel"]), np.asarray(tv["params"]["conv1"]["kernel"])
  assert np.abs(a - b).mean() < 0.1 * np.abs(a).mean()
  # changing the weak labels' recipe makes the weak model and everything after it stale
  cfg.weak.p_class_tag = 0.5
  with pytest.raises(engine.RefusedError, match="weak.p_class_tag"):
    engine.run_recipe(cfg, wd)


@needs_fmnist
def test_kill_9_of_weak_pretrain_resumes_to_the_uninterrupted_result(tmp_path):
  args = [
      sys.executable,
      "-m",
      "bssl.main",
      "--config=configs/semiweak.py:tiny",
      "--config.stages=weak_pretrain",
      "--config.weak_pretrain.steps=24",
      "--config.weak_pretrain.checkpoint_every=4",
      "--config.weak_pretrain.log_every=2",
  ]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  ref = tmp_path / "ref"
  r = subprocess.run(
      args + [f"--workdir={ref}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0, r.stderr[-2000:]
  wd = tmp_path / "killed"
  p = subprocess.Popen(
      args + [f"--workdir={wd}"],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  out, deadline = "", time.monotonic() + 300
  while time.monotonic() < deadline:
    line = p.stdout.readline()
    out += line
    if "step 10/24" in line or not line:
      break
  p.kill()
  p.wait()
  assert "step 10/24" in out, out[-2000:]
  assert not (wd / "weak_pretrain" / "done.json").exists()
  r = subprocess.run(
      args + [f"--workdir={wd}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed from checkpoint at step" in r.stdout, r.stdout[-2000:]
  import orbax.checkpoint as ocp

  a = ocp.StandardCheckpointer().restore(str(ref / "weak_pretrain" / "final"))
  b = ocp.StandardCheckpointer().restore(str(wd / "weak_pretrain" / "final"))
  for x, y in zip(jax_leaves(a), jax_leaves(b)):
    np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("preset", ["", "tiny"])
def test_every_semiweak_preset_validates(preset):
  from bssl import config
  from bssl.configs import semiweak

  config.validate(semiweak.get_config(preset), num_devices=8)


def test_resnext_swsl_says_what_the_tagged_u_needs(tmp_path):
  from bssl import config
  from bssl.configs import resnext

  cfg = resnext.get_config("swsl")
  assert cfg.teacher.init_from == "weak_pretrain" and cfg.select.k == 64000
  cfg.unlabelled.path = str(tmp_path)
  with pytest.raises(config.ConfigError, match="weak.path.*weak.tags_file"):
    engine.run_recipe(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_tags_file_source_reads_names_vocab_and_checks_lengths(tmp_path):
  """weak.kind='tags_file' over an image folder: one line of tag names per image id."""
  from PIL import Image

  from bssl.configs import demo
  from bssl.data import recipe

  folder = tmp_path / "imgs"
  folder.mkdir()
  for i in range(4):
    Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(folder / f"{i}.png")
  (tmp_path / "tags.txt").write_text("cat pet\n\nDOG\ncat\n")
  cfg = demo.get_config("tiny")
  cfg.weak.kind, cfg.weak.path = "tags_file", str(folder)
  cfg.weak.tags_file, cfg.weak.resample = str(tmp_path / "tags.txt"), "none"
  w = weak.build(cfg, recipe.build_data(cfg))
  assert w.tag_names == ("DOG", "cat", "pet") and w.num_tags == 3
  assert w.num_images == 3  # the image without tags is left out
  assert [w.source[r]["label"][w.source[r]["label"] >= 0].tolist() for r in range(3)] == [
      [1, 2],
      [0],
      [1],
  ]
  assert int(w.source[1]["image"].mean()) == 80  # image id 2
  (tmp_path / "tags.txt").write_text("cat\n")
  with pytest.raises(weak.WeakDataError, match="1 lines.*4"):
    weak.build(cfg, recipe.build_data(cfg))
