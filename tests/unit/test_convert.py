"""PyTorch twin <-> Flax conversion: layout of every model, numerical parity, errors, CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bssl import models  # noqa: E402
from bssl.backends import convert  # noqa: E402
from bssl.backends.torch_models import create_torch_model  # noqa: E402
from bssl.cli import convert as convert_cli  # noqa: E402

SMALL_VARIANTS = [
    dict(),
    dict(depths=(2, 2, 2), in_channels=1),
    dict(widths=(8, 16), depths=(1, 2), block="bottleneck", groups=4, width_per_group=8),
]


@pytest.mark.parametrize("name", models.IMAGE_MODEL_NAMES)
def test_layout_matches_twin_without_allocating(name):
  # meta tensors + jax.eval_shape: resnext101_32x48d (828M parameters) costs nothing.
  variants = SMALL_VARIANTS if name == "resnet_small" else [dict()]
  for kw in variants:
    with torch.device("meta"):
      twin = create_torch_model(name, 1000, **kw)
    sd = twin.state_dict()
    lay = convert.check_torch_state_dict(sd, name, **{k: v for k, v in kw.items()})
    keys = [k for k in sd if not k.endswith("num_batches_tracked")]
    assert keys == [e[0] for e in lay]  # same keys, in the twin's order
    assert [tuple(sd[k].shape) for k in keys] == [e[1] for e in lay]
    flax_model = models.create_model(
        name, 1000, **{k: v for k, v in kw.items() if k != "in_channels"}
    )
    c = kw.get("in_channels", 3)
    shapes = jax.eval_shape(
        lambda: flax_model.init(jax.random.key(0), jnp.zeros((1, 32, 32, c)), train=False)
    )
    n_twin = sum(p.numel() for p in twin.parameters())
    assert models.count_params(shapes["params"]) == n_twin
    n_stats = sum(b.numel() for k, b in twin.named_buffers() if "num_batches" not in k)
    assert models.count_params(shapes["batch_stats"]) == n_stats


def randomised_twin(name, seed, **kw):
  """Random twin in eval mode whose BatchNorms are not the identity."""
  torch.manual_seed(seed)
  twin = create_torch_model(name, 10, **kw).eval()
  with torch.no_grad():
    for m in twin.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return twin


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def torch_logits(twin, x_nchw):
  with torch.no_grad():
    return twin(torch.from_numpy(x_nchw)).numpy()


@pytest.mark.parametrize("name", ["resnet_small", "resnet18", "resnet50", "resnext50_32x4d"])
def test_parity_both_directions(name):
  twin = randomised_twin(name, seed=0)
  x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
  ref = torch_logits(twin, x)
  sd = twin.state_dict()

  # torch -> flax: same eval-mode logits (NCHW in torch, NHWC in flax).
  variables = convert.torch_state_dict_to_flax(sd, name)
  flax_model = models.create_model(name, 10)
  apply = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))
  x_nhwc = x.transpose(0, 2, 3, 1)
  assert rel_err(apply(variables, x_nhwc), ref) <= 1e-4

  # Round trip is exact (num_batches_tracked comes back as 0).
  back = convert.flax_to_torch_state_dict(variables, name)
  assert list(back) == list(sd)
  for k, v in sd.items():
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[k], v.numpy())

  # flax -> torch on different weights: perturb every Flax variable, export, compare.
  rng = np.random.RandomState(1)
  moved = jax.tree_util.tree_map(
      lambda a: (a * rng.uniform(0.8, 1.2, a.shape)).astype(np.float32), variables
  )
  fresh = create_torch_model(name, 10).eval()
  fresh.load_state_dict(
      {k: torch.from_numpy(v) for k, v in convert.flax_to_torch_state_dict(moved, name).items()},
      strict=True,
  )
  out = apply(moved, x_nhwc)
  assert rel_err(out, torch_logits(fresh, x)) <= 1e-4
  assert rel_err(out, ref) > 1e-3  # the perturbation did change the network


def test_flax_init_exports_to_torch():
  # A Flax-trained state (here: init + one train-mode BN update) loads into the twin.
  kw = dict(widths=(8, 16), depths=(2, 1))
  m = models.create_model("resnet_small", 10, **kw)
  x = np.random.RandomState(0).randn(4, 16, 16, 1).astype(np.float32)

  @jax.jit
  def run(x):
    # 'rbg' keys: threefry makes XLA:CPU compile this init ~5x slower.
    v = m.init(jax.random.key(0, impl="rbg"), x, train=False)
    _, state = m.apply(v, x, train=True, mutable=["batch_stats"])
    v = {"params": v["params"], **state}
    return v, m.apply(v, x, train=False)

  variables, logits = run(x)
  sd = convert.flax_to_torch_state_dict(variables, "resnet_small", **kw)
  twin = create_torch_model("resnet_small", 10, in_channels=1, **kw).eval()
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  assert rel_err(logits, torch_logits(twin, x.transpose(0, 3, 1, 2))) <= 1e-4


def test_mismatches_are_listed_in_one_error():
  with torch.device("meta"):
    sd = dict(create_torch_model("resnet18", 10).state_dict())
  del sd["layer2.0.downsample.1.running_var"]
  del sd["bn1.bias"]
  sd["layer5.0.conv1.weight"] = torch.empty(3, 3, device="meta")
  sd["layer1.0.conv2.weight"] = torch.empty(64, 32, 3, 3, device="meta")
  with pytest.raises(ValueError) as e:
    convert.check_torch_state_dict(sd, "resnet18")
  msg = str(e.value)
  for s in [
      "missing keys (2)",
      "layer2.0.downsample.1.running_var",
      "bn1.bias",
      "unexpected keys (1): layer5.0.conv1.weight",
      "wrong shapes (1): layer1.0.conv2.weight is (64, 32, 3, 3), expected (64, 64, 3, 3)",
  ]:
    assert s in msg
  # Wrong architecture: every block of resnet50 is reported, nothing converted.
  with pytest.raises(ValueError, match="does not match model 'resnet50'"):
    convert.check_torch_state_dict(sd, "resnet50")
  # num_classes given but different from fc.
  with torch.device("meta"):
    sd = create_torch_model("resnet_small", 10).state_dict()
  with pytest.raises(ValueError, match=r"fc.weight is \(10, 64\), expected \(5, 64\)"):
    convert.check_torch_state_dict(sd, "resnet_small", num_classes=5)
  with pytest.raises(ValueError, match="unknown model 'resnet_tiny'"):
    convert.check_torch_state_dict(sd, "resnet_tiny")
  # DataParallel 'module.' prefix is accepted.
  convert.check_torch_state_dict({"module." + k: v for k, v in sd.items()}, "resnet_small")


def test_flax_side_mismatches():
  m = models.create_model("resnet_small", 10)
  shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))
  v = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  del v["batch_stats"]["layer3_0"]["bn2"]
  v["params"]["layer1_0"]["conv2"]["kernel"] = np.zeros((3, 3, 16, 8), np.float32)
  v["params"]["extra"] = {"kernel": np.zeros(3, np.float32)}
  with pytest.raises(ValueError) as e:
    convert.flax_to_torch_state_dict(v, "resnet_small")
  msg = str(e.value)
  assert "batch_stats/layer3_0/bn2/mean" in msg and "batch_stats/layer3_0/bn2/var" in msg
  assert "unexpected keys (1): params/extra/kernel" in msg
  assert "params/layer1_0/conv2/kernel is (3, 3, 16, 8), expected (3, 3, 16, 16)" in msg


def test_cli_round_trip(tmp_path, capsys):
  kw = {"depths": [1, 2, 1]}
  twin = randomised_twin("resnet_small", seed=3, in_channels=1, **kw)
  sd = twin.state_dict()
  torch.save({"state_dict": sd}, tmp_path / "in.pth")  # training wrapper is unwrapped
  out = tmp_path / "flax"
  assert (
      convert_cli.main(
          [
              f"--from_torch={tmp_path / 'in.pth'}",
              "--model=resnet_small",
              f"--out={out}",
              f"--model_kwargs={json.dumps(kw)}",
          ]
      )
      == 0
  )
  variables = convert.load_converted(str(out))
  assert set(variables) == {"params", "batch_stats"}
  expected = convert.torch_state_dict_to_flax(sd, "resnet_small", **kw)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, expected)
  assert convert.converted_info(str(out))["model"] == "resnet_small"
  with pytest.raises(SystemExit) as e:  # a user error: one line, exit 2
    convert_cli.main(
        [
            f"--from_torch={tmp_path / 'in.pth'}",
            "--model=resnet_small",
            f"--out={out}",
            f"--model_kwargs={json.dumps(kw)}",
        ]
    )
  assert e.value.code == 2 and "already exists" in capsys.readouterr().err

  # Back to torch: model and kwargs default to those recorded in the directory.
  assert convert_cli.main([f"--to_torch={out}", f"--out={tmp_path / 'out.pth'}"]) == 0
  back = torch.load(tmp_path / "out.pth", weights_only=True)
  assert list(back) == list(sd)
  for k in sd:
    if not k.endswith("num_batches_tracked"):
      assert torch.equal(back[k], sd[k]), k

  with pytest.raises(SystemExit) as e:
    convert_cli.main(["--help"])
  assert e.value.code == 0 and "--from_torch" in capsys.readouterr().out


def test_to_torch_reads_a_stage_s_architecture_from_its_work_directory(demo_tiny_run, tmp_path):
  """``--to_torch=<workdir>/<stage>`` (or ``.../final``) needs no --model: the stage's
  model and kwargs are in the work directory's config.json."""
  import subprocess
  import sys

  import torch

  cfg, workdir = demo_tiny_run
  for src in (os.path.join(workdir, "finetune"), os.path.join(workdir, "finetune", "final")):
    out = str(tmp_path / "ft.pth")
    r = subprocess.run(
        [sys.executable, "-m", "bssl.convert", f"--to_torch={src}", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resnet_small" in r.stdout
    sd = torch.load(out)
    assert sd["fc.weight"].shape == (10, cfg.finetune.model_kwargs.widths[-1])
