"""Statistics over seeds, in one place: every report of bssl that shows "mean ± sd" over
repeated runs (a sweep's tables and figures, the JAX-vs-PyTorch comparison) computes it
here, so that the two cannot drift apart in what they call a standard deviation.

Seeds are independent replicates: the spread is the *sample* standard deviation
(``ddof=1``), undefined (NaN) for fewer than two values; two frameworks (or two settings)
agree when their mean difference is within two standard errors of that difference.
"""

from __future__ import annotations

import math

import numpy as np


def mean_std(values, single_std: float = float("nan")) -> tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``) of ``values``; the mean of no value
  is NaN, the deviation of fewer than two is ``single_std`` (NaN: undefined; a sweep's
  tables and error bars show 0)."""
  v = np.asarray(values, np.float64)
  n = len(v)
  return (
      float(v.mean()) if n else float("nan"),
      float(v.std(ddof=1)) if n > 1 else single_std,
  )


def summarize(values) -> dict:
  """``{"mean", "std", "n", "values"}`` of :func:`mean_std`, with the values themselves."""
  mean, std = mean_std(values)
  return {"mean": mean, "std": std, "n": len(values), "values": [float(x) for x in values]}


def agreement(a: dict, b: dict) -> dict:
  """b − a for two :func:`summarize` results, its standard error from the two seed
  spreads, ``sqrt(s_a²/n_a + s_b²/n_b)``, and the verdict: agree when |b − a| ≤ 2 SE (None
  with fewer than two values on a side). Also, when both have the same number of seeds,
  the paired view (same seed = same data and batches): the mean and standard error of the
  per-seed differences."""
  diff = b["mean"] - a["mean"]
  out: dict = {"diff": diff, "se": float("nan"), "agree": None}
  if a["n"] >= 2 and b["n"] >= 2:
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    out.update(se=se, agree=bool(abs(diff) <= 2 * se))
  if a["n"] == b["n"] >= 2:
    d = np.asarray(b["values"]) - np.asarray(a["values"])
    out["paired"] = {
        "mean_diff": float(d.mean()),
        "se": float(d.std(ddof=1) / math.sqrt(len(d))),
        "per_seed_diff": [float(x) for x in d],
    }
  return out


def jaccard(a, b) -> dict:
  """The Jaccard index of two sets given as integer arrays (e.g. D̂'s (id, class) rows)."""
  inter = len(np.intersect1d(a, b))
  union = len(np.union1d(a, b))
  return {
      "jaccard": inter / union if union else 1.0,
      "intersection": inter,
      "union": union,
      "rows_a": int(len(a)),
      "rows_b": int(len(b)),
  }
