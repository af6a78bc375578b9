"""R(2+1)D train step and forward on CPU/GPU, XLA's 3-D convolutions against the factored
ones (bssl/models/video.py, Conv3D). Prints one line per setting, then one JSON object.

  python benchmarks/video_step.py [--frames 8 --size 32 --batch 32 --model r2plus1d_small]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

from bssl.models import count_params
from bssl.models.video import create_video_model


def bench(name, impl, frames, size, batch, channels, kwargs, reps=5):
  m = create_video_model(name, 20, conv_impl=impl, **kwargs)
  x = jnp.zeros((batch, frames, size, size, channels))
  y = jnp.zeros((batch,), jnp.int32)
  v = m.init(jax.random.key(0), x[:1], train=False)
  tx = optax.sgd(0.1, 0.9)
  opt = tx.init(v["params"])

  @jax.jit
  def step(p, bs, o, x, y):
    def f(p):
      out, nv = m.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), nv

    (loss, nv), g = jax.value_and_grad(f, has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), nv["batch_stats"], o, loss

  @jax.jit
  def fwd(p, bs, x):
    return m.apply({"params": p, "batch_stats": bs}, x, train=False)

  p, bs = v["params"], v["batch_stats"]
  jax.block_until_ready(step(p, bs, opt, x, y))
  t = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(step(p, bs, opt, x, y))
  ts = (time.perf_counter() - t) / reps
  jax.block_until_ready(fwd(p, bs, x))
  t = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fwd(p, bs, x))
  tf = (time.perf_counter() - t) / reps
  return {
      "impl": impl,
      "params": count_params(p),
      "train_step_ms": 1000 * ts,
      "train_clips_per_s": batch / ts,
      "forward_ms": 1000 * tf,
      "forward_clips_per_s": batch / tf,
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="r2plus1d_small")
  ap.add_argument("--frames", type=int, default=8)
  ap.add_argument("--size", type=int, default=32)
  ap.add_argument("--channels", type=int, default=1)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument(
      "--kwargs",
      default="{'widths': (8, 16, 32), 'depths': (1, 1, 1), " "'stem_mid': 8, 'stem_stride': 2}",
      help="model kwargs (r2plus1d_small: the demo's)",
  )
  a = ap.parse_args()
  kwargs = eval(a.kwargs) if a.model == "r2plus1d_small" else {}
  out = {
      "backend": jax.default_backend(),
      "model": a.model,
      "clip": [a.frames, a.size, a.size, a.channels],
      "batch": a.batch,
  }
  for impl in ("xla", "factored"):
    r = bench(a.model, impl, a.frames, a.size, a.batch, a.channels, kwargs)
    print(
        f"{impl:9s} train step {r['train_step_ms']:.0f} ms ({r['train_clips_per_s']:.0f} clips/s)"
        f", forward {r['forward_ms']:.0f} ms ({r['forward_clips_per_s']:.0f} clips/s)",
        flush=True,
    )
    out[impl] = r
  out["factored_speedup_train"] = out["xla"]["train_step_ms"] / out["factored"]["train_step_ms"]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
