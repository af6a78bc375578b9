"""The demo on a planted U: the test accuracy a copy of the test set in U inflates, and
the honest one the evaluation-copy filter (``score.eval_copies``) gives back.

Why not Fashion-MNIST itself: its 28-px garments are centred silhouettes on black, so half
of its *training* images are as close to some test image as a transformed copy is
(docs/webdataset.md): no pixel filter can tell copies from look-alikes there. Here every
image is a Fashion-MNIST garment, tinted, at a random place on its own photo-like
background (``bssl.data.planted.scene``), 32x32 RGB: the class is still the garment's,
and, as with photos, two images share a background only if one is a copy of the other.

Data (``--root``): ``train/`` (D: 20 labelled images per class and 50 for validation are
carved from it), ``big/`` (600 per class: the strong teacher's labels), ``test/`` (2,000),
``u_clean/`` (20,000 other training garments) and ``u_planted/`` (the same 20,000 plus a
transformed copy of every test image: crop of up to 20% of the area, resized to 24..48 px,
mirror, brightness / contrast / saturation x0.85..1.15, JPEG quality 30..50).

Runs (``configs/demo.py`` on that data; ``bssl.main`` each, in ``--root/runs``):

- ``teacher``: a strong teacher, trained on ``big/`` (6,000 labels): the paper's teacher
  is much better than its student (a copy labelled by a teacher no better than the
  student would teach the student nothing it does not know);
- ``clean``: the recipe with that teacher (``teacher.init_from``, ``teacher.steps=0``),
  U = ``u_clean`` (the honest reference);
- ``planted_off``: U = ``u_planted``, ``score.eval_copies=off`` (the inflated figure);
- ``planted_exclude``: U = ``u_planted``, ``score.eval_copies=exclude`` (the filter).

    python benchmarks/inflation.py                 # ~20 min on this project's 2-core VM

Prints the table (student test top-1 of each run, D-hat's share of planted copies, the
copies the filter removed, clean images it removed); the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image

from bssl.data import planted, sources

SIZE = 32
PER_CLASS = {"train": 70, "big": 600, "test": 200}
U_CLEAN = 20_000


def composite(garment: np.ndarray, seed: int) -> np.ndarray:
  """A 28-px grey garment, tinted, at a random place on its own 32-px scene."""
  rng = np.random.default_rng([seed, 7])
  bg = planted.scene(seed, size=SIZE).astype(np.float32)
  m = garment[..., 0].astype(np.float32)[..., None] / 255.0
  tint = rng.uniform(0.5, 1.0, 3) * 255
  y, x = rng.integers(0, SIZE - 28 + 1, 2)
  out = bg.copy()
  out[y : y + 28, x : x + 28] = bg[y : y + 28, x : x + 28] * (1 - m) + m * tint
  return np.clip(out, 0, 255).astype(np.uint8)


def make_data(root: str, copies: int = 1) -> dict:
  if os.path.exists(os.path.join(root, "data.json")):
    return json.load(open(os.path.join(root, "data.json")))
  train, test = sources.load_fashion_mnist()
  rng = np.random.default_rng(0)
  order = rng.permutation(len(train))
  labels = train.labels
  used = 0

  def take(per_class):
    nonlocal used
    picked = {c: [] for c in range(10)}
    for i in order[used:]:
      used += 1
      c = int(labels[i])
      if len(picked[c]) < per_class:
        picked[c].append(int(i))
      if all(len(v) == per_class for v in picked.values()):
        break
    return picked

  seed = 0
  for split in ("train", "big"):
    for c, ids in take(PER_CLASS[split]).items():
      os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
      for i in ids:
        seed += 1
        Image.fromarray(composite(train.images[i], seed)).save(
            os.path.join(root, split, f"c{c}", f"{i:05d}.png")
        )
  test_imgs = []
  per = {c: 0 for c in range(10)}
  for i in range(len(test)):
    c = int(test.labels[i])
    if per[c] < PER_CLASS["test"]:
      per[c] += 1
      seed += 1
      img = composite(test.images[i], 1_000_000 + seed)
      os.makedirs(os.path.join(root, "test", f"c{c}"), exist_ok=True)
      Image.fromarray(img).save(os.path.join(root, "test", f"c{c}", f"{i:05d}.png"))
      test_imgs.append(img)
  for d in ("u_clean", "u_planted"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  rest = [int(i) for i in order[used : used + U_CLEAN]]
  u_labels = []
  for j, i in enumerate(rest):
    seed += 1
    name = f"a{j:06d}.png"
    Image.fromarray(composite(train.images[i], 2_000_000 + seed)).save(
        os.path.join(root, "u_clean", name)
    )
    os.symlink(os.path.join("..", "u_clean", name), os.path.join(root, "u_planted", name))
    u_labels.append(int(labels[i]))
  crng = np.random.default_rng(1)
  for j, img in enumerate(test_imgs):  # b* sort after a*: ids U_CLEAN.. are the copies
    for r in range(copies):  # the web holds some images many times over
      copy = planted.transform(img, crng, out_size=int(crng.integers(24, 49)))
      Image.fromarray(copy).save(os.path.join(root, "u_planted", f"b{j:06d}_{r}.jpg"), quality=95)
  big = np.stack(
      [
          np.asarray(Image.open(os.path.join(root, "big", c, f)))
          for c in sorted(os.listdir(os.path.join(root, "big")))
          for f in sorted(os.listdir(os.path.join(root, "big", c)))
      ]
  ).astype(np.float64)
  info = {
      "mean": [round(float(v), 2) for v in big.mean((0, 1, 2))],
      "std": [round(float(v), 2) for v in big.std((0, 1, 2))],
      "num_test": len(test_imgs),
      "u_clean": len(rest),
      "copies": copies,
  }
  json.dump(info, open(os.path.join(root, "data.json"), "w"))
  return info


def run(root: str, name: str, extra: list[str], info: dict) -> dict:
  wd = os.path.join(root, "runs", name)
  common = [
      "--config.data.kind=image_folder",
      f"--config.data.test_dir={root}/test",
      "--config.data.num_classes=10",
      "--config.data.channels=3",
      f"--config.data.image_size={SIZE}",
      "--config.data.augment=pad_crop_flip",
      "--config.data.eval_transform=none",
      "--config.data.val_per_class=50",
      "--config.data.mean=" + ",".join(map(str, info["mean"])),
      "--config.data.std=" + ",".join(map(str, info["std"])),
      "--config.data.eval_batch_size=500",
  ]
  cmd = [
      sys.executable,
      "-m",
      "bssl.main",
      "--config=configs/demo.py",
      f"--workdir={wd}",
      *common,
      *extra,
  ]
  t0 = time.time()
  log = open(os.path.join(root, f"{name}.log"), "a")
  r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
  if r.returncode:
    raise SystemExit(f"{name}: exit {r.returncode}; see {root}/{name}.log")
  print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)
  return (
      json.load(open(os.path.join(wd, "report", "results.json")))
      if os.path.exists(os.path.join(wd, "report", "results.json"))
      else {}
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--root", default="runs/inflation")
  ap.add_argument("--copies", type=int, default=1, help="copies of each test image in U")
  ap.add_argument("--seed", type=int, default=0, help="the recipe runs' config.seed")
  ap.add_argument(
      "--runs", default="clean,planted_off,planted_exclude", help="which of the three recipe runs"
  )
  ap.add_argument(
      "--pretrain_steps",
      type=int,
      default=None,
      help="the student's pre-training length (demo: 1,000 steps of 64)",
  )
  ap.add_argument(
      "--teacher",
      default=None,
      help="a strong teacher's final/ folder from an earlier run (else trained)",
  )
  a = ap.parse_args()
  root = os.path.abspath(a.root)
  t0 = time.time()
  info = make_data(root, a.copies)
  print(f"data in {root}: {time.time() - t0:.0f} s", flush=True)
  if a.teacher is None:
    run(
        root,
        "teacher",
        [
            f"--config.data.train_dir={root}/big",
            "--config.data.labelled_per_class=550",
            "--config.stages=baseline",
            "--config.unlabelled.kind=image_folder",
            f"--config.unlabelled.path={root}/u_clean",
        ],  # not read: no score
        info,
    )
  teacher = a.teacher or os.path.join(root, "runs", "teacher", "baseline", "final")
  recipe = [
      f"--config.data.train_dir={root}/train",
      "--config.data.labelled_per_class=20",
      f"--config.teacher.init_from={teacher}",
      "--config.teacher.steps=0",
      "--config.unlabelled.kind=image_folder",
      "--config.select.k=1500",
      f"--config.seed={a.seed}",
  ]
  if a.pretrain_steps:
    recipe.append(f"--config.pretrain.steps={a.pretrain_steps}")
  res = {}
  for name, u, ec in (
      ("clean", "u_clean", "off"),
      ("planted_off", "u_planted", "off"),
      ("planted_exclude", "u_planted", "exclude"),
  ):
    if name not in a.runs.split(","):
      continue
    res[name] = run(
        root,
        name,
        recipe + [f"--config.unlabelled.path={root}/{u}", f"--config.score.eval_copies={ec}"],
        info,
    )
  out = {}
  from bssl import selection

  for name, r in res.items():
    sel = selection.read_selection(os.path.join(root, "runs", name, "select", "dhat"), mmap=False)
    copies_in_dhat = int((sel.ids >= info["u_clean"]).sum())
    row = {
        "baseline": r["baseline"]["top1"],
        "teacher": r["teacher"]["top1"],
        "student": r["student"]["top1"],
        "gain": r["gain_top1"],
        "dhat": len(sel.ids),
        "copies_in_dhat": copies_in_dhat,
    }
    ec = os.path.join(root, "runs", name, "select", "eval_copies.json")
    if os.path.exists(ec):
      removed = [c for c in json.load(open(ec)) if c["removed"]]
      ids = np.array([c["id"] for c in removed], np.int64)
      row["copies_removed"] = int((ids >= info["u_clean"]).sum())
      row["clean_removed"] = int((ids < info["u_clean"]).sum())
    out[name] = row
  print(
      "\n| U | filter | baseline | teacher | student | gain | D̂ | planted copies in D̂ "
      "| copies removed | clean images removed |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, row in out.items():
    u = (
        "clean"
        if name == "clean"
        else (
            f"+ {info['copies']} cop{'y' if info['copies'] == 1 else 'ies'} of each of the "
            f"{info['num_test']:,} test images"
        )
    )
    f = "exclude" if name.endswith("exclude") else "off"
    print(
        f"| {u} | {f} | {100 * row['baseline']:.2f} | {100 * row['teacher']:.2f} | "
        f"**{100 * row['student']:.2f}** | {100 * row['gain']:+.2f} | {row['dhat']:,} | "
        f"{row['copies_in_dhat']:,} | {row.get('copies_removed', '–')} | "
        f"{row.get('clean_removed', '–')} |"
    )
  if "planted_off" in out and "clean" in out:
    out["inflation_points"] = round(
        100 * (out["planted_off"]["student"] - out["clean"]["student"]), 2
    )
  if "planted_exclude" in out and "clean" in out:
    out["filtered_minus_clean_points"] = round(
        100 * (out["planted_exclude"]["student"] - out["clean"]["student"]), 2
    )
  print(json.dumps(out))


if __name__ == "__main__":
  main()
