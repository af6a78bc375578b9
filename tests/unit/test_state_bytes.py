"""``python -m bssl.cli.state_bytes``: bytes of train state per device from abstract shapes
(issue 31: the paper's teacher, ResNeXt-101 32x48d, sharded over fsdp=8 holds at most 1/8
of its replicated state plus the arrays left replicated)."""

from __future__ import annotations

from bssl.cli import state_bytes


def test_resnext101_32x48d_under_fsdp8_is_an_eighth_plus_the_unsharded_remainder(capsys):
  r = state_bytes.state_bytes("resnext101_32x48d", (1, 8))
  assert 828e6 < r["params"] < 829e6
  repl, f8 = r["fsdp"][1], r["fsdp"][8]
  # weights + momentum + gradients, float32: ~3 x 3.3 GB replicated (+ BatchNorm statistics)
  assert 9.9e9 < repl["total"] < 10.0e9
  assert repl["unsharded"] == repl["total"]  # (nothing is split on a one-axis mesh)
  assert f8["total"] <= repl["total"] / 8 + f8["unsharded"]
  assert f8["unsharded"] < 0.02 * f8["total"]  # only small arrays stay replicated
  assert f8["total"] < 16e9 / 8  # fits a 16-GB chip (TPU v5e) with room for activations
  assert state_bytes.main(["--models=resnet_small", "--fsdp=1,8"]) == 0
  out = capsys.readouterr().out
  assert "| resnet_small | 0.1M |" in out and "fsdp=8" in out
