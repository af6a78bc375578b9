"""PyTorch twin of `bssl.models`, with torchvision's module names and structure.

Exists so that torchvision / torch.hub checkpoints (e.g. the paper's released
`facebookresearch/semi-supervised-ImageNet1K-models`) can be checked and converted
(`bssl.convert`), and so that Flax-trained weights can be exported back to PyTorch.
torchvision itself is not a dependency: the twin reproduces its layout
(conv1, bn1, layer1.0.conv1, ..., layer1.0.downsample.0/1, fc) and initialisation.

Only the PyTorch backend (`bssl.backends`: this module and `torch.py`) and the conversion
CLI import torch; the rest of bssl runs without it (`pip install -r requirements-torch.txt`).
"""

from __future__ import annotations

try:
  import torch
  from torch import nn
except ImportError as e:  # pragma: no cover - exercised only without torch
  raise ImportError(
      "bssl.backends.torch_models needs PyTorch: pip install -r requirements-torch.txt"
  ) from e

from bssl.models import arch_config, is_video_model
from bssl.models.video import mid_channels, video_arch_config


def _conv(cin, cout, kernel, stride=1, groups=1):
  return nn.Conv2d(
      cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False
  )


def _downsample(cin, cout, stride):
  return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, groups=1, width_per_group=64):
    super().__init__()
    self.conv1 = _conv(inplanes, planes, 3, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = _conv(planes, planes, 3)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = (
        _downsample(inplanes, planes, stride) if stride != 1 or inplanes != planes else None
    )

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, groups=1, width_per_group=64):
    super().__init__()
    width = int(planes * (width_per_group / 64.0)) * groups
    out = planes * self.expansion
    self.conv1 = _conv(inplanes, width, 1)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = _conv(width, width, 3, stride, groups)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = _conv(width, out, 1)
    self.bn3 = nn.BatchNorm2d(out)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = _downsample(inplanes, out, stride) if stride != 1 or inplanes != out else None

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class ResNet(nn.Module):
  """Same fields as `bssl.models.ResNet`; NCHW input `[batch, in_channels, H, W]`."""

  def __init__(
      self,
      num_classes,
      depths,
      widths,
      block="basic",
      groups=1,
      width_per_group=64,
      stem="imagenet",
      zero_init_residual=False,
      in_channels=3,
  ):
    super().__init__()
    block_cls = BasicBlock if block == "basic" else Bottleneck
    inplanes = widths[0]
    if stem == "imagenet":
      self.conv1 = _conv(in_channels, inplanes, 7, 2)
      self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    else:
      self.conv1 = _conv(in_channels, inplanes, 3, 1)
      self.maxpool = nn.Identity()
    self.bn1 = nn.BatchNorm2d(inplanes)
    self.relu = nn.ReLU(inplace=True)
    self.num_stages = len(depths)
    for i, (depth, planes) in enumerate(zip(depths, widths)):
      blocks = []
      for j in range(depth):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(block_cls(inplanes, planes, stride, groups, width_per_group))
        inplanes = planes * block_cls.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(inplanes, num_classes)

    # torchvision's initialisation (fc keeps nn.Linear's default).
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
    if zero_init_residual:
      for m in self.modules():
        if isinstance(m, Bottleneck):
          nn.init.constant_(m.bn3.weight, 0)
        elif isinstance(m, BasicBlock):
          nn.init.constant_(m.bn2.weight, 0)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_stages):
      x = getattr(self, f"layer{i + 1}")(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


def create_torch_model(name: str, num_classes: int, *, in_channels: int = 3, **kwargs) -> ResNet:
  """Mirror of `bssl.models.create_model` (same names, same kwargs, same errors)."""
  if is_video_model(name):
    raise ValueError(f"{name!r} is a video model: build its twin with create_torch_video_model")
  cfg = arch_config(name, **kwargs)
  if int(num_classes) <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  return ResNet(int(num_classes), in_channels=int(in_channels), **cfg)


# ----------------------------------------------------------------------------- video


def _conv3d(cin, cout, kernel, stride):
  return nn.Conv3d(
      cin, cout, kernel, stride=stride, padding=tuple((k - 1) // 2 for k in kernel), bias=False
  )


def _conv2plus1d(cin, mid, cout, stride):
  """torchvision's Conv2Plus1D: a Sequential (spatial, BN, ReLU, temporal)."""
  return nn.Sequential(
      _conv3d(cin, mid, (1, 3, 3), (1, stride, stride)),
      nn.BatchNorm3d(mid),
      nn.ReLU(inplace=True),
      _conv3d(mid, cout, (3, 1, 1), (stride, 1, 1)),
  )


class Block2Plus1D(nn.Module):

  def __init__(self, cin, planes, stride, layout):
    super().__init__()
    m1 = mid_channels(cin, planes)
    m2 = m1 if layout == "torchvision" else mid_channels(planes, planes)
    self.conv1 = nn.Sequential(
        _conv2plus1d(cin, m1, planes, stride), nn.BatchNorm3d(planes), nn.ReLU(inplace=True)
    )
    self.conv2 = nn.Sequential(_conv2plus1d(planes, m2, planes, 1), nn.BatchNorm3d(planes))
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or cin != planes:
      self.downsample = nn.Sequential(
          _conv3d(cin, planes, (1, 1, 1), (stride,) * 3), nn.BatchNorm3d(planes)
      )

  def forward(self, x):
    residual = x if self.downsample is None else self.downsample(x)
    return self.relu(self.conv2(self.conv1(x)) + residual)


class R2Plus1D(nn.Module):
  """torchvision's VideoResNet with R(2+1)D blocks (its r2plus1d_18 for the default
  layout); input [batch, channels, time, height, width] as in PyTorch."""

  def __init__(self, num_classes, widths, depths, stem_mid, stem_stride, layout, in_channels=3):
    super().__init__()
    s = stem_stride
    self.stem = nn.Sequential(
        nn.Conv3d(
            in_channels, stem_mid, (1, 7, 7), stride=(1, s, s), padding=(0, 3, 3), bias=False
        ),
        nn.BatchNorm3d(stem_mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(stem_mid, widths[0], (3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(widths[0]),
        nn.ReLU(inplace=True),
    )
    cin = widths[0]
    for i, (w, n) in enumerate(zip(widths, depths)):
      blocks = []
      for j in range(n):
        blocks.append(Block2Plus1D(cin, w, 2 if (i > 0 and j == 0) else 1, layout))
        cin = w
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.num_layers = len(widths)
    self.fc = nn.Linear(cin, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv3d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm3d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)

  def forward(self, x):
    x = self.stem(x)
    for i in range(self.num_layers):
      x = getattr(self, f"layer{i + 1}")(x)
    return self.fc(x.mean(dim=(2, 3, 4)))


def create_torch_video_model(name: str, num_classes: int, *, in_channels: int = 3, **kwargs):
  """Mirror of `bssl.models.video.create_video_model`."""
  cfg = video_arch_config(name, **kwargs)
  return R2Plus1D(int(num_classes), in_channels=int(in_channels), **cfg)
