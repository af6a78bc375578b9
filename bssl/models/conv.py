"""A convolution whose kernel gradient is an im2col matrix product.

On XLA:CPU (jax 0.10) the kernel gradient of a 3x3 NHWC convolution is ~20x
slower than its forward pass (145 ms vs 7.6 ms for [128,28,28,16] -> 16 channels,
``benchmarks/conv_grad.py``), and it dominates a small ResNet's train step. The same
gradient written as "patches^T @ output-gradient" is one large matrix product.
The forward pass and the input gradient keep XLA's own convolution; GPU and TPU
keep XLA's kernel gradient too (see ``create_model(conv_impl=...)``).

Layout: NHWC inputs, HWIO kernels, explicit padding, no dilation — what
``flax.linen.Conv`` passes for the ResNet family.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides, padding, groups):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN,
                                  feature_group_count=groups)


def _patches(x, kh, kw, strides, padding, ho, wo):
  """[N,H,W,C] -> [N,Ho,Wo,kh*kw,C]: the input window of every output pixel."""
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  cols = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  return jnp.stack(cols, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_im2col_grad(x, w, strides, padding, groups):
  return _conv(x, w, strides, padding, groups)


def _fwd(x, w, strides, padding, groups):
  return _conv(x, w, strides, padding, groups), (x, w)


def _bwd(strides, padding, groups, res, dy):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, strides, padding, groups), x)
  (dx,) = vjp_x(dy)
  kh, kw, cg, out = w.shape
  n, ho, wo, _ = dy.shape
  m = n * ho * wo
  cols = _patches(x, kh, kw, strides, padding, ho, wo)  # [N,Ho,Wo,K,C]
  # Materialise the patches: fused into the dot, XLA:CPU falls back to a slow loop.
  cols = lax.optimization_barrier(cols)
  if groups == 1:
    dw = lax.dot_general(cols.reshape(m, kh * kw * cg), dy.reshape(m, out),
                         (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dw = dw.reshape(kh, kw, cg, out)
  else:
    og = out // groups
    cols = cols.reshape(m, kh * kw, groups, cg)
    dyg = dy.reshape(m, groups, og)
    dw = jnp.einsum("mkgc,mgo->kcgo", cols, dyg, preferred_element_type=jnp.float32)
    dw = dw.reshape(kh, kw, cg, out)
  return dx, dw.astype(w.dtype)


conv_im2col_grad.defvjp(_fwd, _bwd)


def flax_conv_fn(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None, **unused):
  """Drop-in for ``lax.conv_general_dilated`` as flax.linen.Conv calls it."""
  if (lhs_dilation and any(d != 1 for d in lhs_dilation)) or (
      rhs_dilation and any(d != 1 for d in rhs_dilation)) or isinstance(padding, str):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision)
  return conv_im2col_grad(lhs, rhs, tuple(window_strides),
                          tuple(tuple(p) for p in padding), int(feature_group_count))
