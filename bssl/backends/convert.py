"""PyTorch (torchvision layout) <-> Flax weight conversion for the bssl model family.

The mapping is mechanical because `bssl.models` names its modules after torchvision's:

  layer2.0.downsample.0.weight [O, I/groups, kh, kw]  <->  params/layer2_0/downsample_conv/kernel [kh, kw, I/groups, O]
  layer2.0.bn1.weight / .bias                          <->  params/layer2_0/bn1/scale / bias
  layer2.0.bn1.running_mean / running_var              <->  batch_stats/layer2_0/bn1/mean / var
  fc.weight [classes, features]                        <->  params/fc/kernel [features, classes]

`num_batches_tracked` is ignored on import and written as 0 on export. The expected
structure comes from `jax.eval_shape` of the Flax model, so checking a checkpoint
allocates nothing; every missing key, unexpected key and wrong shape is reported in
one ValueError before any array is copied.

The command line is ``bssl-convert`` (bssl/cli/convert.py). Its output DIR is an orbax
StandardCheckpointer checkpoint of {'params', 'batch_stats'}; `load_converted(DIR)` reads
it back (e.g. as a teacher/student initialisation).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bssl import config, models
from bssl.models import video as video_models

INFO_FILE = "bssl_convert.json"  # written next to the orbax files: model name and kwargs
_BN_TORCH = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_SUB_ORDER = ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn"]
_LEAF_ORDER = ["kernel", "scale", "bias", "mean", "var"]


# R(2+1)D (bssl/models/video.py): torchvision's VideoResNet names.
_VIDEO_SUB_ORDER = [
    "conv1_spatial",
    "conv1_mid_bn",
    "conv1_temporal",
    "bn1",
    "conv2_spatial",
    "conv2_mid_bn",
    "conv2_temporal",
    "bn2",
    "downsample_conv",
    "downsample_bn",
]
_VIDEO_TORCH = {
    "stem_spatial": "stem.0",
    "stem_bn1": "stem.1",
    "stem_temporal": "stem.3",
    "stem_bn2": "stem.4",
    "conv1_spatial": "conv1.0.0",
    "conv1_mid_bn": "conv1.0.1",
    "conv1_temporal": "conv1.0.3",
    "bn1": "conv1.1",
    "conv2_spatial": "conv2.0.0",
    "conv2_mid_bn": "conv2.0.1",
    "conv2_temporal": "conv2.0.3",
    "bn2": "conv2.1",
}


def _module_sort_key(name: str):
  m = re.fullmatch(r"layer(\d+)_(\d+)", name)
  if m:
    return (1, int(m.group(1)), int(m.group(2)), "")
  return {
      "conv1": (0, 0, 0, ""),
      "bn1": (0, 1, 0, ""),
      "stem_spatial": (0, 0, 0, ""),
      "stem_bn1": (0, 1, 0, ""),
      "stem_temporal": (0, 2, 0, ""),
      "stem_bn2": (0, 3, 0, ""),
      "fc": (2, 0, 0, ""),
  }.get(name, (3, 0, 0, name))


def _torch_module(path: tuple[str, ...], video: bool = False) -> str:
  parts = []
  for p in path:
    m = re.fullmatch(r"layer(\d+)_(\d+)", p)
    if m:
      parts.append(f"layer{m.group(1)}.{m.group(2)}")
    else:
      names = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
      if video:
        names.update(_VIDEO_TORCH)
      parts.append(names.get(p, p))
  return ".".join(parts)


def layout(model_name: str, num_classes: int, in_channels: int = 3, **kwargs):
  """The mapping for one architecture, in torchvision's state_dict order.

  Returns a list of (torch_key, torch_shape, collection, flax_path, kind) with kind
  'conv' (OIHW <-> HWIO), 'dense' (transpose) or 'copy'. Built from jax.eval_shape,
  so it costs nothing even for resnext101_32x48d.
  """
  video = models.is_video_model(model_name)
  if video:
    model = video_models.create_video_model(model_name, num_classes, **kwargs)
    x = jnp.zeros((1, 4, 32, 32, in_channels), jnp.float32)
  else:
    model = models.create_model(model_name, num_classes, **kwargs)
    x = jnp.zeros((1, 32, 32, in_channels), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  sub_order = _VIDEO_SUB_ORDER if video else _SUB_ORDER
  entries = []
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(shapes[collection])[0]
    for keypath, leaf in flat:
      path = tuple(k.key for k in keypath)
      module, leafname = path[:-1], path[-1]
      shape = tuple(leaf.shape)
      if leafname == "kernel" and len(shape) == 5:  # THWIO <-> OITHW
        kind, tshape, tleaf = "conv3d", (shape[4], shape[3], shape[0], shape[1], shape[2]), "weight"
      elif leafname == "kernel" and len(shape) == 4:
        kind, tshape, tleaf = "conv", (shape[3], shape[2], shape[0], shape[1]), "weight"
      elif leafname == "kernel":
        kind, tshape, tleaf = "dense", shape[::-1], "weight"
      else:
        kind, tshape, tleaf = "copy", shape, _BN_TORCH.get(leafname, leafname)
      order = (
          _module_sort_key(module[0]),
          [sub_order.index(p) if p in sub_order else 99 for p in module[1:]],
          _LEAF_ORDER.index(leafname),
      )
      entries.append(
          (order, (f"{_torch_module(module, video)}.{tleaf}", tshape, collection, path, kind))
      )
  return [e for _, e in sorted(entries, key=lambda e: e[0])]


def _infer(state_shapes: Mapping[str, tuple], num_classes, kwargs):
  """num_classes from fc.weight and in_channels from conv1.weight when not given."""
  if num_classes is None:
    if "fc.weight" not in state_shapes or len(state_shapes["fc.weight"]) != 2:
      raise ValueError("num_classes not given and no 2-d 'fc.weight' to infer it from")
    num_classes = state_shapes["fc.weight"][0]
  in_channels = kwargs.pop("in_channels", None)
  if in_channels is None:
    w = state_shapes.get("conv1.weight", state_shapes.get("stem.0.weight"))
    in_channels = w[1] if w is not None and len(w) in (4, 5) else 3
  return int(num_classes), int(in_channels)


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops a 'module.' (DataParallel/DDP) prefix shared by every key."""
  keys = list(state_dict)
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module.") :]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _report(model_name, missing, unexpected, wrong):
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
  if wrong:
    problems.append(
        f"wrong shapes ({len(wrong)}): "
        + ", ".join(f"{k} is {tuple(got)}, expected {tuple(exp)}" for k, got, exp in wrong)
    )
  if problems:
    raise ValueError(f"state_dict does not match model {model_name!r}:\n  " + "\n  ".join(problems))


def check_torch_state_dict(state_dict, model_name: str, num_classes=None, **kwargs):
  """Validates keys and shapes only (works on torch 'meta' tensors); returns the layout."""
  state_dict = _strip_prefix(state_dict)
  shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
  num_classes, in_channels = _infer(shapes, num_classes, dict(kwargs))
  kwargs.pop("in_channels", None)
  lay = layout(model_name, num_classes, in_channels, **kwargs)
  expected = {key: tshape for key, tshape, *_ in lay}
  missing = [k for k in expected if k not in shapes]
  unexpected = [k for k in shapes if k not in expected and not k.endswith("num_batches_tracked")]
  wrong = [
      (k, shapes[k], expected[k]) for k in expected if k in shapes and shapes[k] != expected[k]
  ]
  _report(model_name, missing, unexpected, wrong)
  return lay


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # torch.Tensor (bfloat16 has no numpy dtype: go through float32)
    v = v.detach().cpu()
    if v.is_floating_point():
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def _set(tree: dict, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def torch_state_dict_to_flax(state_dict, model_name: str, num_classes=None, **kwargs):
  """torchvision-layout state_dict (tensors or arrays) -> {'params', 'batch_stats'} of
  float32 numpy arrays. num_classes / in_channels are read off fc / conv1 when omitted;
  kwargs are the model's (e.g. widths/depths for 'resnet_small')."""
  state_dict = _strip_prefix(state_dict)
  lay = check_torch_state_dict(state_dict, model_name, num_classes, **kwargs)
  out = {"params": {}, "batch_stats": {}}
  for key, _, collection, path, kind in lay:
    v = _to_numpy(state_dict[key]).astype(np.float32)
    if kind == "conv":
      v = v.transpose(2, 3, 1, 0)
    elif kind == "conv3d":
      v = v.transpose(2, 3, 4, 1, 0)
    elif kind == "dense":
      v = v.T
    _set(out[collection], path, np.ascontiguousarray(v))
  return out


def flax_to_torch_state_dict(variables, model_name: str, num_classes=None, **kwargs):
  """{'params', 'batch_stats'} -> torchvision-layout dict of numpy arrays, in the twin's
  state_dict order, `num_batches_tracked` included (int64 0) so that
  `model.load_state_dict({k: torch.from_numpy(v) ...})` works with strict=True."""
  flat = {}
  for collection in ("params", "batch_stats"):
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
      flat[(collection,) + tuple(getattr(k, "key", str(k)) for k in keypath)] = leaf
  shapes = {"/".join(k): tuple(np.shape(v)) for k, v in flat.items()}
  fc = shapes.get("params/fc/kernel")
  conv1 = shapes.get("params/conv1/kernel", shapes.get("params/stem_spatial/kernel"))
  if num_classes is None:
    if fc is None or len(fc) != 2:
      raise ValueError("num_classes not given and no 2-d params/fc/kernel to infer it from")
    num_classes = fc[1]
  in_channels = kwargs.pop("in_channels", None)
  if in_channels is None:
    in_channels = conv1[-2] if conv1 is not None and len(conv1) in (4, 5) else 3
  lay = layout(model_name, int(num_classes), int(in_channels), **kwargs)
  expected = {}
  for _key, tshape, collection, path, kind in lay:
    fshape = {
        "conv": lambda s: (s[2], s[3], s[1], s[0]),
        "conv3d": lambda s: (s[2], s[3], s[4], s[1], s[0]),
        "dense": lambda s: s[::-1],
    }.get(kind, lambda s: s)(tshape)
    expected["/".join((collection,) + path)] = tuple(fshape)
  missing = [k for k in expected if k not in shapes]
  unexpected = [k for k in shapes if k not in expected]
  wrong = [
      (k, shapes[k], expected[k]) for k in expected if k in shapes and shapes[k] != expected[k]
  ]
  _report(model_name, missing, unexpected, wrong)
  out = {}
  for key, _, collection, path, kind in lay:
    # a copy: on CPU device_get may alias the device buffer, which a donating step reuses
    v = np.array(jax.device_get(flat[(collection,) + path]), dtype=np.float32, copy=True)
    if kind == "conv":
      v = v.transpose(3, 2, 0, 1)
    elif kind == "conv3d":
      v = v.transpose(4, 3, 0, 1, 2)
    elif kind == "dense":
      v = v.T
    out[key] = np.array(v, np.float32, order="C")  # a writable copy (torch.from_numpy)
    if key.endswith(".running_var"):
      out[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
  return out


# ----------------------------------------------------------------------------- files


def load_torch_checkpoint(path):
  """A PyTorch checkpoint file's state_dict (unwrapped from a training checkpoint)."""
  import torch

  if not os.path.isfile(path):
    raise FileNotFoundError(f"--from_torch: {path} is not a file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(
        f"--from_torch: {path} is not a PyTorch checkpoint torch.load can "
        f"read ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
    ) from None
  for wrapper in ("state_dict", "model_state_dict", "model"):  # common training wrappers
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state_dict")
  return obj


def save_converted(variables, out_dir: str, info: dict | None = None):
  """Writes {'params', 'batch_stats'} as an orbax StandardCheckpointer checkpoint at
  out_dir (which must not exist), plus a small JSON of how it was made."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise ValueError(f"--out {out_dir} already exists; give a new directory")
  tree = {c: variables[c] for c in ("params", "batch_stats")}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out_dir, tree)
    ckptr.wait_until_finished()
  if info is not None:
    with open(os.path.join(out_dir, INFO_FILE), "w") as f:
      json.dump(info, f, indent=1)


def load_converted(ckpt_dir: str):
  """Reads a `save_converted` / `--from_torch` checkpoint -> {'params', 'batch_stats'}
  of numpy arrays (place/shard them as the caller needs)."""
  ckpt_dir = os.path.abspath(ckpt_dir)
  if not os.path.isdir(ckpt_dir):
    raise ValueError(f"converted checkpoint {ckpt_dir} does not exist")
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(ckpt_dir)
    tree = getattr(meta, "item_metadata", meta)
    target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), tree)
    restored = ckptr.restore(ckpt_dir, target)
  return jax.tree_util.tree_map(np.asarray, dict(restored))


def converted_info(ckpt_dir: str) -> dict:
  """What a checkpoint folder says of its architecture: the ``bssl_convert.json`` this
  command writes or, for a stage's variables in a work directory (``<workdir>/<stage>/
  final`` or ``<workdir>/<stage>``), the stage's model and kwargs in ``config.json``."""
  d = os.path.abspath(ckpt_dir)
  path = os.path.join(d, INFO_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  if os.path.basename(d) != "final" and os.path.isdir(os.path.join(d, "final")):
    d = os.path.join(d, "final")
  stage_dir = os.path.dirname(d)
  cfg_path = os.path.join(os.path.dirname(stage_dir), "config.json")
  if os.path.basename(d) == "final" and os.path.exists(cfg_path):
    with open(cfg_path) as f:
      cfg = json.load(f)
    section = cfg.get(config.section_of(os.path.basename(stage_dir)))
    if isinstance(section, dict) and section.get("model"):
      return {
          "model": section["model"],
          "model_kwargs": section.get("model_kwargs") or {},
          "variables": d,
      }
  return {}
