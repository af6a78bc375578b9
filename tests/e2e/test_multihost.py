"""2 processes x 2 fake CPU devices (gloo collectives on loopback) train and score
exactly like 1 process x 4 devices; each process scores its own chunks of U."""

import json
import os
import subprocess
import sys

import numpy as np

from bssl import selection

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HELPERS = os.path.join(ROOT, "tests", "helpers")
WORKER = os.path.join(HELPERS, "multihost_worker.py")


def _env(devices):
  env = {k: v for k, v in os.environ.items() if not k.startswith("BSSL_")}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def test_two_hosts_equal_one_host(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  ref = subprocess.Popen(
      [sys.executable, WORKER, one],
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  multi = subprocess.run(
      [
          "bash",
          os.path.join(ROOT, "launch", "local.sh"),
          "--num_processes",
          "2",
          "--devices_per_process",
          "2",
          "--log_dir",
          str(tmp_path / "logs"),
          "--python_script",
          WORKER,
          "--",
          two,
      ],
      env=_env(2),
      capture_output=True,
      text=True,
      timeout=600,
  )
  ref_out = ref.communicate(timeout=600)[0]
  assert ref.returncode == 0, ref_out[-3000:]
  logs = "".join(
      open(os.path.join(tmp_path, "logs", f)).read()[-2000:]
      for f in sorted(os.listdir(tmp_path / "logs"))
  )
  assert multi.returncode == 0, multi.stdout[-2000:] + multi.stderr[-2000:] + logs
  assert "MULTIHOST_DONE 2 90" in multi.stdout + logs
  assert "MULTIHOST_DONE 1 90" in ref_out

  # Training: same parameters to float32 tolerance (only the reduction order differs).
  with np.load(os.path.join(one, "params.npz")) as a, np.load(os.path.join(two, "params.npz")) as b:
    assert a.files == b.files
    for k in a.files:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
  # Selection: D̂ identical element for element.
  s1 = selection.read_selection(os.path.join(one, "dhat"))
  s2 = selection.read_selection(os.path.join(two, "dhat"))
  for f in ("ids", "classes", "scores", "ranks"):
    np.testing.assert_array_equal(np.asarray(getattr(s1, f)), np.asarray(getattr(s2, f)))
  # Each process scored its own chunks of U (chunks i::2), and only those.
  parts = os.path.join(two, "score", "parts")
  metas = [json.load(open(os.path.join(parts, f"g0001_p{i:05d}.json"))) for i in range(2)]
  assert [m["ranges"] for m in metas] == [[[0, 32], [64, 90]], [[32, 64]]]
  assert [m["num_scored"] for m in metas] == [58, 32]
  assert "SCORED 0 58" in multi.stdout + logs and "SCORED 1 32" in logs
  assert "SCORED 0 90" in ref_out
