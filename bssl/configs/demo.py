"""The whole recipe on Fashion-MNIST, offline, in minutes on a laptop CPU.

D: a class-balanced labelled subset of the training split (20 per class, 200 images); a
validation split (500 per class) carved from the rest of the training split for
choosing hyperparameters; U: the remaining training images (54,800) with labels hidden;
evaluation on the 10k test split. Baseline and student: a small ResNet (16/32/64, one
basic block per stage, 77.8k parameters). Teacher: the baseline itself (self-training,
``teacher.init_from='baseline'``): at 1,000 labels a deeper teacher was no better than
the baseline once both had a tuned learning rate (docs/demo.md).

Presets (``--config=configs/demo.py:<preset>``; combine with commas):
  ``tiny``   a few steps on a 2k-image subset, for tests (seconds).
  ``own_teacher`` a teacher trained on its own (the baseline's schedule and seed offset of
             its stage) instead of the baseline itself: for sweeping the teacher's capacity
             (``--sweep='teacher.model_kwargs=[...]'``).
  ``compare`` the schedule of ``python -m bssl.compare`` (JAX vs PyTorch, 3 seeds x 2
             frameworks on 2 CPU cores in well under 45 minutes), kept as it was measured:
             100 labels per class, a deeper teacher (2 blocks per stage) trained for its
             own 200 steps, baseline 200 steps, pre-training 300, fine-tuning 100, all at
             batch 64 and lr 0.05 (0.01 fine-tuning); U cut to its first 20,000 images,
             K = 1,000; 50 validation images per class.

Seeds: ``--config.seed=1`` (another labelled subset and initialisation).
"""

from bssl import config


def train_stage(c, model_kwargs, steps, lr, **extra):
  """The demo's training stage: SGD Nesterov, weight decay 5e-4, cosine with 5% warm-up."""
  fields = dict(
      model="resnet_small",
      model_kwargs=model_kwargs,
      steps=steps,
      epochs=None,
      batch_size=128,
      lr=lr,
      schedule="cosine",
      warmup_fraction=0.05,
      nesterov=True,
      weight_decay=5e-4,
      checkpoint_every=500,
  )
  return config.override(c, **{**fields, **extra})


def get_config(arg: str | None = None):
  presets = config.presets(arg, accepted=("tiny", "own_teacher", "compare"))
  c = config.base()
  c.name = "demo"
  config.override(
      c.data,
      kind="fashion_mnist",
      num_classes=10,
      image_size=28,
      channels=1,
      augment="pad_crop_flip",
      eval_transform="none",
      pad=2,
      mean=(72.94,),
      std=(90.02,),
      labelled_per_class=20,
      val_per_class=500,
      eval_batch_size=1000,
  )
  c.unlabelled.kind = "rest_of_train"

  small = dict(widths=(16, 32, 64), depths=(1, 1, 1), block="basic")
  deep = dict(widths=(16, 32, 64), depths=(2, 2, 2), block="basic")
  # Chosen on the validation split (docs/demo.md has every run): baseline batch 32 at lr
  # 0.2 for 3,200 steps (longer does not help); K = 5,000 and P = 2 (more, noisier
  # pseudo-labels beat fewer, cleaner ones); pre-training 1,000 steps; a gentle fine-tune
  # (lr 0.001, 100 steps) keeps what pre-training learnt.
  train_stage(c.baseline, small, steps=3200, lr=0.2, batch_size=32)
  train_stage(c.teacher, small, steps=0, lr=0.2, batch_size=32, init_from="baseline")
  # U is Fashion-MNIST's own training images: no copies of test images were put there,
  # and its garments are too alike for copy detection by pixels (half of the training
  # images correlate >= 0.95 with some test image: docs/webdataset.md), so not searched
  config.override(c.score, batch_size=1000, checkpoint_every=20, eval_copies="off")
  # and, for the same reason, no near-duplicate families within U collapsed (docs/webdataset.md)
  config.override(c.select, k=5000, p=2, near_duplicates="off")
  train_stage(c.pretrain, small, steps=1000, lr=0.2, batch_size=64)
  train_stage(c.finetune, small, steps=100, lr=0.001, batch_size=64, warmup_fraction=0.0)
  config.override(c.report, figure_classes=3, figure_images=8)

  if "own_teacher" in presets:
    train_stage(c.teacher, small, steps=3200, lr=0.2, batch_size=32, init_from=None)
  if "tiny" in presets:
    c.data.subset = 2000  # take the first 2000 training / 500 test images
    c.data.labelled_per_class = 10
    c.data.val_per_class = 10
    c.data.eval_batch_size = 80
    for s in ("baseline", "teacher", "pretrain", "finetune"):
      c[s].steps = 6 if c[s].steps else 0  # a teacher that is the baseline stays so
      c[s].batch_size = 32
      c[s].log_every = 2
      c[s].checkpoint_every = 3
    c.score.batch_size = 80
    c.score.checkpoint_every = 4
    c.select.k = 50
    c.select.p = 2
    c.transfer.ft_steps, c.transfer.ft_batch_size = 4, 32  # when transfer is asked for
  if "compare" in presets:
    c.data.labelled_per_class = 100
    c.data.val_per_class = 50
    train_stage(c.teacher, deep, steps=200, lr=0.05, batch_size=64, init_from=None)
    for s in ("baseline", "pretrain"):
      c[s].lr = 0.05
    c.finetune.lr = 0.01
    c.unlabelled.limit = 20000
    c.select.k = 1000
    c.select.p = 1
    for s, steps in (("baseline", 200), ("teacher", 200), ("pretrain", 300), ("finetune", 100)):
      c[s].steps = steps
      c[s].batch_size = 64
      c[s].log_every = 50
      c[s].checkpoint_every = 100
  return c
