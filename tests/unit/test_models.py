"""Model registry: torchvision parameter counts, dtypes, BatchNorm updates, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bssl import models

# torchvision's counts (1000 classes); resnet_small is the FINDINGS.md Fashion-MNIST net.
TORCHVISION_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x4d": 44_177_704,
    "resnext101_32x8d": 88_791_336,
    "resnext101_32x16d": 194_026_792,
    "resnext101_32x48d": 828_411_176,
}


def shapes(model, x_shape):
  """Variable shapes without allocating anything."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x_shape), train=False))


def test_registry_lists_all_models():
  assert set(models.IMAGE_MODEL_NAMES) == set(TORCHVISION_COUNTS) | {"resnet_small"}


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_param_count_matches_torchvision(name):
  v = shapes(models.create_model(name, 1000), (1, 32, 32, 3))
  assert models.count_params(v["params"]) == TORCHVISION_COUNTS[name]
  assert set(v) == {"params", "batch_stats"}


@pytest.mark.parametrize("depths,expected", [((1, 1, 1), 77_754), ((2, 2, 2), 174_970)])
def test_resnet_small_param_count(depths, expected):
  # Fashion-MNIST: 1 input channel, 10 classes (FINDINGS.md: 77.8k and 175k).
  v = shapes(models.create_model("resnet_small", 10, depths=depths), (1, 28, 28, 1))
  assert models.count_params(v["params"]) == expected


def test_resnet_small_bottleneck_grouped_builds():
  m = models.create_model(
      "resnet_small",
      10,
      widths=(8, 16),
      depths=(1, 2),
      block="bottleneck",
      groups=4,
      width_per_group=8,
  )
  v = shapes(m, (1, 16, 16, 3))
  assert v["params"]["layer2_0"]["conv2"]["kernel"].shape == (
      3,
      3,
      2,
      8,
  )  # width 16*8/64*4 = 8, 4 groups
  assert v["params"]["fc"]["kernel"].shape == (64, 10)


@pytest.mark.parametrize("name,c", [("resnet_small", 1), ("resnet18", 3)])
def test_forward_float32_and_bfloat16(name, c):
  x = np.random.RandomState(1).randn(2, 32, 32, c).astype(np.float32)
  # Random variables from the shapes: compiling `init` costs more than the forward pass.
  shapes = jax.eval_shape(
      lambda: models.create_model(name, 10).init(jax.random.key(0), jnp.zeros(x.shape), train=False)
  )
  rng = np.random.RandomState(0)
  v = jax.tree_util.tree_map(
      lambda s: (
          rng.uniform(0.5, 1.5, s.shape)
          * (0.1 if len(s.shape) < 4 else np.sqrt(2 / np.prod(s.shape[:-1])))
      ).astype(np.float32),
      shapes,
  )
  logits = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    m = models.create_model(name, 10, dtype=dtype)
    for leaf in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))
    ):
      assert leaf.dtype == jnp.float32  # params and BN statistics stay float32

    @jax.jit  # one compilation for eval + train keeps the test fast on CPU
    def run(v, x):
      return m.apply(v, x, train=False), m.apply(v, x, train=True, mutable=["batch_stats"])

    logits[dtype], (logits_t, state) = run(v, x)
    assert logits[dtype].shape == (2, 10) and logits[dtype].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits[dtype])))
    assert logits_t.dtype == jnp.float32 and set(state) == {"batch_stats"}
    for leaf in jax.tree_util.tree_leaves(state):
      assert leaf.dtype == jnp.float32
  # bfloat16 computes the same function to bfloat16 precision.
  f32, bf16 = np.asarray(logits[jnp.float32]), np.asarray(logits[jnp.bfloat16])
  assert np.abs(f32 - bf16).max() <= 0.1 * np.abs(f32).max() + 1e-3


def test_train_mode_updates_batch_stats_with_momentum_0_9():
  m = models.create_model("resnet_small", 10)
  x = 3.0 + np.random.RandomState(1).randn(4, 16, 16, 1).astype(np.float32)
  rng = np.random.RandomState(0)
  v = jax.tree_util.tree_map(
      lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32),
      jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False)),
  )

  @jax.jit
  def run(v, x):
    _, state = m.apply(v, x, train=True, mutable=["batch_stats"])
    return state, m.apply(v, x, train=False), m.apply(v, x[:1], train=False)

  state, full, one = run(v, x)
  old, new = v["batch_stats"], state["batch_stats"]
  for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)):
    assert not np.allclose(a, b)
  # Stem BN: running mean = 0.9 * old + 0.1 * batch mean of the stem conv output.
  conv = jax.lax.conv_general_dilated(
      x,
      v["params"]["conv1"]["kernel"],
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  expected = 0.9 * old["bn1"]["mean"] + 0.1 * conv.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(new["bn1"]["mean"], expected, rtol=1e-4, atol=1e-6)
  # Eval mode is deterministic and does not depend on the rest of the batch.
  np.testing.assert_allclose(full[:1], one, rtol=1e-5, atol=1e-5)


def test_init_he_fan_out_and_zero_init_residual():
  basic = models.create_model(
      "resnet_small", 10, zero_init_residual=True, widths=(64,), depths=(1,)
  )
  bottleneck = models.create_model(
      "resnet_small", 10, block="bottleneck", widths=(64,), depths=(1,)
  )
  x = jnp.zeros((1, 4, 4, 3))
  key = jax.random.key(0, impl="rbg")  # threefry makes XLA:CPU compile init ~5x slower
  both = jax.jit(
      lambda: [m.init(key, x, train=False)["params"]["layer1_0"] for m in (basic, bottleneck)]
  )()  # one compilation
  for v, last, zeroed in zip(both, ("bn2", "bn3"), (True, False)):
    assert np.all(v["bn1"]["scale"] == 1) and not np.any(v["bn1"]["bias"])
    assert np.any(v[last]["scale"]) != zeroed
    k = v["conv2"]["kernel"]  # torchvision: std sqrt(2 / fan_out), fan_out = 3*3*out
    np.testing.assert_allclose(np.std(k), np.sqrt(2.0 / (9 * k.shape[-1])), rtol=0.05)


def test_unknown_model_and_kwargs_are_rejected():
  with pytest.raises(ValueError, match=r"unknown model 'foo'; accepted: resnet18, .*resnet_small"):
    models.create_model("foo", 10)
  with pytest.raises(ValueError, match="widths"):
    models.create_model("resnet50", 10, widths=(1, 2))
  with pytest.raises(ValueError, match="bogus"):
    models.create_model("resnet_small", 10, bogus=1)
  with pytest.raises(ValueError, match="equal length"):
    models.create_model("resnet_small", 10, widths=(8, 16), depths=(1,))
  with pytest.raises(ValueError, match="block"):
    models.create_model("resnet_small", 10, block="dense")
