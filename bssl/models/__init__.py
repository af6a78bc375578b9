"""Model registry: a config names an architecture, `create_model` builds it.

    model = create_model('resnext101_32x16d', num_classes=1000, dtype=jnp.bfloat16)
    variables = model.init(rng, x, train=False)      # {'params', 'batch_stats'}
    logits, state = model.apply(variables, x, train=True, mutable=['batch_stats'])

`x` is NHWC; logits are float32 `[batch, num_classes]`. Adding a model is adding
one entry to `_ARCHS`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from bssl.models.resnet import BLOCKS, EXPANSION, BasicBlock, Bottleneck, ResNet
from bssl.models.video import VIDEO_MODEL_NAMES, create_video_model, video_arch_config

# name -> (block, depths, groups, width_per_group); torchvision's definitions.
_ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x4d": ("bottleneck", (3, 4, 23, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_32x16d": ("bottleneck", (3, 4, 23, 3), 32, 16),
    "resnext101_32x48d": ("bottleneck", (3, 4, 23, 3), 32, 48),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)

# Small-image ResNet (Fashion-MNIST / CIFAR scale): 3x3 stride-1 stem, no max-pool.
SMALL_DEFAULTS = dict(
    widths=(16, 32, 64), depths=(1, 1, 1), block="basic", groups=1, width_per_group=64
)

IMAGE_MODEL_NAMES = tuple(_ARCHS) + ("resnet_small",)
MODEL_NAMES = IMAGE_MODEL_NAMES + VIDEO_MODEL_NAMES


def is_video_model(name: str) -> bool:
  """R(2+1)D models eat clips [B, T, H, W, C]; the others images [B, H, W, C]."""
  return name in VIDEO_MODEL_NAMES


_COMMON_KWARGS = ("zero_init_residual",)


def arch_config(name: str, **kwargs) -> dict[str, Any]:
  """The architecture fields (block, depths, widths, groups, width_per_group, stem,
  zero_init_residual) of a registered name; shared with the PyTorch twin so both
  build the same network (a video model: :func:`bssl.models.video.video_arch_config`).
  Raises ValueError on unknown names or kwargs."""
  if is_video_model(name):
    return video_arch_config(name, **kwargs)
  if name not in MODEL_NAMES:
    raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODEL_NAMES)}")
  allowed = _COMMON_KWARGS + (tuple(SMALL_DEFAULTS) if name == "resnet_small" else ())
  bad = sorted(set(kwargs) - set(allowed))
  if bad:
    raise ValueError(
        f"unexpected arguments for model {name!r}: {', '.join(bad)}; "
        f"accepted: {', '.join(allowed) or 'none'}"
    )
  if name == "resnet_small":
    cfg = {**SMALL_DEFAULTS, **{k: v for k, v in kwargs.items() if k in SMALL_DEFAULTS}}
    cfg["widths"] = tuple(int(w) for w in cfg["widths"])
    cfg["depths"] = tuple(int(d) for d in cfg["depths"])
    if len(cfg["widths"]) != len(cfg["depths"]) or not cfg["widths"]:
      raise ValueError(
          f"widths and depths must be non-empty and of equal length, "
          f"got widths={cfg['widths']} depths={cfg['depths']}"
      )
    if any(w <= 0 for w in cfg["widths"]) or any(d <= 0 for d in cfg["depths"]):
      raise ValueError(
          f"widths and depths must be positive, got "
          f"widths={cfg['widths']} depths={cfg['depths']}"
      )
    if cfg["block"] not in BLOCKS:
      raise ValueError(f"block must be one of {BLOCKS}, got {cfg['block']!r}")
    if cfg["block"] == "basic" and (cfg["groups"] != 1 or cfg["width_per_group"] != 64):
      raise ValueError(
          "basic blocks support only groups=1 and width_per_group=64, got "
          f"groups={cfg['groups']} width_per_group={cfg['width_per_group']}"
      )
    if cfg["block"] == "bottleneck":
      inner = [int(w * (cfg["width_per_group"] / 64.0)) * cfg["groups"] for w in cfg["widths"]]
      if min(inner) < 1:
        raise ValueError(
            f"bottleneck width int(width x width_per_group / 64) x groups is 0 for "
            f"widths={cfg['widths']}, width_per_group={cfg['width_per_group']}, "
            f"groups={cfg['groups']}; raise width_per_group (each stage needs "
            f"width x width_per_group >= 64)"
        )
    cfg["stem"] = "small"
  else:
    block, depths, groups, wpg = _ARCHS[name]
    cfg = dict(
        widths=IMAGENET_WIDTHS,
        depths=depths,
        block=block,
        groups=groups,
        width_per_group=wpg,
        stem="imagenet",
    )
  cfg["zero_init_residual"] = bool(kwargs.get("zero_init_residual", False))
  return cfg


# "xla" (the default, on every backend: the model computes the same thing everywhere) or
# "im2col_grad", an explicit opt-in for benchmarks (bssl/models/conv.py: XLA's values up
# to float32 summation order, other gradient kernels on XLA:CPU)
CONV_IMPLS = ("xla", "im2col_grad")


def create_model(
    name: str,
    num_classes: int,
    *,
    dtype=jnp.float32,
    bn_axis_name=None,
    bn_momentum: float = 0.9,
    conv_impl: str | None = None,
    **kwargs,
) -> ResNet:
  """Builds a registered model. `dtype` is the compute dtype (float32 or bfloat16);
  params and BatchNorm statistics stay float32. `bn_axis_name=None` computes batch
  statistics over the batch each call sees (per device under shard_map); a mesh axis
  name synchronises them over that axis. `conv_impl` None: the model's own convolutions,
  the same on every backend (XLA's for images, ``factored`` for video models: see
  :mod:`bssl.models.video`); `im2col_grad` (images) is an opt-in for benchmarks. kwargs: `zero_init_residual` for all models;
  `widths`, `depths`, `block`, `groups`, `width_per_group` for 'resnet_small'; video
  models (R(2+1)D, :mod:`bssl.models.video`) take theirs."""
  if is_video_model(name):
    return create_video_model(
        name,
        num_classes,
        dtype=dtype,
        bn_axis_name=bn_axis_name,
        bn_momentum=bn_momentum,
        conv_impl="factored" if conv_impl in (None, "im2col_grad") else conv_impl,
        **kwargs,
    )
  cfg = arch_config(name, **kwargs)
  if int(num_classes) <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  conv_impl = conv_impl or "xla"
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
  return ResNet(
      num_classes=int(num_classes),
      dtype=dtype,
      bn_axis_name=bn_axis_name,
      bn_momentum=bn_momentum,
      conv_impl=conv_impl,
      **cfg,
  )


def count_params(params) -> int:
  """Total number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
  return int(sum(math.prod(jnp.shape(x)) for x in jax.tree_util.tree_leaves(params)))


__all__ = [
    "MODEL_NAMES",
    "IMAGE_MODEL_NAMES",
    "VIDEO_MODEL_NAMES",
    "is_video_model",
    "create_model",
    "count_params",
    "arch_config",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "EXPANSION",
]
