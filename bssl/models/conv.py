"""A 2-D convolution with CPU-friendly gradients (``conv_impl='im2col_grad'``; the name
is historical: nothing here builds an im2col matrix any more).

Same values as ``lax.conv_general_dilated`` (NHWC inputs, HWIO kernels, explicit
padding, no dilation, any stride and ``feature_group_count``: what ``flax.linen.Conv``
passes for the ResNet family); only how XLA:CPU is asked to compute them differs.
Per-op times below: jax 0.10.2 on the project's 2-core AMD EPYC, ``resnet_small``
shapes (batch 128), medians of interleaved runs on a shared machine (see
``benchmarks/train_step.py`` for the whole train step).

* Kernel gradient. XLA writes it as one convolution with batch and feature swapped:
  the contraction runs over N*H*W (~100k) into a 3x3 output, with the batch (128) as
  the input-feature dimension. XLA:CPU hands convolutions with more than 16 features
  to YNNPACK, which is very slow on this shape (layer1's 16->16 3x3: 120-180 ms vs
  ~23 ms with XLA's Eigen kernel). We issue the same convolution per ``DW_CHUNK`` = 16
  images and add the chunks in float32: for 16-channel layers YNNPACK declines it and
  Eigen takes 17-19 ms; wider layers stay on YNNPACK but gain too (32->32 at 14x14:
  30 -> 19 ms). The previous version (im2col + one matmul) spent ~20 ms just
  materialising the 9 shifted copies (58 MB for layer1) with XLA's slice + concatenate.
  Chunking costs compile time (~+6 s for resnet_small's train step).
  1x1 kernels: one matmul over the (strided) input (11 -> 1.9 ms for 16->32).
* Input gradient of a strided convolution. XLA convolves the zero-dilated output
  gradient (4x the work for stride 2). We compute every stride x stride phase of the
  input at once: one stride-1 convolution of the output gradient whose output channels
  are (phase, channel), then a depth-to-space reshape (3x3 stride 2, 16->32 at 28x28:
  19 -> 8.5 ms). 1x1 kernels: a matmul and an interior pad (3.8 -> 2.2 ms).
* One input channel (the 3x3 stem on grey images): XLA's convolution runs at ~3 GFLOP/s;
  the same sum written as 9 broadcast multiply-adds is one fused loop (7.4 -> 1.0 ms),
  and its kernel gradient is a [9, N*H*W] x [N*H*W, C] matmul (8.2 -> 2.9 ms).

Forward convolutions and stride-1 input gradients stay XLA's. Results equal XLA's up
to float32 summation order (``tests/unit/test_conv.py``): not the same bits, so the
choice is never made by the backend. Image models use XLA's convolutions on every
backend (``create_model``'s default; on the demo's train step these gradients no longer
pay on XLA:CPU: docs/performance.md); ``conv_impl='im2col_grad'`` is an explicit opt-in
(``benchmarks/train_step.py``). Video models use them on every backend, through
``Conv3D(impl='factored')`` (bssl/models/video.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")

# Images per kernel-gradient convolution: with 16, the convolutions of 16-channel layers
# have at most 16 features and XLA:CPU runs them with Eigen, not YNNPACK (module docstring).
DW_CHUNK = 16


def _xla_conv(x, w, strides, padding, groups, preferred=None):
  return lax.conv_general_dilated(
      x,
      w,
      strides,
      padding,
      dimension_numbers=_DN,
      feature_group_count=groups,
      preferred_element_type=preferred,
  )


def _out_size(size, k, s, lo, hi):
  return (size + lo + hi - k) // s + 1


# ----------------------------------------------------------------------------- forward


def _forward(x, w, strides, padding, groups):
  kh, kw, cin, cout = w.shape
  if cin == 1 and groups == 1 and kh * kw <= 25:
    return _forward_one_channel(x, w, strides, padding)
  return _xla_conv(x, w, strides, padding, groups)


def _shifted_windows(x2, kh, kw, strides, padding, ho, wo):
  """[N,H,W] -> the kh*kw strided windows [N,Ho,Wo] of the zero-padded image."""
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  xp = lax.pad(x2, jnp.zeros((), x2.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0)))
  return [
      xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
      for i in range(kh)
      for j in range(kw)
  ]


def _forward_one_channel(x, w, strides, padding):
  kh, kw, _, cout = w.shape
  n, h, wd, _ = x.shape
  ho = _out_size(h, kh, strides[0], *padding[0])
  wo = _out_size(wd, kw, strides[1], *padding[1])
  wins = _shifted_windows(x[..., 0], kh, kw, strides, padding, ho, wo)
  taps = w.reshape(kh * kw, cout)
  acc = None
  for t, win in enumerate(wins):  # XLA fuses the whole sum into one loop
    term = win[..., None].astype(jnp.float32) * taps[t].astype(jnp.float32)
    acc = term if acc is None else acc + term
  return acc.astype(jnp.result_type(x.dtype, w.dtype))


# ----------------------------------------------------------------------------- input gradient


def _input_grad(dy, w, x_shape, strides, padding, groups):
  kh, kw, _, _ = w.shape
  if strides == (1, 1):
    _, vjp = jax.vjp(
        lambda x_: _xla_conv(x_, w, strides, padding, groups), jnp.zeros(x_shape, dy.dtype)
    )
    return vjp(dy)[0]
  if kh == kw == 1 and padding == ((0, 0), (0, 0)) and groups == 1:
    return _input_grad_1x1(dy, w, x_shape, strides)
  return _input_grad_phases(dy, w, x_shape, strides, padding, groups)


def _input_grad_1x1(dy, w, x_shape, strides):
  """dx of a strided 1x1 conv: a matmul, then zeros between the strided pixels."""
  _, h, wd, _ = x_shape
  sh, sw = strides
  ho, wo = dy.shape[1:3]
  z = lax.dot_general(dy, w[0, 0], (((3,), (1,)), ((), ())))  # [N,Ho,Wo,Cin]
  return lax.pad(
      z,
      jnp.zeros((), z.dtype),
      (
          (0, 0, 0),
          (0, h - (sh * (ho - 1) + 1), sh - 1),
          (0, wd - (sw * (wo - 1) + 1), sw - 1),
          (0, 0, 0),
      ),
  )


def _phase_taps(k, s, p_lo, size, out):
  """For one spatial axis of a stride-s conv: input pixel s*m + a receives
  dy[m + d] * w[t] for the taps t with (a + p_lo - t) % s == 0, d = (a + p_lo - t) // s.

  Returns (idx [R, s]: the tap at offset r = d - dmin for phase a, k where none),
  R, M = ceil(size / s) output rows per phase, and the low/high padding of dy.
  """
  taps = {
      (a, t): (a + p_lo - t) // s for a in range(s) for t in range(k) if (a + p_lo - t) % s == 0
  }
  dmin, dmax = min(taps.values()), max(taps.values())
  r = dmax - dmin + 1
  idx = np.full((r, s), k, np.int32)
  for (a, t), d in taps.items():
    idx[d - dmin, a] = t
  m = -(-size // s)
  lo = -dmin
  return idx, r, m, lo, m + r - 1 - out - lo


def _input_grad_phases(dy, w, x_shape, strides, padding, groups):
  """dx of a strided conv as one stride-1 conv producing every input phase.

  Exact: each phase (a, b) sums exactly the taps that reach it; the combined
  [R, R] kernel only adds zero taps where phases have fewer taps (16 vs 9 for a
  3x3 stride-2 kernel, against 36 for XLA's zero-dilated output gradient).
  """
  kh, kw, cig, cout = w.shape
  n, h, wd, cin = x_shape
  sh, sw = strides
  ho, wo = dy.shape[1:3]
  ih, rh, mh, loh, hih = _phase_taps(kh, sh, padding[0][0], h, ho)
  iw, rw, mw, low, hiw = _phase_taps(kw, sw, padding[1][0], wd, wo)
  cog = cout // groups
  # Kernel [Rh, Rw, Cout/G, G*sh*sw*Cin/G]: for group g the output features are
  # (a, b, ci) phases of that group's input channels.
  wext = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0))).reshape(kh + 1, kw + 1, cig, groups, cog)
  k = wext[ih[:, :, None, None], iw[None, None, :, :]]  # [Rh, sh, Rw, sw, cig, G, cog]
  k = jnp.transpose(k, (0, 2, 6, 5, 1, 3, 4)).reshape(rh, rw, cog, groups * sh * sw * cig)
  dyq = lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0), (loh, hih, 0), (low, hiw, 0), (0, 0, 0)))
  z = lax.conv_general_dilated(
      dyq, k, (1, 1), ((0, 0), (0, 0)), dimension_numbers=_DN, feature_group_count=groups
  )  # [N, Mh, Mw, G*sh*sw*cig]
  z = z.reshape(n, mh, mw, groups, sh, sw, cig).transpose(0, 1, 4, 2, 5, 3, 6)
  return z.reshape(n, mh * sh, mw * sw, cin)[:, :h, :wd, :]


# ----------------------------------------------------------------------------- kernel gradient


def _kernel_grad(x, dy, w_shape, strides, padding, groups):
  """dW in float32 (the caller casts to the kernel's dtype)."""
  kh, kw, cig, cout = w_shape
  if kh == kw == 1 and padding == ((0, 0), (0, 0)) and groups == 1:
    xs = x[:, :: strides[0], :: strides[1], :][:, : dy.shape[1], : dy.shape[2], :]
    return lax.dot_general(
        xs.reshape(-1, cig),
        dy.reshape(-1, cout),
        (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    ).reshape(w_shape)
  if cig == 1 and groups == 1:
    ho, wo = dy.shape[1:3]
    cols = jnp.stack(_shifted_windows(x[..., 0], kh, kw, strides, padding, ho, wo), 0)
    return lax.dot_general(
        cols.reshape(kh * kw, -1),
        dy.reshape(-1, cout),
        (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    ).reshape(w_shape)
  n = x.shape[0]
  chunk = DW_CHUNK
  total = None
  for i in range(0, n, chunk):
    part = _kernel_grad_conv(x[i : i + chunk], dy[i : i + chunk], w_shape, strides, padding, groups)
    total = part if total is None else total + part
  return total


def _kernel_grad_conv(x, dy, w_shape, strides, padding, groups):
  """XLA's own kernel-gradient convolution (as jax's conv transpose rule builds it):
  batch and feature dimensions swapped, the forward stride as kernel dilation."""
  kh, kw = w_shape[:2]
  pads = []
  for size, k, s, (lo, _), o in zip(x.shape[1:3], (kh, kw), strides, padding, dy.shape[1:3]):
    pads.append((lo, (s * (o - 1) + 1 - size) + (k - lo - 1)))
  return lax.conv_general_dilated(
      x,
      dy,
      window_strides=(1, 1),
      padding=pads,
      rhs_dilation=strides,
      dimension_numbers=("CHWN", "IHWO", "HWNC"),
      batch_group_count=groups,
      preferred_element_type=jnp.float32,
  )


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_im2col_grad(x, w, strides, padding, groups):
  """``lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC/HWIO/NHWC,
  feature_group_count=groups)`` with the CPU-friendly gradients described above."""
  return _forward(x, w, strides, padding, groups)


def _fwd(x, w, strides, padding, groups):
  return _forward(x, w, strides, padding, groups), (x, w)


def _bwd(strides, padding, groups, res, dy):
  x, w = res
  dx = _input_grad(dy, w, x.shape, strides, padding, groups).astype(x.dtype)
  dw = _kernel_grad(x, dy, w.shape, strides, padding, groups).astype(w.dtype)
  return dx, dw


conv_im2col_grad.defvjp(_fwd, _bwd)


def flax_conv_fn(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **unused,
):
  """Drop-in for ``lax.conv_general_dilated`` as flax.linen.Conv calls it."""
  if (
      (lhs_dilation and any(d != 1 for d in lhs_dilation))
      or (rhs_dilation and any(d != 1 for d in rhs_dilation))
      or isinstance(padding, str)
      or (
          dimension_numbers is not None
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)
      )
      or lhs.ndim != 4
      or unused
  ):
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **unused,
    )
  return conv_im2col_grad(
      lhs,
      rhs,
      tuple(int(s) for s in window_strides),
      tuple((int(lo), int(hi)) for lo, hi in padding),
      int(feature_group_count),
  )
