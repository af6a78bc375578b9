"""R(2+1)D video models in Flax linen (Tran et al., "A Closer Look at Spatiotemporal
Convolutions for Action Recognition", 2018), the video students and teachers of the paper.

A (2+1)D convolution factorises a t x d x d convolution from N_in to N_out channels into a
1 x d x d spatial convolution to M channels, BatchNorm, ReLU, and a t x 1 x 1 temporal
convolution to N_out, with M = floor(t d^2 N_in N_out / (d^2 N_in + t N_out)) so that it
has about as many parameters as the full 3D convolution. The stride s of a block sits on
both halves: (1, s, s) on the spatial one, (s, 1, 1) on the temporal one.

Two layouts of M, both registered:

* ``torchvision`` (``r2plus1d_18``, ``r2plus1d_34``): M is computed once per block from
  the block's input and output widths and used by both of its (2+1)D convolutions, as
  ``torchvision.models.video.r2plus1d_18`` does (31,505,325 parameters at 400 classes).
* ``vmz`` (``r2plus1d_vmz_18``, ``r2plus1d_vmz_34``): M per convolution from that
  convolution's own input and output widths, as in the paper and Facebook's VMZ / Caffe2
  code (the second convolution of a block, N_in = N_out, gets a larger M).

Stem (both): 1x7x7 convolution 3 -> 45, stride (1, 2, 2) -> BN -> ReLU -> 3x1x1 45 -> 64
-> BN -> ReLU, no max-pool. Stages of 64 / 128 / 256 / 512 channels with strides 1 / 2 / 2
/ 2 in time and space, basic blocks ([2, 2, 2, 2] for -18, [3, 4, 6, 3] for -34), global
average pooling, a linear classifier. ``r2plus1d_small`` has configurable widths, depths,
stem widths and stem stride (the offline video demo's clips are 8-16 frames of 28-32 px).

Clips enter as ``[batch, time, height, width, channels]``; logits are float32.

Flax names and torchvision's state_dict keys (``bssl.convert`` maps one onto the other):

  stem.0 / stem.1 / stem.3 / stem.4      stem_spatial / stem_bn1 / stem_temporal / stem_bn2
  layerI.J.conv1.0.0 / .0.1 / .0.3        layerI_J/conv1_spatial / conv1_mid_bn / conv1_temporal
  layerI.J.conv1.1                         layerI_J/bn1      (conv2 likewise, bn2)
  layerI.J.downsample.0 / .1               layerI_J/downsample_conv / downsample_bn
  fc                                       fc
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bssl.models.conv import conv_im2col_grad

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# "factored" (the default, on every backend: the model computes the same thing everywhere)
# or "xla" (XLA's 3-D convolution, with XLA's gradients)
CONV_IMPLS = ("xla", "factored")


class Conv3D(nn.Module):
  """A bias-free 3-D convolution whose kernel is stored as ``[kt, kh, kw, in, out]`` (as
  ``nn.Conv`` stores it, so checkpoints and ``bssl.convert`` see one layout), computed
  either by XLA's 3-D convolution (``impl='xla'``) or, for the kernels R(2+1)D has
  (1 x d x d, t x 1 x 1, 1 x 1 x 1), as a 2-D convolution over folded axes
  (``impl='factored'``): a spatial kernel runs on ``[B*T, H, W, C]``, a temporal one on
  ``[B, T, H*W, C]``, through :mod:`bssl.models.conv`'s CPU-friendly gradients. XLA:CPU
  computes 3-D convolutions and their gradients 4-6x slower than this
  (``benchmarks/video_step.py``: the demo's ``r2plus1d_small`` train step on 8 x 32 x 32
  clips, 464 -> 81 ms; docs/video.md)."""

  features: int
  kernel: tuple
  strides: tuple
  impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kt, kh, kw = self.kernel
    st, sh, sw = self.strides
    w = self.param("kernel", conv_init, (kt, kh, kw, x.shape[-1], self.features), jnp.float32)
    x, w = jnp.asarray(x, self.dtype), jnp.asarray(w, self.dtype)
    pad = [((k - 1) // 2, (k - 1) // 2) for k in self.kernel]
    if self.impl == "xla" or (kt > 1 and (kh > 1 or kw > 1)):
      return jax.lax.conv_general_dilated(
          x, w, self.strides, pad, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
      )
    b, t, h, wd, c = x.shape
    if kt == kh == kw == 1:  # 1x1x1 (the strided shortcut): subsample, then a matmul
      y = x[:, ::st, ::sh, ::sw]
      return jnp.einsum("bthwc,cd->bthwd", y, w[0, 0, 0])
    if kt == 1:  # spatial: fold time into the batch
      y = conv_im2col_grad(x.reshape(b * t, h, wd, c), w[0], (sh, sw), tuple(pad[1:]), 1)
      return y.reshape(b, t, *y.shape[1:])
    # temporal: fold space into one axis
    y = x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x
    h2, w2 = y.shape[2], y.shape[3]
    y = conv_im2col_grad(y.reshape(b, t, h2 * w2, c), w[:, 0], (st, 1), (pad[0], (0, 0)), 1)
    return y.reshape(b, y.shape[1], h2, w2, y.shape[-1])


LAYOUTS = ("torchvision", "vmz")


def mid_channels(n_in: int, n_out: int, t: int = 3, d: int = 3) -> int:
  """M of a (2+1)D convolution: floor(t d^2 N_in N_out / (d^2 N_in + t N_out))."""
  return (t * d * d * n_in * n_out) // (d * d * n_in + t * n_out)


class _Common3D(nn.Module):
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  conv_impl: str = "xla"

  def conv(self, features, kernel, strides, name):
    return Conv3D(
        features, tuple(kernel), tuple(strides), impl=self.conv_impl, dtype=self.dtype, name=name
    )

  def bn(self, train, name):
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=self.bn_momentum,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        axis_name=self.bn_axis_name,
        name=name,
    )

  def conv2plus1d(self, x, train, mid, out, stride, prefix):
    y = self.conv(mid, (1, 3, 3), (1, stride, stride), f"{prefix}_spatial")(x)
    y = nn.relu(self.bn(train, f"{prefix}_mid_bn")(y))
    return self.conv(out, (3, 1, 1), (stride, 1, 1), f"{prefix}_temporal")(y)


class Block2Plus1D(_Common3D):
  """A basic residual block of two (2+1)D convolutions; the stride on the first."""

  planes: int = 64
  stride: int = 1
  layout: str = "torchvision"

  @nn.compact
  def __call__(self, x, train: bool):
    n_in = x.shape[-1]
    if self.layout == "torchvision":
      m1 = m2 = mid_channels(n_in, self.planes)
    else:
      m1, m2 = mid_channels(n_in, self.planes), mid_channels(self.planes, self.planes)
    y = self.conv2plus1d(x, train, m1, self.planes, self.stride, "conv1")
    y = nn.relu(self.bn(train, "bn1")(y))
    y = self.conv2plus1d(y, train, m2, self.planes, 1, "conv2")
    y = self.bn(train, "bn2")(y)
    residual = x
    if self.stride != 1 or n_in != self.planes:
      s = self.stride
      residual = self.conv(self.planes, (1, 1, 1), (s, s, s), "downsample_conv")(x)
      residual = self.bn(train, "downsample_bn")(residual)
    return nn.relu(y + residual)


class R2Plus1D(_Common3D):
  num_classes: int = 400
  depths: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_mid: int = 45
  stem_stride: int = 2
  layout: str = "torchvision"

  @nn.compact
  def __call__(self, x, train: bool = False, features: bool = False):
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
    if x.ndim != 5:
      raise ValueError(
          f"clips must be [batch, time, height, width, channels], got shape " f"{x.shape}"
      )
    x = jnp.asarray(x, self.dtype)
    s = self.stem_stride
    x = self.conv(self.stem_mid, (1, 7, 7), (1, s, s), "stem_spatial")(x)
    x = nn.relu(self.bn(train, "stem_bn1")(x))
    x = self.conv(self.widths[0], (3, 1, 1), (1, 1, 1), "stem_temporal")(x)
    x = nn.relu(self.bn(train, "stem_bn2")(x))
    for i, (w, n) in enumerate(zip(self.widths, self.depths)):
      for j in range(n):
        x = Block2Plus1D(
            planes=w,
            stride=2 if (i > 0 and j == 0) else 1,
            layout=self.layout,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
            bn_axis_name=self.bn_axis_name,
            bn_momentum=self.bn_momentum,
            name=f"layer{i + 1}_{j}",
        )(x, train)
    x = jnp.mean(x, axis=(1, 2, 3))
    if features:
      return x.astype(jnp.float32)
    x = nn.Dense(
        self.num_classes,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.01),
        name="fc",
    )(x)
    return x.astype(jnp.float32)


# name -> (depths, layout); the widths and stem of the paper.
VIDEO_ARCHS = {
    "r2plus1d_18": ((2, 2, 2, 2), "torchvision"),
    "r2plus1d_34": ((3, 4, 6, 3), "torchvision"),
    "r2plus1d_vmz_18": ((2, 2, 2, 2), "vmz"),
    "r2plus1d_vmz_34": ((3, 4, 6, 3), "vmz"),
}
SMALL_VIDEO_DEFAULTS = dict(
    widths=(16, 32, 64), depths=(1, 1, 1), stem_mid=16, stem_stride=1, layout="torchvision"
)
VIDEO_MODEL_NAMES = tuple(VIDEO_ARCHS) + ("r2plus1d_small",)


def video_arch_config(name: str, **kwargs) -> dict:
  """The architecture fields of a registered video model (shared with the PyTorch twin)."""
  if name not in VIDEO_MODEL_NAMES:
    raise ValueError(f"unknown video model {name!r}; accepted: {', '.join(VIDEO_MODEL_NAMES)}")
  if name != "r2plus1d_small":
    if kwargs:
      raise ValueError(f"model {name!r} takes no arguments, got {sorted(kwargs)}")
    depths, layout = VIDEO_ARCHS[name]
    return dict(
        widths=(64, 128, 256, 512), depths=depths, stem_mid=45, stem_stride=2, layout=layout
    )
  bad = sorted(set(kwargs) - set(SMALL_VIDEO_DEFAULTS))
  if bad:
    raise ValueError(
        f"unexpected arguments for model 'r2plus1d_small': {', '.join(bad)}; "
        f"accepted: {', '.join(SMALL_VIDEO_DEFAULTS)}"
    )
  cfg = {**SMALL_VIDEO_DEFAULTS, **kwargs}
  cfg["widths"] = tuple(int(w) for w in cfg["widths"])
  cfg["depths"] = tuple(int(d) for d in cfg["depths"])
  if (
      not cfg["widths"]
      or len(cfg["widths"]) != len(cfg["depths"])
      or min(cfg["widths"] + cfg["depths"]) <= 0
  ):
    raise ValueError(
        f"widths and depths must be positive and of equal length, got "
        f"widths={cfg['widths']} depths={cfg['depths']}"
    )
  if int(cfg["stem_mid"]) <= 0 or int(cfg["stem_stride"]) not in (1, 2):
    raise ValueError(
        f"stem_mid must be positive and stem_stride 1 or 2, got "
        f"{cfg['stem_mid']} and {cfg['stem_stride']}"
    )
  if cfg["layout"] not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {cfg['layout']!r}")
  return cfg


def create_video_model(
    name: str,
    num_classes: int,
    *,
    dtype=jnp.float32,
    bn_axis_name=None,
    bn_momentum: float = 0.9,
    conv_impl: str = "factored",
    **kwargs,
) -> R2Plus1D:
  """A registered video model; ``conv_impl`` ``factored`` (the default, whatever the
  backend: a seed and a batch give the same computation on CPU, GPU and TPU) computes
  the (2+1)D halves as 2-D convolutions with :mod:`bssl.models.conv`'s gradients (4-6x
  faster train steps on XLA:CPU, see :class:`Conv3D`); ``xla`` XLA's 3-D convolution."""
  cfg = video_arch_config(name, **kwargs)
  if int(num_classes) <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
  return R2Plus1D(
      num_classes=int(num_classes),
      dtype=dtype,
      bn_axis_name=bn_axis_name,
      bn_momentum=bn_momentum,
      conv_impl=conv_impl,
      **cfg,
  )
