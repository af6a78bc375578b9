"""Issue 31: the two-axis (data, fsdp) mesh, the train state sharded over fsdp, one RNG.

On 8 fake CPU devices (tests/conftest.py): the initial parameters from a seed are the same
bits on one device, on an 8-device one-axis mesh and on a 4 x 2 mesh (threefry,
partitionable: an fsdp-sharded init is generated shard by shard with the unsharded bits);
a few train steps on the 4 x 2 mesh give the one-axis mesh's losses, accuracies and
parameters (float tolerance) with the state sharded over fsdp all along; a checkpoint is
read straight into that layout; a new head replaces only the head, on the devices; a
mesh_shape the devices cannot form is one line, exit 2, before any work.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from bssl import config, models, parallel, train
from bssl.backends import jax as jax_backend
from bssl.configs import demo
from bssl.data import pipelines

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (28, 28, 1)
# one stage of 64 channels: few arrays (threefry initialisers are slow to compile on
# XLA:CPU), two 3x3x64x64 kernels large enough to be sharded over fsdp
SMALL = dict(widths=(64,), depths=(1,), block="basic")
BATCH, STEPS = 16, 3
# the first values of three arrays of SMALL's initial parameters from seed 7
GOLDEN = {
    "fc/kernel": [0.17307402, 0.013473554, -0.093385726, -0.11232172],
    "layer1_0/conv2/kernel": [-0.00066722, 0.033318162, 0.13574211, -0.007794835],
    "conv1/kernel": [0.03392741, -0.031524032, -0.03268993, 0.06471622],
}


def _cfg(**kw):
  return ml_collections.ConfigDict(
      dict(weight_decay=5e-4, momentum=0.9, nesterov=True, lr=0.1, **kw)
  )


@pytest.fixture(scope="module")
def meshes():
  assert jax.device_count() == 8, "tests/conftest.py gives 8 fake CPU devices"
  one = jax.make_mesh(
      (1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1]
  )
  return {"1": one, "8": parallel.make_mesh(), "4x2": parallel.make_mesh((4, 2))}


@pytest.fixture(scope="module")
def model():
  return models.create_model("resnet_small", 10, **SMALL)


def _tx():
  return train.make_optimizer(_cfg(), lambda step: 0.1)


@pytest.fixture(scope="module")
def states(meshes, model):
  """The initial train state from seed 7 on each mesh (copy before training: donated)."""
  return {k: train.init_state(model, _tx(), 7, SHAPE, m) for k, m in meshes.items()}


def _sharded_leaves(tree):
  """Paths of the arrays whose per-device shard is smaller than the array."""
  out = []
  for path, a in jax.tree_util.tree_leaves_with_path(tree):
    if a.addressable_shards[0].data.shape != a.shape:
      out.append(jax.tree_util.keystr(path))
  return out


def test_the_4x2_mesh_is_data_by_fsdp_from_jax_make_mesh(meshes):
  m = meshes["4x2"]
  assert m.axis_names == ("data", "fsdp") and dict(m.shape) == {"data": 4, "fsdp": 2}
  assert meshes["8"].axis_names == ("data",)  # one entry: the data axis only, as before
  assert parallel.fsdp_size(meshes["8"]) == 1 and parallel.fsdp_size(m) == 2


def test_same_initial_parameters_on_1_device_8_devices_and_4x2(states, model):
  # the 4x2 state really is sharded over fsdp: its large kernels are split in two
  sharded = _sharded_leaves(states["4x2"].params)
  assert any("conv2" in p for p in sharded), sharded
  assert not _sharded_leaves(states["8"].params)
  ref = jax.device_get(states["1"])
  for k in ("8", "4x2"):
    got = jax.device_get(states[k])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b, err_msg=f"{k}: {jax.tree_util.keystr(path)}")
  # threefry's bits are a function of the key alone (not of the backend, XLA version or
  # layout): the values recorded on XLA:CPU; on a GPU or TPU the same bits give the same
  # values up to the last bit of the float transforms (erf_inv)
  for path, want in GOLDEN.items():
    got = functools.reduce(lambda d, k: d[k], path.split("/"), ref.params).ravel()[:4]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8, err_msg=path)


def test_a_new_head_replaces_only_the_head_on_the_devices(meshes, states):
  """Another label space (weak tags -> classes, transfer): the fresh head comes from a
  jitted init on the devices, every other array is the input's own object (the old
  version device_get-ed both sets of weights: numpy copies; on a GPU or TPU the guard
  below refuses that fetch too, XLA:CPU's arrays are host memory already)."""
  mesh, st = meshes["4x2"], states["4x2"]
  variables = {"params": st.params, "batch_stats": st.batch_stats}
  model5 = models.create_model("resnet_small", 5, **SMALL)
  spec = pipelines.ImageSpec(size=SHAPE[0], channels=SHAPE[2])
  with jax.transfer_guard_device_to_host("disallow_explicit"):
    out = jax_backend.new_head(variables, model5, spec, seed=1, mesh=mesh, log=lambda m: None)
  assert out["params"]["fc"]["kernel"].shape == (64, 5)
  assert out["params"]["fc"]["kernel"].sharding == parallel.replicated(mesh)  # (small)
  kept = 0
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(variables), strict=True
  ):
    if "fc" not in jax.tree_util.keystr(path):
      assert a is b, jax.tree_util.keystr(path)
      kept += 1
  assert kept == len(jax.tree.leaves(variables)) - 2


def test_a_checkpoint_is_read_straight_into_its_sharded_layout(meshes, states, tmp_path):
  """``init_from`` / a stage's variables to train from: restored once onto the 4x2 mesh,
  each array in the train state's layout (the fsdp shards), values unchanged."""
  st = states["8"]
  variables = {"params": st.params, "batch_stats": st.batch_stats}
  train.save_variables(tmp_path / "v", variables)
  mesh = meshes["4x2"]
  target = jax.eval_shape(lambda: variables)
  got = train.load_variables(tmp_path / "v", mesh, target, sharded=True)
  want = parallel.state_sharding(mesh, target)
  assert jax.tree.leaves(jax.tree.map(lambda a: a.sharding, got)) == jax.tree.leaves(want)
  assert _sharded_leaves(got["params"])
  for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(variables))):
    np.testing.assert_array_equal(a, b)


def _run(model, mesh, state, bn_mode):
  tx = _tx()
  state = jax.tree.map(lambda a: a.copy(), state)  # (the step donates its state)
  step = train.make_train_step(
      model,
      tx,
      mesh,
      num_classes=10,
      mean=(72.9,),
      std=(90.0,),
      schedule=lambda s: 0.1,
      bn_mode=bn_mode,
  )
  rng = np.random.default_rng(0)
  metrics = []
  for _ in range(STEPS):
    batch = {
        "image": rng.integers(0, 256, (BATCH, *SHAPE), dtype=np.uint8),
        "label": rng.integers(0, 10, (BATCH,), dtype=np.int32),
    }
    state, m = step(state, parallel.global_batch_from_local(mesh, batch))
    metrics.append(jax.device_get(m))
  return state, metrics


@pytest.mark.parametrize("bn_mode", ["sync", "per_device"])
def test_the_4x2_mesh_trains_as_the_one_axis_mesh(meshes, states, model, bn_mode):
  s8, m8 = _run(model, meshes["8"], states["8"], bn_mode)
  s42, m42 = _run(model, meshes["4x2"], states["4x2"], bn_mode)
  for a, b in zip(m8, m42):
    for k in ("loss", "top1", "grad_norm", "param_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
  p8, p42 = jax.device_get((s8.params, s42.params))
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p42)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # the state stayed sharded over fsdp from step to step (weights and momentum alike)
  assert _sharded_leaves(s42.params) == _sharded_leaves(s42.opt_state[1][0].trace)
  assert _sharded_leaves(s42.params)


def test_fsdp_spec_splits_the_largest_divisible_dimension_and_replicates_small_arrays():
  P = jax.sharding.PartitionSpec
  assert parallel.fsdp_spec((3, 3, 64, 128), 8) == P(None, None, None, "fsdp")
  assert parallel.fsdp_spec((2048, 1000), 8) == P("fsdp", None)
  assert parallel.fsdp_spec((2048, 1001), 8) == P("fsdp", None)
  assert parallel.fsdp_spec((3, 3, 64, 128), 1) == P()
  assert parallel.fsdp_spec((12288,), 8) == P()  # a BatchNorm vector
  assert parallel.fsdp_spec((129, 127), 2) == P()  # nothing divisible


@pytest.mark.parametrize(
    "shape, want",
    [
        ((3, 3), "needs 9 devices, but 8 are present"),
        ((2, 2, 2), "must be (data,) or (data, fsdp)"),
        ((0, 8), "must be positive integers"),
        ((-2, 4), "must be positive integers"),
        ((-1, 3), "8 devices do not split into groups of 3"),
    ],
)
def test_a_mesh_the_devices_cannot_form_is_a_config_error(shape, want):
  cfg = demo.get_config("tiny")
  cfg.mesh_shape = shape
  with pytest.raises(config.ConfigError) as e:
    config.validate(cfg)
    config.check_batch_sizes(cfg, 8, 1)
  assert want in str(e.value), str(e.value)
  assert "\n" not in str(e.value)


def test_bad_mesh_shape_is_one_line_exit_2_before_work(tmp_path):
  wd = tmp_path / "wd"
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "bssl.main",
          "--config=configs/demo.py:tiny",
          "--config.mesh_shape=3,3",
          f"--workdir={wd}",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "mesh_shape (3, 3) needs 9 devices" in lines[0], r.stderr
  assert not wd.exists() or not any(wd.iterdir())
