"""The engine's backends, behind one declared contract (:mod:`bssl.backends.base`).

``create(name, cfg, **options)`` builds the backend a run names: ``"jax"``
(:mod:`bssl.backends.jax`, the default) or ``"torch"`` (:mod:`bssl.backends.torch`,
imported only here, when asked for: importing this package never imports PyTorch).
"""

from __future__ import annotations

from bssl import config
from bssl.backends.base import Backend
from bssl.backends.jax import JaxBackend

NAMES = ("jax", "torch")


def create(name: str, cfg, **options) -> Backend:
  """The backend called ``name``, built for ``cfg`` (the engine passes a
  :class:`bssl.deps.Tracked` view) with its own ``options`` (the PyTorch backend:
  ``threads``)."""
  if name == "jax":
    return JaxBackend(cfg, **options)
  if name == "torch":
    from bssl.backends import torch as torch_backend  # PyTorch: heavy and optional

    return torch_backend.TorchBackend(cfg, **options)
  raise config.ConfigError(f"unknown backend {name!r}; one of {', '.join(NAMES)}")
