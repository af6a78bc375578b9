"""Measuring a model on a split: top-1, top-5 and loss over every example exactly once,
on the device mesh (every process reads its share; padded batches are masked). A batch of
videos (``image`` [B, N, T, H, W, C]: N clips each) is measured at the video level, by the
mean of its clips' softmax (:func:`bssl.ranking.video_level_probs`, the paper's 10-clip
evaluation). Used by the stages' validation and test measurements and by transfer's
fine-tuning (:mod:`bssl.backends.jax`)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bssl import parallel, prefetch, ranking, train
from bssl.data import pipelines
from bssl.data.sources import DataError


def video_probs(model, variables, videos, mean, std) -> jax.Array:
  """Video-level class probabilities of ``videos`` uint8 [B, N, T, H, W, C]: the mean of
  the N clips' softmax (the paper's 10-clip evaluation), on the device."""
  return ranking.video_level_probs(
      lambda clip: model.apply(variables, train.normalize(clip, mean, std), train=False), videos
  )


def make_eval_step(model, mesh, *, num_classes: int, mean, std) -> Callable:
  """``eval_step(variables, batch, totals=None) -> sums`` of correct top-1/top-5, loss and
  count over the masked batch; with ``totals`` (donated), ``totals`` plus those sums: the
  evaluation's running sums stay on the device, one dispatch per batch. A batch of videos
  (``image`` [B, N, T, H, W, C]: N clips each) is measured at the video level: top-k and
  loss of the mean of its clips' softmax."""
  k5 = min(5, num_classes)

  def eval_step(variables, batch, totals=None):
    if ranking.is_clip_batch(batch["image"]):  # videos: log of the clip-averaged softmax
      logits = jnp.log(jnp.maximum(video_probs(model, variables, batch["image"], mean, std), 1e-30))
    else:
      logits = model.apply(variables, train.normalize(batch["image"], mean, std), train=False)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    top5 = jax.lax.top_k(logits, k5)[1]
    correct5 = jnp.any(top5 == labels[:, None], axis=-1)
    correct1 = top5[:, 0] == labels
    loss = train.cross_entropy(logits, jnp.maximum(labels, 0), num_classes, 0.0)
    sums = {
        "top1": jnp.sum(correct1 * mask),
        "top5": jnp.sum(correct5 * mask),
        "loss": jnp.sum(loss * mask),
        "count": jnp.sum(mask),
    }
    return sums if totals is None else jax.tree.map(jnp.add, totals, sums)

  return jax.jit(eval_step, out_shardings=parallel.replicated(mesh), donate_argnames=("totals",))


def zero_totals(mesh) -> dict:
  """The running sums of :func:`make_eval_step` before the first batch, on the device
  (replicated on ``mesh``, as the step returns them)."""
  zeros = {k: np.zeros((), np.float32) for k in ("top1", "top5", "loss", "count")}
  return jax.device_put(zeros, parallel.replicated(mesh))


def evaluate(
    eval_step,
    variables,
    source,
    spec: pipelines.ImageSpec,
    mesh,
    *,
    global_batch_size: int,
    num_threads: int = 1,
) -> dict:
  """top1/top5/loss over every example of ``source`` exactly once. Batches are put on the
  device ahead of their step (:mod:`bssl.prefetch`); the sums stay on the device until
  the end (one fetch); every batch is padded to the same shape (one compilation)."""
  lbs = parallel.local_batch_size(global_batch_size, mesh)
  ds = pipelines.eval_dataset(
      source,
      spec,
      local_batch_size=lbs,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_threads=num_threads,
  )
  totals = zero_totals(mesh)
  bad: list[int] = []
  with prefetch.global_batches(ds, mesh, ("image", "label", "mask")) as batches:
    for host, batch in batches:
      bad += [int(i) for i in host["id"][(host["id"] >= 0) & ~host["valid"]]]
      with prefetch.no_implicit_transfers():
        totals = eval_step(variables, batch, totals)
  t = jax.device_get(totals)  # replicated: every process holds the sums
  n = float(t["count"])
  if int(round(n)) != len(source):
    # video files: ids are positions, so they name files; other sources: record ids
    name_of = getattr(source, "name_of", None) if hasattr(source, "reason_of") else None
    names = [name_of(i) if name_of else f"record id {i}" for i in bad[:5]]
    raise DataError(
        f"evaluation: {len(source) - int(round(n))} of {len(source)} examples "
        f"cannot be decoded or made the model's input"
        + (f" (e.g. {', '.join(names)})" if names else "")
        + "; an evaluation set must be whole: fix or remove them"
    )
  return {
      "top1": float(t["top1"]) / n,
      "top5": float(t["top5"]) / n,
      "loss": float(t["loss"]) / n,
      "num_examples": int(round(n)),
  }
