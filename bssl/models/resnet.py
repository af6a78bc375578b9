"""Flax linen ResNet / ResNeXt with torchvision's layout.

The layout (block order, where the stride sits, widths, downsample branch) follows
torchvision so that parameter counts match it exactly and a PyTorch state_dict maps
onto these variables by renaming and transposing only (see `bssl.convert`):

  torchvision key                    Flax path
  conv1.weight                       params/conv1/kernel
  bn1.{weight,bias}                  params/bn1/{scale,bias}
  bn1.{running_mean,running_var}     batch_stats/bn1/{mean,var}
  layer1.0.conv2.weight              params/layer1_0/conv2/kernel
  layer1.0.downsample.0.weight       params/layer1_0/downsample_conv/kernel
  layer1.0.downsample.1.*            .../layer1_0/downsample_bn/*
  fc.{weight,bias}                   params/fc/{kernel,bias}

Inputs are NHWC `[batch, height, width, channels]`; outputs are float32 logits
`[batch, num_classes]` whatever the compute dtype. Parameters and BatchNorm
statistics are always float32.

One known difference from PyTorch: torch updates `running_var` with the unbiased
batch variance, Flax with the biased one (a factor n/(n-1), negligible for the
batch sizes this recipe uses). Eval-mode outputs are identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bssl.models.conv import flax_conv_fn

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu') -> std sqrt(2 / (out*kh*kw)).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # untruncated in jax

BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}


class _Common(nn.Module):
  """Shared conv / BN factories so every layer gets the same dtype and BN settings."""

  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  conv_impl: str = "xla"  # "xla" or "im2col_grad" (see bssl/models/conv.py)

  def conv(self, features, kernel, stride=1, groups=1, name=None):
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=conv_init,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=flax_conv_fn if self.conv_impl == "im2col_grad" else None,
        name=name,
    )

  def bn(self, train, name, zero_scale=False):
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=self.bn_momentum,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        axis_name=self.bn_axis_name,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        name=name,
    )


class _Block(_Common):
  """A residual block: `planes` base channels, the stride on the first 3x3 conv."""

  planes: int = 64
  stride: int = 1
  groups: int = 1
  width_per_group: int = 64
  zero_init_residual: bool = False


class BasicBlock(_Block):
  """Two 3x3 convs; `planes` output channels (expansion 1)."""

  @nn.compact
  def __call__(self, x, train: bool):
    residual = x
    y = self.conv(self.planes, 3, self.stride, name="conv1")(x)
    y = nn.relu(self.bn(train, "bn1")(y))
    y = self.conv(self.planes, 3, name="conv2")(y)
    y = self.bn(train, "bn2", self.zero_init_residual)(y)
    if self.stride != 1 or x.shape[-1] != self.planes:
      residual = self.conv(self.planes, 1, self.stride, name="downsample_conv")(x)
      residual = self.bn(train, "downsample_bn")(residual)
    return nn.relu(y + residual)


class Bottleneck(_Block):
  """1x1 -> grouped 3x3 (carries the stride, as torchvision "v1.5") -> 1x1 x4."""

  @nn.compact
  def __call__(self, x, train: bool):
    width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
    out = self.planes * EXPANSION["bottleneck"]
    residual = x
    y = self.conv(width, 1, name="conv1")(x)
    y = nn.relu(self.bn(train, "bn1")(y))
    y = self.conv(width, 3, self.stride, self.groups, name="conv2")(y)
    y = nn.relu(self.bn(train, "bn2")(y))
    y = self.conv(out, 1, name="conv3")(y)
    y = self.bn(train, "bn3", self.zero_init_residual)(y)
    if self.stride != 1 or x.shape[-1] != out:
      residual = self.conv(out, 1, self.stride, name="downsample_conv")(x)
      residual = self.bn(train, "downsample_bn")(residual)
    return nn.relu(y + residual)


class ResNet(_Common):
  """ResNet / ResNeXt. `stem='imagenet'`: 7x7/2 conv + 3x3/2 max-pool;
  `stem='small'`: 3x3/1 conv, no pool (for 28-32 px images).

  Stage i has `depths[i]` blocks of `widths[i]` planes; stages after the first
  start with a stride-2 block. The stem has `widths[0]` channels.
  """

  num_classes: int = 1000
  depths: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  block: str = "basic"
  groups: int = 1
  width_per_group: int = 64
  stem: str = "imagenet"
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False, features: bool = False):
    if self.block not in BLOCKS:
      raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
    block_cls = BasicBlock if self.block == "basic" else Bottleneck
    x = jnp.asarray(x, self.dtype)
    if self.stem == "imagenet":
      x = self.conv(self.widths[0], 7, 2, name="conv1")(x)
      x = nn.relu(self.bn(train, "bn1")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == "small":
      x = self.conv(self.widths[0], 3, 1, name="conv1")(x)
      x = nn.relu(self.bn(train, "bn1")(x))
    else:
      raise ValueError(f"stem must be 'imagenet' or 'small', got {self.stem!r}")
    for i, (depth, planes) in enumerate(zip(self.depths, self.widths)):
      for j in range(depth):
        x = block_cls(
            planes=planes,
            stride=2 if (i > 0 and j == 0) else 1,
            groups=self.groups,
            width_per_group=self.width_per_group,
            zero_init_residual=self.zero_init_residual,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            bn_momentum=self.bn_momentum,
            conv_impl=self.conv_impl,
            name=f"layer{i + 1}_{j}",
        )(x, train)
    # Global average pool in float32: a long bf16 sum loses precision.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if features:  # the penultimate layer (transfer: fc-only)
      return x
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(x)
    return x.astype(jnp.float32)
