"""Transfer learning (the paper's CUB-2011 table): frozen features + multinomial logistic
regression (fc-only), and the pieces full fine-tuning needs.

fc-only: features are the global-pooled penultimate layer of the model; they are
standardised with the train split's mean/std; a multinomial logistic regression with L2
(``lam/2 * ||W||^2``, no penalty on the bias) is fit full-batch with L-BFGS (optax), for
each ``lam`` of a grid; the one with the best validation accuracy (ties: the larger) is
refit on train + validation and measured on the test split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bssl import parallel, prefetch
from bssl.data import pipelines
from bssl.train import normalize

LAMBDAS = tuple(10.0**e for e in range(-6, 2))


def features(
    model, variables, source, spec: pipelines.ImageSpec, mean, std, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, D] float32, labels [N]) of every record of ``source``, on this
  process's own devices (small target sets: every process computes all of them)."""
  local = parallel.local_mesh()
  shard = NamedSharding(local, P(parallel.DATA_AXIS))
  repl = NamedSharding(local, P())
  v = parallel.local_copy(variables, repl)
  nd = len(local.devices.reshape(-1))
  bs = max(nd, batch_size // nd * nd)
  f = jax.jit(
      lambda v, x: model.apply(v, normalize(x, mean, std), train=False, features=True),
      out_shardings=shard,
  )
  feats, labels = [], []
  ds = pipelines.eval_dataset(source, spec, local_batch_size=bs)
  # (bssl.prefetch, as training, evaluation and scoring: each batch put ahead of its step)
  with prefetch.Ahead(ds, lambda b: jax.device_put(b["image"], shard)) as batches:
    for batch, images in batches:
      with prefetch.no_implicit_transfers():
        out = f(v, images)
      m = batch["mask"].astype(bool)
      feats.append(np.asarray(jax.device_get(out))[m])
      labels.append(batch["label"][m])
  return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int32)


def _loss(p, x, y, lam):
  w, b = p
  return optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean() + 0.5 * lam * jnp.sum(
      w * w
  )


@functools.partial(jax.jit, static_argnames=("num_classes", "iterations"))
def _lbfgs(x, y, lam, *, num_classes: int, iterations: int):
  """L-BFGS (optax, zoom line search) from zeros; one compilation per data shape, any lam."""
  params = (
      jnp.zeros((x.shape[1], num_classes), jnp.float32),
      jnp.zeros((num_classes,), jnp.float32),
  )
  loss = functools.partial(_loss, x=x, y=y, lam=lam)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def body(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(p, updates), state), value

  (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=iterations)
  return p


def fit_logistic(
    x: np.ndarray, y: np.ndarray, num_classes: int, lam: float, iterations: int = 300
) -> tuple[np.ndarray, np.ndarray]:
  """(W [D, C], b [C]) minimising mean softmax cross-entropy + lam/2 ||W||^2 (L-BFGS)."""
  w, b = _lbfgs(
      jnp.asarray(x, jnp.float32),
      jnp.asarray(y, jnp.int32),
      jnp.float32(lam),
      num_classes=int(num_classes),
      iterations=int(iterations),
  )
  return np.asarray(w), np.asarray(b)


def accuracy(x, y, w, b) -> float:
  return float(np.mean(np.argmax(x @ w + b, axis=1) == y))


def fc_only(train_xy, val_xy, test_xy, num_classes: int, lambdas=LAMBDAS) -> dict:
  """fc-only transfer from features: lam chosen on validation, refit on train + val,
  test accuracy; also the validation accuracy of every lam."""
  (xt, yt), (xv, yv), (xs, ys) = train_xy, val_xy, test_xy
  mu, sd = xt.mean(0), xt.std(0) + 1e-6
  z = lambda a: (a - mu) / sd
  val = {}
  for lam in lambdas:
    w, b = fit_logistic(z(xt), yt, num_classes, lam)
    val[lam] = accuracy(z(xv), yv, w, b)
  best = max(lambdas, key=lambda lam: (val[lam], lam))
  xa, ya = np.concatenate([xt, xv]), np.concatenate([yt, yv])
  mu, sd = xa.mean(0), xa.std(0) + 1e-6
  w, b = fit_logistic(z(xa), ya, num_classes, best)
  return {
      "top1": accuracy(z(xs), ys, w, b),
      "lambda": best,
      "val_top1": val[best],
      "val_top1_by_lambda": {f"{lam:g}": a for lam, a in val.items()},
      "num_train": int(len(yt)),
      "num_val": int(len(yv)),
      "num_test": int(len(ys)),
      "feature_dim": int(xt.shape[1]),
  }
