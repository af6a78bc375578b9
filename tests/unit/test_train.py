"""Training: the loss goes down, BatchNorm modes compute what they claim on 8 fake
devices, NaN stops the run keeping the last good checkpoint, a run killed with SIGTERM
(also exactly on a checkpoint step) or SIGKILL resumes to exactly the parameters of an
uninterrupted run, and a checkpoint resumes on another device count (same mesh size or
a fresh process with fewer devices) to the same parameters up to reduction order."""

import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_worker as tw

from bssl import parallel, train

HERE = os.path.dirname(os.path.abspath(__file__))
HELPERS = os.path.join(os.path.dirname(HERE), "helpers")
MEAN, STD = (100.0,), (60.0,)


def _batch(n=16, seed=0):
  src = tw.tiny_source()
  idx = np.random.default_rng(seed).choice(len(src), n, replace=False)
  return {"image": src.images[idx], "label": src.labels[idx]}


def _state_and_step(mesh, bn_mode, lr=0.1):
  model = tw.tiny_model()
  sched = optax.constant_schedule(lr)
  tx = train.make_optimizer(tw.tiny_cfg(bn_mode=bn_mode), sched)
  state = train.init_state(model, tx, 0, (8, 8, 1), mesh)
  step = train.make_train_step(
      model,
      tx,
      mesh,
      num_classes=tw.NUM_CLASSES,
      mean=MEAN,
      std=STD,
      schedule=sched,
      bn_mode=bn_mode,
  )
  return model, tx, state, step


def _put(mesh, batch):
  return jax.device_put(batch, parallel.batch_sharding(mesh))


def test_train_step_lowers_loss_on_a_fixed_batch():
  mesh = parallel.make_mesh()
  _, _, state, step = _state_and_step(mesh, "sync")
  batch = _put(mesh, _batch())
  losses = []
  for _ in range(15):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 15


def test_warmup_steps_zero_overrides_warmup_fraction():
  import ml_collections

  lrs = lambda **kw: [
      float(
          train.make_schedule(ml_collections.ConfigDict(dict(schedule="constant", **kw)), 10, 0.4)(
              i
          )
      )
      for i in range(4)
  ]
  # 0 is a value, not "unset": no warm-up whatever warmup_fraction says
  assert lrs(warmup_steps=0, warmup_fraction=0.5) == pytest.approx([0.4] * 4)
  # (linear from lr / warmup to lr over the warm-up steps)
  assert lrs(warmup_steps=None, warmup_fraction=0.4) == pytest.approx([0.1, 0.175, 0.25, 0.325])
  assert lrs(warmup_steps=2, warmup_fraction=0.5) == pytest.approx([0.2, 0.3, 0.4, 0.4])


def test_sync_bn_equals_one_device_on_the_full_batch():
  assert jax.device_count() == 8
  mesh8 = parallel.make_mesh()
  mesh1 = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  batch = _batch(16)
  _, _, s8, step8 = _state_and_step(mesh8, "sync")
  _, _, s1, step1 = _state_and_step(mesh1, "sync")
  s8, m8 = step8(s8, _put(mesh8, batch))
  s1, m1 = step1(s1, _put(mesh1, batch))
  assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
  for a, b in zip(
      jax.tree.leaves((s8.params, s8.batch_stats)), jax.tree.leaves((s1.params, s1.batch_stats))
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_per_device_bn_equals_average_of_per_shard_computations():
  mesh8 = parallel.make_mesh()
  batch = _batch(16)
  model, tx, s8, step8 = _state_and_step(mesh8, "per_device")
  params0 = jax.device_get(s8.params)
  stats0 = jax.device_get(s8.batch_stats)
  opt0 = tx.init(params0)

  # Reference: each of the 8 shards (2 images) on its own, statistics over its 2 images.
  def loss_fn(p, images, labels):
    x = train.normalize(images, MEAN, STD)
    logits, new = model.apply(
        {"params": p, "batch_stats": stats0}, x, train=True, mutable=["batch_stats"]
    )
    onehot = jax.nn.one_hot(labels, tw.NUM_CLASSES)
    return optax.softmax_cross_entropy(logits, onehot).mean(), new["batch_stats"]

  shard_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  grads, stats, losses = [], [], []
  for i in range(8):
    sl = slice(2 * i, 2 * i + 2)
    (l, st), g = shard_grad(params0, batch["image"][sl], batch["label"][sl])
    grads.append(g), stats.append(st), losses.append(l)
  mean_g = jax.tree.map(lambda *x: sum(x) / 8, *grads)
  mean_st = jax.tree.map(lambda *x: sum(x) / 8, *stats)
  upd, _ = tx.update(mean_g, opt0, params0)
  ref_params = optax.apply_updates(params0, upd)

  s8, m8 = step8(s8, _put(mesh8, batch))
  assert float(m8["loss"]) == pytest.approx(float(np.mean(losses)), rel=1e-5)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
  for a, b in zip(jax.tree.leaves(s8.batch_stats), jax.tree.leaves(mean_st)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
  # And per-device statistics really differ from synchronised ones on this batch.
  _, _, ss, steps_ = _state_and_step(mesh8, "sync")
  ss, _ = steps_(ss, _put(mesh8, batch))
  diff = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(jax.tree.leaves(ss.params), jax.tree.leaves(s8.params))
  )
  assert diff > 1e-4


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("full"))
  res = tw.run(wd, tw.tiny_cfg())
  return tw.flat(res["variables"])


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_crash_then_resume_gives_identical_parameters(tmp_path, uninterrupted, capsys):
  wd = str(tmp_path / "w")
  out = tw.run(wd, tw.tiny_cfg(), stop_after_steps=5)  # crash after step 5, last ckpt at 4
  assert out == {"interrupted_at": 5}
  res = tw.run(wd, tw.tiny_cfg())
  assert "resumed from checkpoint at step 4" in capsys.readouterr().out
  _assert_same(tw.flat(res["variables"]), uninterrupted)


def _sigterm_after_step(monkeypatch, at: int):
  """Makes training send itself SIGTERM after step ``at``; returns the real step maker."""
  real_step = train.make_train_step

  def step_then_sigterm(*a, **k):
    inner = real_step(*a, **k)

    def step(state, batch):
      out = inner(state, batch)
      if int(out[0].step) == at:
        os.kill(os.getpid(), signal.SIGTERM)
      return out

    return step

  monkeypatch.setattr(train, "make_train_step", step_then_sigterm)
  return real_step


def test_sigterm_saves_and_resume_is_exact(tmp_path, uninterrupted, monkeypatch):
  wd = str(tmp_path / "w")
  real_step = _sigterm_after_step(monkeypatch, 3)
  with pytest.raises(train.Preempted, match="step 3"):
    tw.run(wd, tw.tiny_cfg(checkpoint_every=0))
  monkeypatch.setattr(train, "make_train_step", real_step)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3"]
  res = tw.run(wd, tw.tiny_cfg())
  _assert_same(tw.flat(res["variables"]), uninterrupted)


@pytest.mark.parametrize("orbax_skips_saved_steps", [True, False])
def test_sigterm_exactly_at_a_checkpoint_step_is_preempted_and_resume_is_exact(
    tmp_path, uninterrupted, monkeypatch, orbax_skips_saved_steps
):
  """SIGTERM during step 4 with checkpoint_every=2: the loop's periodic save of step 4 and
  the SIGTERM save of step 4 are the same checkpoint; the run must stop as preempted (exit
  143 in bssl.main), not crash with orbax's StepAlreadyExistsError. orbax 0.12 itself
  skips a step it has saved (``should_save``); the second case takes that away, so bssl's
  own guard is what is tested, whatever the orbax version or save policy."""
  wd = str(tmp_path / "w")
  if not orbax_skips_saved_steps:
    import orbax.checkpoint as ocp

    monkeypatch.setattr(ocp.CheckpointManager, "should_save", lambda self, step: True)
  real_step = _sigterm_after_step(monkeypatch, 4)
  with pytest.raises(train.Preempted, match="step 4"):
    tw.run(wd, tw.tiny_cfg(checkpoint_every=2))
  monkeypatch.setattr(train, "make_train_step", real_step)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]
  res = tw.run(wd, tw.tiny_cfg())
  _assert_same(tw.flat(res["variables"]), uninterrupted)


def test_sigterm_during_the_final_save_is_passed_on_not_swallowed(tmp_path, monkeypatch):
  """SIGTERM after the loop's last poll (while the final checkpoint is written) used to be
  swallowed: the run went on to its next stage. It is delivered again to the handler that
  was there before training, once the final checkpoint is whole."""
  import orbax.checkpoint as ocp

  wd = str(tmp_path / "w")
  real_wait = ocp.CheckpointManager.wait_until_finished

  def wait_then_sigterm(self):
    os.kill(os.getpid(), signal.SIGTERM)
    return real_wait(self)

  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait_then_sigterm)
  got = []
  old = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
  try:
    res = tw.run(wd, tw.tiny_cfg(steps=4, checkpoint_every=0))
  finally:
    signal.signal(signal.SIGTERM, old)
  assert got == [signal.SIGTERM]
  assert res["steps"] == 4
  assert "4" in os.listdir(os.path.join(wd, "checkpoints"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  wd = str(tmp_path / "w")
  cfg = tw.tiny_cfg(steps=8, checkpoint_every=1, lr=1e12)
  with pytest.raises(train.NonFiniteLossError, match="loss is (nan|inf)") as e:
    tw.run(wd, cfg)
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert steps, "a checkpoint before the divergence should exist"
  import orbax.checkpoint as ocp

  restored = ocp.StandardCheckpointer().restore(
      os.path.join(wd, "checkpoints", str(steps[-1]), "state")
  )
  for leaf in jax.tree.leaves(restored):
    assert np.all(np.isfinite(np.asarray(leaf)))
  assert f"step {steps[-1]}" in str(e.value)


def test_sigkill_then_rerun_gives_identical_parameters(tmp_path, uninterrupted):
  """A real kill -9 of a separate process in the middle of training."""
  wd, out = str(tmp_path / "w"), str(tmp_path / "final.npz")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = [sys.executable, os.path.join(HELPERS, "train_worker.py"), wd, out]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if "step 7/12" in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
  assert not os.path.exists(out)
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "resumed from checkpoint at step" in done.stdout
  with np.load(out) as z:
    _assert_same({k: z[k] for k in z.files}, uninterrupted)


def test_resume_on_a_different_device_count(tmp_path, uninterrupted):
  """Saved on 8 devices, resumed on 4: restore onto the current mesh; with synchronised
  BatchNorm the result equals the 8-device run up to reduction order."""
  wd = str(tmp_path / "w")
  tw.run(wd, tw.tiny_cfg(), stop_after_steps=6)
  mesh4 = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  res = tw.run(wd, tw.tiny_cfg(), mesh=mesh4)
  got = tw.flat(res["variables"])
  for k in uninterrupted:
    np.testing.assert_allclose(got[k], uninterrupted[k], rtol=1e-4, atol=1e-5, err_msg=k)
  leaf = jax.tree.leaves(res["variables"]["params"])[0]
  assert len(leaf.sharding.device_set) == 4


def test_resume_in_a_process_with_another_device_count(tmp_path, uninterrupted):
  """Saved by a process with 4 devices, resumed by a fresh process with 2: the checkpoint
  restores onto the smaller mesh and the input restarts at the restored step's global
  batch, so the result equals the uninterrupted 8-device run up to reduction order."""
  wd, out = str(tmp_path / "w"), str(tmp_path / "final.npz")
  cmd = [sys.executable, os.path.join(HELPERS, "train_worker.py"), wd, out]

  def env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")

  first = subprocess.run(
      cmd + ["--stop_after_steps", "7"], capture_output=True, text=True, env=env(4), timeout=300
  )
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert "DEVICES 4" in first.stdout and "INTERRUPTED 7" in first.stdout
  assert not os.path.exists(out)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4", "6"]
  second = subprocess.run(cmd, capture_output=True, text=True, env=env(2), timeout=300)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert "DEVICES 2" in second.stdout and "FINISHED" in second.stdout
  assert "resumed from checkpoint at step 6" in second.stdout
  assert "2 devices, starting at step 6" in second.stdout
  with np.load(out) as z:
    got = {k: z[k] for k in z.files}
  assert got.keys() == uninterrupted.keys()
  for k in uninterrupted:
    # (2 vs 4 devices: other per-device batches, so XLA's convolutions and BatchNorm sums
    # add in another order; with issue 31's threefry init and XLA convolutions on CPU a
    # BatchNorm variance of 0.693 differs by 1.8e-4, a kernel weight of 0.097 by 1.4e-4 after
    # the resumed steps; the run's own state is what is checked, not float order)
    np.testing.assert_allclose(got[k], uninterrupted[k], rtol=2e-3, atol=5e-4, err_msg=k)
