"""Transfer: fc-only's logistic regression against a reference solver, and the transfer
stage end to end (fc-only and full fine-tuning of every model) on the demo's tiny run."""

import json
import os

import numpy as np
import pytest

from bssl import transfer

needs_fmnist = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist (the README's commands install it)",
)


def _separable(n, d, c, seed):
  rng = np.random.default_rng(seed)
  centers = rng.normal(0, 6, (c, d))
  y = rng.integers(0, c, n)
  return (centers[y] + rng.normal(0, 1, (n, d))).astype(np.float32), y.astype(np.int32)


def test_logistic_regression_separable_features_and_reference_solver():
  from sklearn.linear_model import LogisticRegression

  x, y = _separable(600, 16, 5, 0)
  xt, yt = x[:400], y[:400]
  xv, yv = x[400:500], y[400:500]
  xs, ys = x[500:], y[500:]
  res = transfer.fc_only((xt, yt), (xv, yv), (xs, ys), 5)
  assert res["top1"] == 1.0 and res["val_top1"] == 1.0  # linearly separable
  # the same L2 problem, solved by scikit-learn (C = 1 / (n * lam) for a mean loss)
  lam = 1e-2
  w, b = transfer.fit_logistic(xt, yt, 5, lam)
  ref = LogisticRegression(C=1.0 / (len(yt) * lam), max_iter=5000, tol=1e-10).fit(xt, yt)
  # (float32 L-BFGS: coefficients to ~2e-3, machine-dependent; the objective decides)
  np.testing.assert_allclose(w, ref.coef_.T, atol=5e-3)

  def objective(w, b):  # mean cross-entropy + lam/2 ||W||^2, in float64
    z = xt.astype(np.float64) @ w + b
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -logp[np.arange(len(yt)), yt].mean() + 0.5 * lam * np.sum(np.square(w))

  assert objective(w, b) <= objective(ref.coef_.T, ref.intercept_) + 1e-5
  # noisy features: accuracy equals the reference solver's on the test split
  xn, yn = _separable(900, 8, 4, 1)
  xn = xn + np.random.default_rng(2).normal(0, 5, xn.shape).astype(np.float32)
  w, b = transfer.fit_logistic(xn[:600], yn[:600], 4, lam)
  ref = LogisticRegression(C=1.0 / (600 * lam), max_iter=5000, tol=1e-10).fit(xn[:600], yn[:600])
  assert transfer.accuracy(xn[600:], yn[600:], w, b) == pytest.approx(
      ref.score(xn[600:], yn[600:]), abs=1 / 300
  )


@needs_fmnist
def test_transfer_stage_on_the_tiny_run(tmp_path, demo_tiny_run):
  import shutil

  from bssl import engine
  from bssl.configs import demo

  cfg = demo.get_config("tiny")
  wd = str(tmp_path / "w")
  shutil.copytree(demo_tiny_run[1], wd)
  cfg.stages = "transfer,report"
  cfg.transfer.ft_steps = 4
  cfg.transfer.ft_batch_size = 32
  engine.run_recipe(cfg, wd)
  res = json.load(open(os.path.join(wd, "report", "results.json")))["transfer"]
  assert res["target"] == "digits" and res["num_classes"] == 10
  for key in ("baseline", "student"):
    assert set(res[key]) == {"fc_only", "full_ft"}
    assert 0.5 < res[key]["fc_only"]["top1"] <= 1.0  # digits from frozen features
    assert res[key]["fc_only"]["num_test"] == 539
    assert res[key]["full_ft"]["steps"] == 4
  assert res["teacher"]["same_as"] == "baseline"
  md = open(os.path.join(wd, "report", "results.md")).read()
  assert "## Transfer to digits" in md and "| teacher (= baseline) |" in md
  # the transfer's config is its own: changing it refuses the old result
  cfg.transfer.ft_lr = 0.5
  with pytest.raises(engine.RefusedError, match="transfer.ft_lr"):
    engine.run_recipe(cfg, wd)
  shutil.rmtree(os.path.join(wd, "transfer"))


@needs_fmnist
def test_missing_tfds_target_stops_before_any_training(tmp_path):
  from bssl import engine
  from bssl.configs import demo
  from bssl.data import sources

  cfg = demo.get_config("tiny")
  cfg.stages = "baseline,teacher,score,select,pretrain,finetune,transfer"
  cfg.transfer.target = "tfds"
  cfg.transfer.tfds_data_dir = str(tmp_path / "tfds")
  with pytest.raises(
      sources.DataError, match="tfds build caltech_birds2011.*transfer.tfds_data_dir"
  ):
    engine.run_recipe(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "baseline")
