"""Meshes, shardings and multi-host helpers: the one place that knows about hosts.

Multi-host protocol (set by the launchers in ``launch/``): ``BSSL_DISTRIBUTED=1``
makes :func:`maybe_initialize_distributed` call ``jax.distributed.initialize()``
before anything touches devices. ``BSSL_COORDINATOR_ADDRESS``,
``BSSL_NUM_PROCESSES``, ``BSSL_PROCESS_ID`` and ``BSSL_LOCAL_DEVICE_IDS`` are
passed through when set; otherwise JAX auto-detects the cluster (Cloud TPU
metadata, SLURM environment).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the coordination service's client
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bssl.config.validate import mesh_dims
from bssl.procs import owner, owner_alive, proc_stat, process_start  # noqa: F401

# One random-number implementation everywhere: threefry (jax's default), whose bits are
# a function of the key alone, the same on CPU, GPU and TPU. Partitionable: a sharded
# random array (an fsdp-sharded initialisation) is generated shard by shard with the
# bits the unsharded one has, so a seed gives the same initial model on any mesh. (The
# default of jax 0.10; set here, where every module that initialises or shards imports.)
jax.config.update("jax_threefry_partitionable", True)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)  # mesh_shape (data,) or (data, fsdp)
# Arrays of the train state with fewer elements stay replicated under fsdp (64 KiB in
# float32: BatchNorm vectors, biases, a small classifier head), as big_vision's rule does.
FSDP_MIN_SIZE = 2**14
_initialized = False


def distributed_kwargs_from_env() -> dict[str, Any]:
  """``jax.distributed.initialize`` arguments from the launchers' environment
  (BSSL_COORDINATOR_ADDRESS, BSSL_NUM_PROCESSES, BSSL_PROCESS_ID, BSSL_LOCAL_DEVICE_IDS);
  those not set are left to JAX's own cluster detection (TPU metadata, SLURM)."""
  env = os.environ
  kwargs: dict[str, Any] = {}
  if env.get("BSSL_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = env["BSSL_COORDINATOR_ADDRESS"]
  if env.get("BSSL_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["BSSL_NUM_PROCESSES"])
  if env.get("BSSL_PROCESS_ID"):
    kwargs["process_id"] = int(env["BSSL_PROCESS_ID"])
  if env.get("BSSL_LOCAL_DEVICE_IDS"):
    kwargs["local_device_ids"] = [int(x) for x in env["BSSL_LOCAL_DEVICE_IDS"].split(",")]
  return kwargs


def maybe_initialize_distributed(force: bool = False) -> bool:
  """Initialises jax.distributed when the launcher asks for it. Idempotent."""
  global _initialized
  if _initialized:
    return True
  if not (force or os.environ.get("BSSL_DISTRIBUTED", "") in ("1", "true", "True")):
    return False
  jax.distributed.initialize(**distributed_kwargs_from_env())
  _initialized = True
  return True


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_main_process() -> bool:
  return jax.process_index() == 0


def make_mesh(mesh_shape: Sequence[int] | None = None) -> Mesh:
  """The mesh over all devices of all hosts, built by ``jax.make_mesh`` (device order
  follows the topology): ``()`` or ``(n,)`` one ``data`` axis; ``(data, fsdp)`` two, the
  train state sharded over ``fsdp`` (:func:`state_sharding`), the batch over both.

  ``mesh_shape`` may contain one -1, which takes the remaining devices; a shape the
  devices cannot form is a :class:`bssl.config.ConfigError` (checked before any work by
  :func:`bssl.config.check_batch_sizes`).
  """
  shape = mesh_dims(mesh_shape, jax.device_count())
  return jax.make_mesh(shape, MESH_AXES[: len(shape)], axis_types=(AxisType.Auto,) * len(shape))


def local_mesh() -> Mesh:
  """A one-axis (``"data"``) mesh over this process's own devices: for work that needs no
  collective (scoring, transfer features), so processes never wait for each other."""
  local = jax.local_devices()
  return jax.make_mesh((len(local),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=local)


def fsdp_size(mesh: Mesh) -> int:
  """Devices the train state is sharded over (1: replicated)."""
  return int(dict(mesh.shape).get(FSDP_AXIS, 1))


def fsdp_spec(shape: Sequence[int], size: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """How one array of the train state is laid out over an ``fsdp`` axis of ``size``
  devices (big_vision's ``fsdp`` rule, ZeRO-3): split along its largest dimension that
  ``size`` divides (the later one on a tie); replicated when it has fewer than
  ``min_size`` elements (BatchNorm vectors, biases, a small head) or no dimension fits."""
  if size <= 1 or math.prod(shape) < min_size:
    return P()
  for i in np.argsort(np.asarray(shape), kind="stable")[::-1]:
    if shape[i] % size == 0:
      spec: list[str | None] = [None] * len(shape)
      spec[i] = FSDP_AXIS
      return P(*spec)
  return P()


def state_sharding(mesh: Mesh, tree: Any) -> Any:
  """A ``NamedSharding`` for every array (or ShapeDtypeStruct) of ``tree`` (parameters,
  BatchNorm statistics, optimizer state, gradients): :func:`fsdp_spec` on ``mesh``'s
  ``fsdp`` axis; replicated on a mesh without one. A leaf's layout depends only on its
  shape, so a parameter, its gradient and its momentum are split alike."""
  n = fsdp_size(mesh)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in mesh.axis_names]))


def global_batch_from_local(mesh: Mesh, local: Any) -> Any:
  """Builds global arrays (batch dim sharded) from this process's slice of the batch."""
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, local)


def local_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
  """The per-process share of a global batch; errors name the offending sizes."""
  pc = jax.process_count()
  if global_batch_size % pc:
    raise ValueError(
        f"batch_size {global_batch_size} must be divisible by the number of " f"processes ({pc})"
    )
  if mesh is not None and global_batch_size % num_batch_shards(mesh):
    raise ValueError(
        f"batch_size {global_batch_size} must be divisible by the number of "
        f"devices on the data axis ({num_batch_shards(mesh)})"
    )
  return global_batch_size // pc


def to_host(x: Any) -> Any:
  """Fetches (fully replicated or addressable) arrays to numpy on every process."""

  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)

  return jax.tree.map(get, x)


def sync(name: str) -> None:
  """Barrier across processes (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def log(msg: str) -> None:
  """Prints on process 0 only."""
  if is_main_process():
    print(msg, flush=True)


def local_copy(tree, sharding):
  """``tree`` (arrays replicated on the global mesh, or host arrays) placed with ``sharding``
  on this process's devices: this process's own copy, no collective."""
  return jax.tree.map(
      lambda x: jax.device_put(
          np.asarray(x.addressable_data(0) if hasattr(x, "addressable_data") else x), sharding
      ),
      tree,
  )


def outcome_from_main(key: str, refusal: str | None, failed: bool = False) -> str | None:
  """Process 0's ``refusal`` (None: go on) on every process of the run, through the
  coordination service's key-value store when there is one (the others may wait for long:
  process 0 may be waiting for a work directory's lock, ``--wait_for_lock``), else one
  collective. ``failed``: process 0 hit an error before deciding (the others stop too)."""
  if jax.process_count() == 1:
    return refusal
  client = getattr(jax_distributed.global_state, "client", None)
  if client is None:  # no coordination service (JAX's own cluster set-up): one collective
    ok = multihost_utils.broadcast_one_to_all(np.int32(refusal is None and not failed))
    if is_main_process() or bool(ok):
      return refusal
    return "process 0 of this run could not take the lock of the work directory (see its log)"
  if is_main_process():
    word = "failed" if failed else "ok" if refusal is None else "refused:" + refusal
    client.key_value_set(key, word)
    return refusal
  while True:  # (process 0 may wait for the lock for long: --wait_for_lock)
    try:
      word = client.blocking_key_value_get(key, 60_000)
      break
    except Exception as e:  # the timeout of one wait: wait again
      if "deadline" not in str(e).lower() and "timed out" not in str(e).lower():
        raise
  if word == "ok":
    return None
  if word == "failed":
    return "process 0 of this run failed while taking the lock of the work directory"
  return word.split(":", 1)[1]
