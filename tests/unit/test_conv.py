"""bssl.models.conv: values and gradients equal to lax.conv_general_dilated's.

Every code path of the custom convolution is covered: stride 1 and 2 x kernels 1/3/7 x
feature groups 1 and 4 in float32 and bfloat16; in float32 also even and odd input sizes,
one input channel (the stem path) and batches above ``DW_CHUNK`` with a remainder chunk.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bssl import models
from bssl.models import conv

DN = ("NHWC", "HWIO", "NHWC")


def _grads(f, x, w, dy):
  y, vjp = jax.vjp(f, x, w)
  return (y,) + vjp(dy)


@jax.jit
def _rel_err(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-30)


# (batch, size, cin, cout, kernel, stride, groups)
PRODUCT = [(2, 9, 8, 8, k, s, g) for k, s, g in itertools.product((1, 3, 7), (1, 2), (1, 4))]
EXTRA = [
    (4, 10, 8, 16, 3, 2, 1),  # even size, stride 2
    (3, 11, 4, 8, 1, 2, 1),  # strided 1x1 on an odd size
    (4, 12, 1, 8, 3, 1, 1),  # one input channel (the stem path)
    (4, 13, 1, 8, 3, 2, 1),
    (conv.DW_CHUNK + 5, 6, 8, 8, 3, 1, 1),  # kernel gradient in chunks, with a remainder
    (conv.DW_CHUNK + 5, 7, 8, 16, 3, 2, 4),
]


def _case_errors(cases, dtype):
  """Relative errors of (y, dx, dw) for every case, from one jitted function (one compile
  per dtype keeps the test fast)."""
  args, fns = [], []
  for n, size, cin, cout, k, s, g in cases:
    rng = np.random.RandomState(n * 1000 + size * 10 + k)
    p = (k - 1) // 2
    pad = ((p, p), (p, p))
    x = jnp.asarray(rng.randn(n, size, size, cin), dtype)
    w = jnp.asarray(rng.randn(k, k, cin // g, cout) / np.sqrt(k * k * cin / g), dtype)

    def ref(x, w, s=s, pad=pad, g=g):
      return lax.conv_general_dilated(
          x, w, (s, s), pad, dimension_numbers=DN, feature_group_count=g
      )

    def mine(x, w, s=s, pad=pad, g=g):
      return conv.conv_im2col_grad(x, w, (s, s), pad, g)

    dy = jnp.asarray(rng.randn(*jax.eval_shape(ref, x, w).shape), dtype)
    args.append((x, w, dy))
    fns.append((ref, mine))

  @jax.jit
  def errors(args):
    out = []
    for (ref, mine), (x, w, dy) in zip(fns, args):
      expected, got = _grads(ref, x, w, dy), _grads(mine, x, w, dy)
      for e, o in zip(expected, got):
        assert o.shape == e.shape and o.dtype == e.dtype
      out.append(jnp.stack([_rel_err(e, o) for e, o in zip(expected, got)]))
    return jnp.stack(out)

  return np.asarray(errors(args))


@pytest.mark.parametrize(
    "dtype,cases", [(jnp.float32, PRODUCT + EXTRA), (jnp.bfloat16, PRODUCT)], ids=["f32", "bf16"]
)
def test_values_and_gradients_match_xla(dtype, cases):
  errs = _case_errors(cases, dtype)
  # float32: summation order only. bfloat16: both round their float32 sums to 8 bits.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  bad = [
      (case, dict(zip(("y", "dx", "dw"), e))) for case, e in zip(cases, errs) if not np.all(e < tol)
  ]
  assert not bad, bad


def test_flax_conv_fn_falls_back_for_dilation_and_string_padding():
  x = jnp.ones((2, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 4))
  for kwargs in ({"padding": "SAME"}, {"padding": ((1, 1), (1, 1)), "rhs_dilation": (2, 2)}):
    got = conv.flax_conv_fn(x, w, (1, 1), dimension_numbers=DN, **kwargs)
    want = lax.conv_general_dilated(x, w, (1, 1), dimension_numbers=DN, **kwargs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_resnet_small_gradients_equal_across_conv_impls():
  """A small demo-style model (3x3 stem on 1 channel, a stride-1 block, a stride-2 block
  with its 1x1 downsample conv):
  conv_impl='im2col_grad' and 'xla' give the same loss and parameter gradients."""
  x = jnp.asarray(np.random.RandomState(0).randn(conv.DW_CHUNK + 4, 10, 10, 1), jnp.float32)
  labels = jnp.arange(x.shape[0]) % 10
  out = {}
  v = jax.jit(
      lambda r: models.create_model("resnet_small", 10, widths=(8, 16), depths=(1, 1)).init(
          r, x[:1], train=False
      )
  )(jax.random.key(0, impl="rbg"))
  for impl in ("xla", "im2col_grad"):
    m = models.create_model("resnet_small", 10, conv_impl=impl, widths=(8, 16), depths=(1, 1))

    def loss(params, m=m, v=v):
      logits, _ = m.apply(
          {"params": params, "batch_stats": v["batch_stats"]},
          x,
          train=True,
          mutable=["batch_stats"],
      )
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    out[impl] = jax.jit(jax.value_and_grad(loss))(v["params"])
  (l0, g0), (l1, g1) = out["xla"], out["im2col_grad"]
  np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
  for path, a in jax.tree_util.tree_leaves_with_path(g0):
    b = dict(jax.tree_util.tree_leaves_with_path(g1))[path]
    assert float(_rel_err(a, b)) < 1e-4, (jax.tree_util.keystr(path), float(_rel_err(a, b)))
