"""Test set-up: CPU only, 8 fake devices so sharding code runs as on a pod slice."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

# One JAX compilation cache for the session, in this process and in every process a test
# starts (python -m bssl.main, the launcher's workers, sweeps): the tiny recipes compile the
# same train, eval and scoring steps over and over. A cached executable is the one XLA
# would compile again, so no result changes; the cache is fresh for each session (nothing
# carries over from an older checkout) and removed at its end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _jax_cache = tempfile.mkdtemp(prefix="bssl_tests_jax_cache_")
  atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# The file-identity cache (bssl.fileid) of the session, not the user's ~/.cache/bssl.
if "BSSL_CACHE_DIR" not in os.environ:
  _id_cache = tempfile.mkdtemp(prefix="bssl_tests_fileid_")
  atexit.register(shutil.rmtree, _id_cache, ignore_errors=True)
  os.environ["BSSL_CACHE_DIR"] = _id_cache

# Commands the tests start (launch/local.sh, subprocesses) use this interpreter: the
# virtual environment's when run as the README says.
os.environ["PYTHON"] = sys.executable
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/helpers: the GCS emulator, worker scripts and fixtures the test files import.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))

# The `gcs` fixture (a local GCS emulator, one per session) for every test file.
import pytest  # noqa: E402
from gcs_emulator import gcs  # noqa: E402,F401


def pytest_configure(config):
  config.addinivalue_line(
      "markers",
      "slow: minutes on 2 cores, run with BSSL_SLOW_TESTS=1 "
      "(what it checks is also checked, in part, by a faster test)",
  )


def pytest_collection_modifyitems(config, items):
  if os.environ.get("BSSL_SLOW_TESTS"):
    return
  skip = pytest.mark.skip(reason="slow; set BSSL_SLOW_TESTS=1 to run it")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_tiny_run(tmp_path_factory):
  """One run of configs/demo.py:tiny through every default stage, shared by the test files
  (read it, or copy its stages out: never change it)."""
  from bssl import engine
  from bssl.configs import demo

  workdir = str(tmp_path_factory.mktemp("demo_tiny"))
  cfg = demo.get_config("tiny")  # the demo's path: the teacher is the baseline
  engine.run_recipe(cfg, workdir)
  return cfg, workdir
