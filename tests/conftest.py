"""Test set-up: CPU only, 8 fake devices so sharding code runs as on a pod slice."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
CONFIGS = os.path.join(ROOT, "configs")
if CONFIGS not in sys.path:
  sys.path.insert(0, CONFIGS)

# The `gcs` fixture (a local GCS emulator, one per session) for every test file.
from gcs_emulator import gcs  # noqa: E402,F401
