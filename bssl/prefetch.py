"""One way to the device: batches are read and put on the device by a thread, ahead of the
step that uses them, for training (:func:`bssl.train.fit`), evaluation
(:func:`bssl.evaluation.evaluate`) and scoring (:func:`bssl.scoring.score_process`).

:class:`Ahead` runs any ``put`` (a host->device copy) on the items of an iterator, up to
``depth`` items ahead of the consumer, as big_vision's ``threadstart_iterator`` over
``prefetch_iterator`` and flax's ``prefetch_to_device`` do; :func:`global_batches` is the
JAX put: this process's share of each global batch, made one global array with the batch
sharding (``jax.make_array_from_process_local_data``, no collective). The copies are
explicit and every step the loops dispatch runs under :func:`no_implicit_transfers`
(``jax.transfer_guard("disallow")``): an input that is not already on the device, or not
where the step wants it, is an error, never a hidden copy.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from bssl import parallel

_END = object()


def no_implicit_transfers():
  """The context the loops dispatch their steps in: implicit host<->device and
  device<->device copies are errors (explicit ``device_put``/``device_get`` are not)."""
  return jax.transfer_guard("disallow")


class Ahead:
  """Iterates ``(item, put(item))`` for the items of ``items``, read and put by a thread
  running up to ``depth`` items ahead (``put`` None: the item itself). Errors of the
  thread are raised in the consumer; :meth:`close` (or leaving the ``with`` block, or the
  end of the items) stops the thread. ``items`` is read in the thread only."""

  def __init__(
      self,
      items: Iterable,
      put: Callable[[Any], Any] | None,
      depth: int = 2,
      name: str = "bssl-prefetch",
  ):
    self._q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    self._stop = threading.Event()
    self._done = False
    # the thread holds the queue and the flag, not this object: dropped unclosed, it stops
    self._thread = threading.Thread(
        target=_produce, args=(items, put, self._q, self._stop), name=name, daemon=True
    )
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._q.get()
    if item is _END:
      self.close()
      raise StopIteration
    if isinstance(item, BaseException):
      self.close()
      raise item
    return item

  def close(self) -> None:
    """Stops the thread (it may be waiting for its next item: at most 10 s)."""
    self._done = True
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=10)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    self._stop.set()


def _offer(q: queue.Queue, stop: threading.Event, item) -> bool:
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _produce(items, put, q: queue.Queue, stop: threading.Event) -> None:
  try:
    for item in items:
      if stop.is_set() or not _offer(q, stop, (item, put(item) if put else item)):
        return
    _offer(q, stop, _END)
  except BaseException as e:  # handed to the consumer
    _offer(q, stop, e)


def global_batches(batches: Iterable[dict], mesh, keys: Sequence[str], depth: int = 2) -> Ahead:
  """``(host batch, global batch)`` for each of this process's local batches (dicts of
  numpy arrays): the global batch holds ``keys``, the batch dimension sharded over every
  axis of ``mesh`` (:func:`bssl.parallel.global_batch_from_local`), put ``depth`` batches
  ahead by a thread while the current step runs."""

  def put(batch):
    return parallel.global_batch_from_local(mesh, {k: batch[k] for k in keys})

  return Ahead(batches, put, depth, name="bssl-prefetch-global")
