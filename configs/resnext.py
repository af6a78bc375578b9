"""The paper's ImageNet recipe (Yalniz et al. 2019, semi-supervised setting).

D: ImageNet-1k train (TFDS ``imagenet2012``, ArrayRecord; manual download, see
README "Preparing ImageNet"); test: ImageNet val (50k). U: an image folder or a file
list (YFCC100M-like; set ``--config.unlabelled.path``). Teacher ResNeXt-101 32x48d,
student ResNet-50; K = 16,000 images per class, P = 10; global batch 1536 (the
paper's 64 GPUs x 24), SGD momentum 0.9, weight decay 1e-4, lr 0.1 x batch/256 with
linear warm-up, BatchNorm statistics per device.

Schedules below are our reading of the paper: the student is pre-trained on D̂ for
"many iterations" (1B images processed in the paper's main setting: 651k steps at
batch 1536), then fine-tuned on D for 30 epochs; the teacher and the baseline are
trained on D with the standard 90-epoch step schedule (decay 0.1 at epochs 30/60/80).

Presets: ``:tiny`` runs the same code path (TFDS-style fake data, grouped
bottleneck blocks, random-resized crops, per-device BatchNorm) in seconds, for tests.
"""
import ml_collections

from bssl import config_lib

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def train_stage(model, **extra):
  # config_lib.train_stage's defaults are the paper's where it has one: lr None (the
  # linear scaling rule 0.1 x batch / 256), momentum 0.9 without Nesterov, weight decay
  # 1e-4, step decay 0.1 at 1/3, 2/3 and 8/9 of the run (epochs 30, 60, 80 of 90).
  fields = dict(batch_size=1536, schedule="step", bn_mode="per_device",
                checkpoint_every=2000, keep_checkpoints=3, dtype="bfloat16")
  return config_lib.train_stage(model, **{**fields, **extra})


def get_config(arg: str | None = None):
  presets = set(filter(None, (arg or "").split(",")))
  c = ml_collections.ConfigDict()
  c.name = "resnext"
  c.seed = 0
  c.stages = "baseline,teacher,score,select,pretrain,finetune,evaluate,report"
  c.mesh_shape = ()
  c.num_threads = 16
  c.side_baseline = False

  c.data = ml_collections.ConfigDict(dict(
      kind="tfds", tfds_name="imagenet2012", tfds_data_dir=config_lib.optional(str),
      train_split="train", test_split="validation", val_split=config_lib.optional(str),
      num_classes=1000, image_size=224, channels=3, augment="random_resized_crop_flip",
      eval_transform="resize_center_crop", pad=0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
      labelled_per_class=config_lib.optional(int), val_per_class=config_lib.optional(int),
      subset=config_lib.optional(int), eval_batch_size=1536, fake_train_size=0,
      fake_test_size=0))
  c.unlabelled = ml_collections.ConfigDict(dict(
      kind="image_folder", path=config_lib.optional(str), limit=config_lib.optional(int), size=0,
      tfds_name=config_lib.optional(str), split=config_lib.optional(str)))

  c.baseline = train_stage("resnet50", epochs=90, warmup_steps=5 * 834)
  c.teacher = train_stage("resnext101_32x48d", epochs=90, warmup_steps=5 * 834)
  c.score = ml_collections.ConfigDict(dict(batch_size=3072, checkpoint_every=500))
  c.select = ml_collections.ConfigDict(dict(k=16000, p=10))
  c.pretrain = train_stage("resnet50", steps=651_042, warmup_steps=5 * 834)
  c.finetune = train_stage("resnet50", epochs=30, lr=0.1 * 1536 / 256 / 10,
                           step_boundaries=(1 / 3, 2 / 3))
  c.report = ml_collections.ConfigDict(dict(figure_classes=3, figure_images=8))

  if "tiny" in presets:
    c.num_threads = 1
    c.data.update(dict(kind="fake", num_classes=5, image_size=32, fake_train_size=160,
                       fake_test_size=40, eval_batch_size=40))
    c.unlabelled.update(dict(kind="fake", size=200))
    tiny = dict(model="resnet_small",
                model_kwargs=dict(widths=(8, 16), depths=(1, 1), block="bottleneck",
                                  groups=4, width_per_group=4),
                steps=4, epochs=None, batch_size=16, log_every=2, checkpoint_every=2,
                dtype="float32", warmup_steps=1)
    for s in ("baseline", "teacher", "pretrain", "finetune"):
      c[s].update(tiny)
    c.teacher.model_kwargs = dict(widths=(8, 16), depths=(2, 2), block="bottleneck",
                                  groups=4, width_per_group=4)
    c.score.batch_size = 40
    c.score.checkpoint_every = 2
    c.select.update(dict(k=20, p=2))
  unknown = presets - {"tiny"}
  if unknown:
    raise ValueError(f"unknown preset(s) {sorted(unknown)}; accepted: tiny")
  return c
