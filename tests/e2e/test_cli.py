"""Every command's user errors are one line on stderr, exit code 2, no traceback (the
bad-input cases of bssl.convert and bssl.compare here; bssl.main, bssl.sweep and
bssl.ingest have theirs in test_pipeline.py, test_sweep.py and test_ingest.py)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one_line_exit_2(code, err, want):
  assert code == 2, err
  assert want in err and "Traceback" not in err, err
  assert len(err.strip().splitlines()) == 1, err


def test_convert_user_errors(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from bssl.backends.torch_models import create_torch_model
  from bssl.cli import convert

  sd = create_torch_model("resnet_small", 10, in_channels=1).state_dict()
  missing = {k: v for k, v in sd.items() if "layer2" not in k}
  torch.save(missing, tmp_path / "missing.pth")
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  torch.save([1, 2, 3], tmp_path / "list.pth")
  os.makedirs(tmp_path / "exists")
  cases = [
      (
          [
              "--from_torch",
              str(tmp_path / "missing.pth"),
              "--model=resnet_small",
              f"--out={tmp_path / 'o1'}",
          ],
          "missing keys",
      ),
      (
          [
              "--from_torch",
              str(tmp_path / "nope.pth"),
              "--model=resnet50",
              f"--out={tmp_path / 'o2'}",
          ],
          "is not a file",
      ),
      (
          [
              "--from_torch",
              str(tmp_path / "junk.pth"),
              "--model=resnet50",
              f"--out={tmp_path / 'o3'}",
          ],
          "is not a PyTorch checkpoint",
      ),
      (
          [
              "--from_torch",
              str(tmp_path / "list.pth"),
              "--model=resnet50",
              f"--out={tmp_path / 'o4'}",
          ],
          "expected a state_dict",
      ),
      (
          [
              "--from_torch",
              str(tmp_path / "missing.pth"),
              "--model=resnet51",
              f"--out={tmp_path / 'o5'}",
          ],
          "unknown architecture 'resnet51'",
      ),
      (
          [
              "--from_torch",
              str(tmp_path / "missing.pth"),
              "--model=resnet_small",
              "--model_kwargs={depths",
              f"--out={tmp_path / 'o6'}",
          ],
          "--model_kwargs: not JSON",
      ),
      (
          ["--from_torch", str(tmp_path / "missing.pth"), f"--out={tmp_path / 'o7'}"],
          "--model is required",
      ),
      (
          [
              "--to_torch",
              str(tmp_path / "nodir"),
              f"--out={tmp_path / 'x.pth'}",
              "--model=resnet50",
          ],
          "does not exist",
      ),
      (["--out=x"], "one of the arguments --from_torch --to_torch is required"),
  ]
  for args, want in cases:
    with pytest.raises(SystemExit) as e:
      convert.main(args)
    _one_line_exit_2(e.value.code, capsys.readouterr().err, want)
  assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


@pytest.mark.parametrize(
    "args,want",
    [
        ([], "--config is required"),
        (["--config=configs/demo.py:compare"], "--workdir is required"),
        (
            ["--config=configs/demo.py:compare", "--workdir=W", "--seeds=0,x"],
            "--seeds must be integers",
        ),
        (
            ["--config=configs/demo.py:compare", "--workdir=W", "--frameworks=jax,tf"],
            "--frameworks: tf not accepted",
        ),
        (["--config=configs/demo.py:nope", "--workdir=W"], "nope"),
        (["--config=configs/demo.py:compare", "--workdir=W", "--config.select.kk=3"], "kk"),
    ],
)
def test_compare_user_errors(tmp_path, args, want):
  args = [a.replace("=W", f"={tmp_path / 'w'}") for a in args]
  r = subprocess.run(
      [sys.executable, "-m", "bssl.compare", *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  _one_line_exit_2(r.returncode, r.stderr, want)
  assert not (tmp_path / "w").exists()


def test_packaged_config_is_found_from_another_folder(tmp_path):
  """``--config=demo:tiny`` from a folder with no configs/ finds the packaged one (the
  check stops at the missing --workdir, before any work)."""
  r = subprocess.run(
      [sys.executable, "-m", "bssl.main", "--config=demo:tiny"],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      timeout=120,
      env=dict(os.environ, PYTHONPATH=ROOT),
  )
  _one_line_exit_2(r.returncode, r.stderr, "--workdir is required")
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "bssl.main",
          "--config=configs/nope.py",
          f"--workdir={tmp_path / 'w'}",
      ],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      timeout=120,
      env=dict(os.environ, PYTHONPATH=ROOT),
  )
  _one_line_exit_2(r.returncode, r.stderr, "nope.py")


def test_console_commands_of_the_installed_package(tmp_path):
  """After ``setup.sh`` (bssl installed in the venv): every console command runs from any
  folder and its user errors are one line, exit 2."""
  import shutil

  bindir = os.path.dirname(sys.executable)
  found = {
      c: shutil.which(c, path=bindir)
      for c in ("bssl", "bssl-sweep", "bssl-ingest", "bssl-compare", "bssl-convert", "bssl-reshard")
  }
  if not all(found.values()):
    pytest.skip(f"bssl is not installed next to {sys.executable} (run setup.sh)")
  for cmd, args, want in (
      ("bssl", ["--config=demo:tiny"], "--workdir is required"),
      ("bssl-sweep", ["--config=demo:tiny", f"--workdir={tmp_path}/s"], "--sweep is required"),
      ("bssl-ingest", [f"--input={tmp_path}/nope", f"--out={tmp_path}/o"], "does not exist"),
      ("bssl-compare", ["--config=demo:compare"], "--workdir is required"),
      (
          "bssl-convert",
          ["--to_torch", f"{tmp_path}/nope", "--out=x.pth", "--model=resnet18"],
          "does not exist",
      ),
      ("bssl-reshard", [f"--workdir={tmp_path}/nope", "--out=o"], "no complete selection"),
      ("bssl-reshard", ["--out=o"], "--workdir"),
  ):
    r = subprocess.run(
        [found[cmd], *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    _one_line_exit_2(r.returncode, r.stderr, want)
