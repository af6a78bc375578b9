"""One way to the device (bssl.prefetch) and no recompilation (issue 31, items 4 and 5).

On 8 fake CPU devices, with a tiny model and 40 images (batches of 16: the last evaluation
and scoring batches are partial, padded):

- training, evaluation and scoring steps run under ``jax.transfer_guard("disallow")`` set
  for the whole process (every thread: the prefetch threads' copies are explicit), and the
  loops themselves refuse an implicit copy;
- every global batch is made on the device by the prefetch thread, ahead of its step, in
  training, evaluation and scoring alike; evaluation keeps its running sums on the device
  (donated from batch to batch);
- a stage compiles its step once: one trace and one XLA compilation of ``train_step``,
  ``eval_step`` and ``score_step`` over a stage whose last batch is partial.
"""

import threading

import jax
import jax.monitoring
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bssl import evaluation, parallel, prefetch, scoring, train
from bssl.backends.jax import JaxScorer
from bssl.data import pipelines, sources
from bssl.models import create_model

C = 4
N = 40  # 2.5 batches of 16
GBS = 16
SPEC = pipelines.ImageSpec(size=8, channels=1, augment="pad_crop_flip", pad=1)
MEAN, STD = (100.0,), (60.0,)
STEPS = ("train_step", "eval_step", "score_step")


def _cfg(steps=3):
  return ml_collections.ConfigDict(
      dict(
          steps=steps,
          batch_size=GBS,
          lr=0.1,
          schedule="cosine",
          warmup_fraction=0.0,
          momentum=0.9,
          nesterov=True,
          weight_decay=5e-4,
          bn_mode="sync",
          log_every=1,
          checkpoint_every=0,
          keep_checkpoints=1,
      )
  )


def _model():
  return create_model("resnet_small", C, widths=(4,), depths=(1,))


def _unlabelled(src):
  return sources.SubsetView(src, np.arange(len(src)), hide_labels=True, reindex=True)


@pytest.fixture(scope="module")
def tiny():
  mesh = parallel.make_mesh()
  model = _model()
  src = sources.fake_source(N, (8, 8, 1), C, seed=7)
  tx = train.make_optimizer(_cfg(), train.make_schedule(_cfg(), 3, 0.1))
  state = train.init_state(model, tx, 0, (8, 8, 1), mesh)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return mesh, model, src, tx, state, variables


def _fit(mesh, src, workdir, steps=3):
  return train.fit(
      name="tiny",
      model=_model(),
      cfg=_cfg(steps),
      source=src,
      spec=SPEC,
      mesh=mesh,
      workdir=workdir,
      num_classes=C,
      mean=MEAN,
      std=STD,
      seed=3,
  )


def _evaluate(mesh, model, variables, src):
  ev = evaluation.make_eval_step(model, mesh, num_classes=C, mean=MEAN, std=STD)
  return evaluation.evaluate(ev, variables, src, SPEC, mesh, global_batch_size=GBS)


def _score(scorer, src, parts):
  gen, chunks = scoring.plan_chunks(parts, len(src), 32)  # chunks of 32 and 8 images
  return scoring.score_process(
      scorer=scorer,
      source=src,
      spec=SPEC,
      parts_dir=parts,
      gen=gen,
      chunks=chunks,
      process_index=0,
      process_count=1,
      num_classes=C,
      k=3,
      p=2,
      local_batch_size=GBS,
      log=lambda m: None,
  )


# ----------------------------------------------------------------------------- transfer guard


@pytest.fixture
def disallow():
  """``jax_transfer_guard = disallow`` for the whole process (every thread), as big_vision's
  trainer sets it; restored after the test."""
  before = jax.config.jax_transfer_guard
  jax.config.update("jax_transfer_guard", "disallow")
  try:
    yield
  finally:
    jax.config.update("jax_transfer_guard", before)


def test_train_eval_and_score_steps_run_under_the_transfer_guard(tiny, disallow, tmp_path):
  mesh, model, src, tx, state, variables = tiny
  # the guard is in force in this thread and in the ones the loops start
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    jnp.add(jnp.zeros(()), np.float32(1))
  sched = train.make_schedule(_cfg(), 3, 0.1)
  step = train.make_train_step(model, tx, mesh, num_classes=C, mean=MEAN, std=STD, schedule=sched)
  stream = pipelines.train_dataset(src, SPEC, local_batch_size=GBS, seed=0)
  state = jax.tree.map(jnp.copy, state)  # (the fixture's state is not donated away)
  with prefetch.global_batches(
      (b for b, _ in zip(stream, range(2))), mesh, ("image", "label")
  ) as batches:
    for _, batch in batches:
      state, metrics = step(state, batch)
      assert np.isfinite(jax.device_get(metrics)["loss"])
  assert int(jax.device_get(state.step)) == 2

  out = _evaluate(mesh, model, variables, src)
  assert out["num_examples"] == N

  scorer = JaxScorer(model, variables, 2, MEAN, STD)
  assert _score(scorer, _unlabelled(src), tmp_path / "parts")["num_scored"] == N


def _host_batches(batches, mesh, keys, depth=2):
  """What the loops would get without the put: this process's numpy batches."""
  return prefetch.Ahead(batches, lambda b: {k: b[k] for k in keys}, depth)


def test_the_loops_refuse_a_batch_left_on_the_host(tiny, monkeypatch, tmp_path):
  """fit and evaluate dispatch their steps under the guard: a batch that would be copied
  implicitly by the step is an error, not a hidden transfer."""
  mesh, model, src, _, _, variables = tiny
  monkeypatch.setattr(prefetch, "global_batches", _host_batches)
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    _evaluate(mesh, model, variables, src)
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    _fit(mesh, src, tmp_path / "fit", steps=1)


# ----------------------------------------------------------------------------- prefetch


def test_prefetch_runs_ahead_stops_and_passes_errors_on():
  read = []

  def items(n, fail_at=None):
    for i in range(n):
      if i == fail_at:
        raise KeyError("broken record")
      read.append(i)
      yield i

  ahead = prefetch.Ahead(items(10), lambda i: i * 10, depth=2)
  assert next(ahead) == (0, 0)
  for _ in range(100):  # the thread reads on while the consumer works on item 0
    if len(read) >= 3:
      break
    threading.Event().wait(0.05)
  assert 3 <= len(read) <= 4, read  # item 0, 2 queued, at most 1 waiting to be queued
  ahead.close()
  assert not ahead._thread.is_alive()
  assert list(ahead) == []
  read.clear()
  with prefetch.Ahead(items(5), None) as fed:
    assert [i for i, _ in fed] == [0, 1, 2, 3, 4]
  with pytest.raises(KeyError, match="broken record"), prefetch.Ahead(items(5, 3), None) as fed:
    list(fed)


# ----------------------------------------------------------------------------- one stage, watched


@pytest.fixture(scope="module")
def watched(tiny, tmp_path_factory):
  """One training, one evaluation and one scoring stage, their compilations and the
  threads their batches were made in recorded."""
  mesh, model, src, _, _, variables = tiny
  events, puts, totals_chain = [], [], []

  def listener(event, duration, **kw):
    if event in (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/backend_compile_duration",
    ):
      events.append((event.rsplit("/", 1)[1], kw.get("fun_name", "")))

  real_put = parallel.global_batch_from_local

  def recording_put(m, local):
    puts.append(threading.current_thread().name)
    return real_put(m, local)

  mp = pytest.MonkeyPatch()
  mp.setattr(parallel, "global_batch_from_local", recording_put)
  jax.monitoring.register_event_duration_secs_listener(listener)
  tmp = tmp_path_factory.mktemp("watched")
  try:
    fit = _fit(mesh, src, tmp / "fit")
    train_puts, puts[:] = list(puts), []

    ev = evaluation.make_eval_step(model, mesh, num_classes=C, mean=MEAN, std=STD)

    def eval_step(v, batch, totals):
      totals_chain.append(totals)
      return ev(v, batch, totals)

    out = evaluation.evaluate(eval_step, variables, src, SPEC, mesh, global_batch_size=GBS)
    eval_puts, puts[:] = list(puts), []

    scorer = JaxScorer(model, variables, 2, MEAN, STD)
    score_threads = []
    real_score_put = scorer.put

    def score_put(images):
      score_threads.append(threading.current_thread().name)
      return real_score_put(images)

    scorer.put = score_put
    scored = _score(scorer, _unlabelled(src), tmp / "parts")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    mp.undo()
  return dict(
      events=events,
      fit=fit,
      eval=out,
      scored=scored,
      train_puts=train_puts,
      eval_puts=eval_puts,
      score_threads=score_threads,
      totals_chain=totals_chain,
  )


def test_a_stage_traces_and_compiles_its_step_once(watched):
  assert watched["fit"]["steps"] == 3
  assert watched["eval"]["num_examples"] == N  # 3 batches, the last one half padding
  assert watched["scored"]["num_scored"] == N  # batches of 16, 16 and 8 (padded)
  for name in STEPS:
    traces = [f for e, f in watched["events"] if e == "jaxpr_trace_duration" and f == name]
    compiles = [f for e, f in watched["events"] if e == "backend_compile_duration" and name in f]
    assert (len(traces), len(compiles)) == (1, 1), (name, watched["events"])


def test_batches_are_made_on_the_device_by_the_prefetch_thread(watched):
  assert len(watched["train_puts"]) == 3  # one per step, no batch read past the last step
  assert set(watched["train_puts"]) == {"bssl-prefetch-global"}
  assert len(watched["eval_puts"]) == 3
  assert set(watched["eval_puts"]) == {"bssl-prefetch-global"}
  assert len(watched["score_threads"]) == 3
  assert set(watched["score_threads"]) == {"bssl-score-feed"}


def test_evaluation_keeps_its_sums_on_the_device(tiny, watched):
  mesh = tiny[0]
  chain = watched["totals_chain"]
  assert len(chain) == 3
  # each batch's step is given the running sums on the device and consumes them (donated)
  for t in chain:
    assert all(
        isinstance(x, jax.Array) and x.sharding == parallel.replicated(mesh) for x in t.values()
    )
    assert all(x.is_deleted() for x in t.values())
