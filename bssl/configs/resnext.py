"""The paper's ImageNet recipe (Yalniz et al. 2019, semi-supervised setting).

D: ImageNet-1k train (TFDS ``imagenet2012``, ArrayRecord; manual download, see
docs/scale.md, "The paper's recipe at ImageNet scale"); test: ImageNet val (50k). U: ingested
once into shards (``python -m bssl.ingest --input=<folder or file list> --out=<dir>``,
YFCC100M-like; set ``--config.unlabelled.path=<dir>``; ``--config.unlabelled.kind=
image_folder`` reads a folder or list of original files directly instead). Teacher
ResNeXt-101 32x48d, student ResNet-50; K = 16,000 images per class, P = 10; global batch
1536 (the paper's 64 GPUs x 24), SGD momentum 0.9, weight decay 1e-4, lr 0.1 x batch/256
with linear warm-up, BatchNorm statistics per device.

Schedules below are our reading of the paper: the student is pre-trained on D̂ for
"many iterations" (1B images processed in the paper's main setting: 651k steps at
batch 1536), then fine-tuned on D for 30 epochs; the teacher and the baseline are
trained on D with the standard 90-epoch step schedule (decay 0.1 at epochs 30/60/80).

Presets: ``:tiny`` runs the same code path (fake data, grouped bottleneck blocks,
random-resized crops, per-device BatchNorm) in seconds, for tests.
"""

from bssl import config

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def train_stage(c, model, **extra):
  # The base config's training defaults are the paper's where it has one: lr None (the
  # linear scaling rule 0.1 x batch / 256), momentum 0.9 without Nesterov, weight decay
  # 1e-4, step decay 0.1 at 1/3, 2/3 and 8/9 of the run (epochs 30, 60, 80 of 90).
  fields = dict(
      model=model,
      batch_size=1536,
      schedule="step",
      bn_mode="per_device",
      checkpoint_every=2000,
      keep_checkpoints=3,
      dtype="bfloat16",
  )
  return config.override(c, **{**fields, **extra})


def get_config(arg: str | None = None):
  presets = config.presets(arg, accepted=("tiny", "swsl"))
  c = config.base()
  c.name = "resnext"
  c.num_threads = 16
  # decode + augment in worker processes (no GIL between them; benchmarks/input.py),
  # as many as this process's cores minus one (11 in a Slurm task of 12 CPUs)
  c.num_workers = -1
  config.override(
      c.data,
      kind="tfds",
      tfds_name="imagenet2012",
      train_split="train",
      test_split="validation",
      num_classes=1000,
      image_size=224,
      channels=3,
      augment="random_resized_crop_flip",
      eval_transform="resize_center_crop",
      pad=0,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      eval_batch_size=1536,
  )
  c.unlabelled.kind = "shards"  # U ingested once: python -m bssl.ingest --input=... --out=...

  train_stage(c.baseline, "resnet50", epochs=90.0, warmup_steps=5 * 834)
  train_stage(c.teacher, "resnext101_32x48d", epochs=90.0, warmup_steps=5 * 834)
  config.override(c.score, batch_size=3072, checkpoint_every=500, num_workers=-1)
  config.override(c.select, k=16000, p=10)
  train_stage(c.pretrain, "resnet50", steps=651_042, warmup_steps=5 * 834)
  train_stage(
      c.finetune, "resnet50", epochs=30.0, lr=0.1 * 1536 / 256 / 10, step_boundaries=(1 / 3, 2 / 3)
  )

  if "swsl" in presets:
    # Semi-weakly supervised (the paper's best setting, the released *_swsl weights): the
    # teacher resnext101_32x48d is first pre-trained on a tagged U (IG-1B-Targeted in the
    # paper: 940M images, 1.5k hashtags; here: an ingest plus a tags file, see docs/scale.md,
    # "U at scale", and docs/semiweak.md), then fine-tuned on ImageNet; the student is
    # selected from U as usual.
    # Our readings: one pass over the tagged images with square-root tag resampling (the
    # WSL paper's resampling; its schedule is not restated in this paper), fine-tuning of
    # the teacher for 30 epochs at a tenth of the base lr, K = 64,000 per class (64M
    # images selected from 940M in the paper's semi-weak setting, over 1,000 classes).
    c.stages = (
        ",".join(config.ALL_STAGES[: config.ALL_STAGES.index("transfer")]) + ",evaluate,report"
    )
    config.override(c.weak, kind="tags_file", resample="sqrt")
    train_stage(c.weak_pretrain, "resnext101_32x48d", epochs=1.0, warmup_steps=5 * 834)
    train_stage(
        c.teacher,
        "resnext101_32x48d",
        epochs=30.0,
        lr=0.1 * 1536 / 256 / 10,
        step_boundaries=(1 / 3, 2 / 3),
        init_from="weak_pretrain",
    )
    c.select.k = 64000
  if "tiny" in presets:
    c.num_threads, c.num_workers, c.score.num_workers = 1, 0, 0
    config.override(
        c.data,
        kind="fake",
        num_classes=5,
        image_size=32,
        fake_train_size=160,
        fake_test_size=40,
        eval_batch_size=40,
    )
    config.override(c.unlabelled, kind="fake", size=200)
    # Grouped bottleneck blocks as in ResNeXt: 4 groups of 4 channels, so the bottleneck
    # width (width_per_group x groups x width / 64) is whole at these small widths.
    tiny = dict(
        model="resnet_small",
        model_kwargs=dict(
            widths=(16, 32), depths=(1, 1), block="bottleneck", groups=4, width_per_group=16
        ),
        steps=4,
        epochs=None,
        batch_size=16,
        log_every=2,
        checkpoint_every=2,
        dtype="float32",
        warmup_steps=1,
    )
    for s in ("baseline", "teacher", "pretrain", "finetune"):
      c[s].update(tiny)
    c.teacher.model_kwargs = dict(tiny["model_kwargs"], depths=(2, 2))
    config.override(c.score, batch_size=40, checkpoint_every=2)
    config.override(c.select, k=20, p=2)
  return c
