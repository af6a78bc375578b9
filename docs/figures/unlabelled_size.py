"""docs/figures/unlabelled_size.png: the paired gain against |U|, with K fixed and with K
scaled with |U|, from the sweeps of docs/reproduction.md ("The size of U").

  python docs/figures/unlabelled_size.py runs/repro
"""

import json
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def gains(path, key=None, val=None):
  g = [
      100 * (p["top1"]["student"] - p["top1"]["baseline"])
      for p in json.load(open(path))["points"]
      if key is None or p["overrides"].get(key) == val
  ]
  return np.mean(g), np.std(g, ddof=1)


def main(root):
  sizes = [6850, 13700, 27400, 54800]
  fixed = [gains(f"{root}/u/sweep.json", "unlabelled.limit", v) for v in (6850, 13700, 27400, None)]
  scaled = [gains(f"{root}/u_scaled_{n}/sweep.json") for n in (6850, 13700, 27400)]
  scaled.append(gains(f"{root}/k/sweep.json", "select.k", 5000))
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  for data, label, style in (
      (fixed, "K = 5,000 fixed", "s--"),
      (scaled, "K = |U| / 11 (625 ... 5,000)", "o-"),
  ):
    ax.errorbar(
        sizes, [m for m, _ in data], yerr=[s for _, s in data], fmt=style, capsize=3, label=label
    )
  ax.axhline(0, color="gray", lw=0.8)
  ax.set_xscale("log")
  ax.set_xlabel("|U| (first N images of U)")
  ax.set_ylabel("student − baseline, same seed (points)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig("docs/figures/unlabelled_size.png", dpi=100)
  print(json.dumps({"fixed_k": fixed, "scaled_k": scaled}))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/repro")
