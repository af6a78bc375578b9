"""The device code of scoring: what the teacher's outputs become before the host ranks them.

Everything here is jit-able JAX that runs inside a backend's scoring or evaluation step
(:class:`bssl.backends.jax.JaxScorer`, :func:`bssl.evaluation.make_eval_step`); the host side
(chunks, parts, coverage, merge) is :mod:`bssl.scoring`.

**What is ranked.** Each image's top-P classes with the teacher's *log-odds* of each,
``r_c = log p_c - log(1 - p_c) = z_c - logsumexp_{j != c} z_j``, computed stably from the
logits ``z`` (:func:`top_log_odds`; videos: of the clips' averaged softmax,
:func:`video_top_log_odds`). It is monotone in the exact probability, so the ranking is the
probability's, but it does not saturate: the float32 softmax is exactly 1.0 once the top
logit leads by about 17, where half of a confident teacher's U would tie.

**Videos.** A batch of videos is ``[B, N, T, H, W, C]`` (N clips each,
:func:`is_clip_batch`); the clips go through the model one clip index at a time (a scan
over N, :func:`clip_logits`, :func:`video_level_probs`), so device memory holds one clip of
every video at once, not N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_clip_batch(images) -> bool:
  """Whether a batch is videos' clips ``[B, N, T, H, W, C]`` (else images ``[B, H, W, C]``
  or single clips): the one test the device steps make to score or measure per video."""
  return images.ndim == 6


def _lse_parts(z, classes):
  """For logits ``z`` [..., C] (float32, C >= 2) and class indices ``classes`` [..., P]:
  ``(z_c, logsumexp_j z_j, logsumexp_{j != c} z_j)``, each [..., P] but the middle one
  [..., 1], computed without cancellation.

  With ``m1 >= m2`` the two largest logits and ``S = sum_j exp(z_j - m1)`` (>= 1): for ``c``
  not the argmax, ``sum_{j != c} exp(z_j - m1) = S - exp(z_c - m1)`` still holds the
  argmax's term 1, so the subtraction loses nothing; for the argmax it would be ``S - 1``,
  all lost once the margin passes ~17, so that sum is taken directly, masked and relative to
  ``m2`` (>= 1, no overflow)."""
  # The two largest by reductions, not lax.top_k: XLA:CPU fused top_k into the masked sum
  # below and recomputed it per element (41 ms for 256 x 1,000 logits, 0.3 ms now).
  # argmax takes the first of equal maxima, as top_k does.
  m1 = jnp.max(z, axis=-1, keepdims=True)
  i1 = jnp.argmax(z, axis=-1)[..., None].astype(jnp.int32)
  iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
  others = jnp.where(iota == i1, -jnp.inf, z)
  m2 = jnp.max(others, axis=-1, keepdims=True)
  s = jnp.sum(jnp.exp(z - m1), axis=-1, keepdims=True)
  rest_top = jnp.sum(jnp.exp(others - m2), axis=-1, keepdims=True)
  zc = jnp.take_along_axis(z, classes, axis=-1)
  rest = jnp.maximum(s - jnp.exp(zc - m1), 1.0)  # >= 1 exactly; rounding never below
  excl = jnp.where(classes == i1, m2 + jnp.log(rest_top), m1 + jnp.log(rest))
  return zc, m1 + jnp.log(s), excl


def top_log_odds(logits, p: int):
  """An image batch's ranking scores, on the device (jit-able): logits [B, C] ->
  (classes int32 [B, P], log-odds float32 [B, P], finite bool [B]). ``classes`` are each
  image's ``p`` largest logits (= most probable classes), best first; the score of class
  ``c`` is ``z_c - logsumexp_{j != c} z_j = log p_c - log(1 - p_c)`` (``+inf`` when C = 1),
  which does not saturate where the float32 softmax is exactly 1.0."""
  z = logits.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(z), axis=-1)
  _, classes = jax.lax.top_k(z, p)
  if z.shape[-1] == 1:
    return classes.astype(jnp.int32), jnp.full(classes.shape, jnp.inf, jnp.float32), finite
  zc, _, excl = _lse_parts(z, classes)
  return classes.astype(jnp.int32), zc - excl, finite


def video_top_log_odds(clip_logits, p: int):
  """A video batch's ranking scores, on the device (jit-able): the N clips' logits
  [B, N, C] -> (classes int32 [B, P], log-odds float32 [B, P], finite bool [B]) of the
  video-level prediction, the mean of the clips' softmax ``pbar`` (the paper's video
  evaluation, :func:`video_level_probs`). In log space, with ``N`` clips:
  ``log pbar_c = logsumexp_n log p_nc - log N`` and ``log(1 - pbar_c) = logsumexp_n log(1 -
  p_nc) - log N`` (``log(1 - p_nc) = logsumexp_{j != c} z_nj - logsumexp_j z_nj``), so the
  log-odds ``log pbar_c - log(1 - pbar_c)`` (the ``log N`` cancel) does not saturate either.
  ``classes`` are the ``p`` largest ``log pbar``."""
  z = clip_logits.astype(jnp.float32)
  b, n, c = z.shape
  finite = jnp.all(jnp.isfinite(z), axis=(-2, -1))
  log_p = jax.nn.log_softmax(z, axis=-1)  # [B, N, C]
  _, classes = jax.lax.top_k(jax.nn.logsumexp(log_p, axis=1), p)  # by log pbar
  if c == 1:
    return classes.astype(jnp.int32), jnp.full(classes.shape, jnp.inf, jnp.float32), finite
  zc, lse, excl = _lse_parts(z, jnp.broadcast_to(classes[:, None, :], (b, n, p)))
  log_pc = jax.nn.logsumexp(zc - lse, axis=1)  # [B, P]
  log_1m = jax.nn.logsumexp(excl - lse, axis=1)
  return classes.astype(jnp.int32), log_pc - log_1m, finite


def clip_logits(apply_fn, clips):
  """The logits ``[B, N, num_classes]`` (float32) of a batch of videos' clips ``[B, N, T, H,
  W, C]``, for scoring: the video-level ranking score is computed from them in log space
  (:func:`video_top_log_odds`), since the averaged float32 softmax of
  :func:`video_level_probs` saturates at 1.0 for confident videos. Like it, the clips go
  through ``apply_fn`` one clip index at a time (a scan over N): device memory holds one
  clip of every video at once, plus the logits."""

  def logits(x):
    return apply_fn(x).astype(jnp.float32)

  first = logits(clips[:, 0])
  if clips.shape[1] == 1:
    return first[:, None]
  rest = jnp.moveaxis(clips[:, 1:], 1, 0)
  _, more = jax.lax.scan(lambda carry, x: (carry, logits(x)), None, rest)
  return jnp.concatenate([first[:, None], jnp.moveaxis(more, 0, 1)], axis=1)


def video_level_probs(apply_fn, clips):
  """Video-level prediction of a batch of videos' clips ``[B, N, T, H, W, C]``: the mean
  over the N clips of each clip's softmax, computed on the device (jit-able). The clips
  go through ``apply_fn`` (clips ``[B, T, H, W, C]`` -> logits) one clip index at a time
  (a scan over N), so device memory holds one clip of every video at once, not N."""

  def probs(x):
    return jax.nn.softmax(apply_fn(x).astype(jnp.float32), axis=-1)

  n = clips.shape[1]
  first = probs(clips[:, 0])
  if n == 1:
    return first
  rest = jnp.moveaxis(clips[:, 1:], 1, 0)
  total, _ = jax.lax.scan(lambda acc, x: (acc + probs(x), None), first, rest)
  return total / n
