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

from bssl import parallel, ranking, train
from bssl.data import pipelines
from bssl.data.sources import DataError


def video_probs(model, variables, videos, mean, std) -> jax.Array:
  """Video-level class probabilities of ``videos`` uint8 [B, N, T, H, W, C]: the mean of
  the N clips' softmax (the paper's 10-clip evaluation), on the device."""
  return ranking.video_level_probs(
      lambda clip: model.apply(variables, train.normalize(clip, mean, std), train=False), videos
  )


def make_eval_step(model, mesh, *, num_classes: int, mean, std) -> Callable:
  """``eval(variables, batch) -> sums`` of correct top-1/top-5, loss and count over
  the masked batch. A batch of videos (``image`` [B, N, T, H, W, C]: N clips each) is
  measured at the video level: top-k and loss of the mean of its clips' softmax."""
  k5 = min(5, num_classes)

  def step(variables, batch):
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
    return {
        "top1": jnp.sum(correct1 * mask),
        "top5": jnp.sum(correct5 * mask),
        "loss": jnp.sum(loss * mask),
        "count": jnp.sum(mask),
    }

  return jax.jit(step, out_shardings=parallel.replicated(mesh))


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
  """top1/top5/loss over every example of ``source`` exactly once."""
  lbs = parallel.local_batch_size(global_batch_size, mesh)
  ds = pipelines.eval_dataset(
      source,
      spec,
      local_batch_size=lbs,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_threads=num_threads,
  )
  totals = None
  bad: list[int] = []
  for batch in ds:
    bad += [int(i) for i in batch["id"][(batch["id"] >= 0) & ~batch["valid"]]]
    batch = {k: batch[k] for k in ("image", "label", "mask")}
    out = eval_step(variables, parallel.global_batch_from_local(mesh, batch))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  t = parallel.to_host(totals)
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
