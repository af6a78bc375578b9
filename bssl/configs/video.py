"""The paper's video recipe (Yalniz et al. 2019, Section 5, Kinetics-400): the same stages
as for images over clips of videos and R(2+1)D models (bssl/models/video.py).

D: the Kinetics-400 training videos (246k, 400 classes); test: its validation videos
(20k). Both are a folder of video files and a CSV in Kinetics' own format (``label,
youtube_id, time_start, time_end, split``; files ``<label>/<youtube_id>_<start:06d>_
<end:06d>.mp4``, as the common downloaders save them) or a CSV with ``path,label``
columns: ``--config.data.train_csv=<kinetics>/train.csv --config.data.test_csv=
<kinetics>/validate.csv [--config.data.video_dir=<kinetics>/videos]``. U: unlabelled
videos, a folder (searched recursively) or a file list: ``--config.unlabelled.path=...``.
Videos are decoded with PyAV, frames resized to a short side of 128 and cropped to 112.

Teacher R(2+1)D-34, student R(2+1)D-18 (torchvision's layout; ``r2plus1d_vmz_*`` for
the original one); K = 4,000 videos per class, P = 4; 10 uniformly spaced clips per
video, their softmax averaged (evaluation and scoring). The paper's teacher is weakly
supervised (pre-trained on 65M IG-Kinetics videos, 359 hashtags, clips of 32 frames,
then fine-tuned on Kinetics): convert its published PyTorch weights with ``python -m
bssl.convert --from_torch=<.pth> --model=r2plus1d_34 --out=<dir>`` and start the teacher
from them (``--config.teacher.init_from=<dir>``), or pre-train one here
(``--config.stages=weak_pretrain,...`` with ``weak.kind='tags_file'``). Schedules are our
reading (the paper does not restate them): clips of 32 frames at 112 px, global batch 256
(per-device BatchNorm), SGD momentum 0.9, lr 0.1 x batch/256 with warm-up, step decay.

Presets (``--config=configs/video.py:<preset>``):
  ``tiny``  the same code path on fake clips in seconds (tests).
  ``demo``  the offline video demo: moving Fashion-MNIST (bssl/data/video.py,
            MovingFashionSource). Each video is 16 frames of a garment moving left or right
            over a 32 x 32 canvas that wraps around, 1 or 2 px a frame; the class is the
            garment *and* its direction (20 classes), so a model that ignores time cannot
            tell half of each garment's classes apart (no single frame shows the direction).
            D: 25 videos per class (500); validation: 25 per class from the rest; U: the
            next 30,000 training videos, labels hidden; test: the 10k test videos. Clips of 8
            frames, 4 uniformly spaced clips per video in evaluation and scoring (4 clips
            of 8 cover a 16-frame video twice; the Kinetics setting takes 10 of longer
            videos). No horizontal flip (it would swap the direction, hence the class).
            Baseline = teacher = a small R(2+1)D (8/16/32 wide, one block a stage); K and
            P chosen on the validation split (docs/video.md).

Seeds: ``--config.seed=N`` (another D, initialisation and augmentation); the demo's other
seeds are ``:demo --config.seed=1`` and ``:demo --config.seed=2``.
"""

from bssl import config

KINETICS_MEAN = (110.2, 100.6, 96.0)  # torchvision's video normalisation x 255
KINETICS_STD = (58.7, 57.2, 57.6)


def train_stage(c, model, **extra):
  fields = dict(
      model=model,
      batch_size=256,
      schedule="step",
      bn_mode="per_device",
      checkpoint_every=2000,
      keep_checkpoints=3,
      dtype="bfloat16",
  )
  return config.override(c, **{**fields, **extra})


def get_config(arg: str | None = None):
  presets = config.presets(arg, accepted=("tiny", "demo"), seed_presets_were="demo")
  c = config.base()
  c.name = "video"
  c.num_threads = 16
  config.override(
      c.data,
      kind="video_folder",
      num_classes=400,
      image_size=112,
      channels=3,
      clip_len=32,
      frame_stride=1,
      num_clips=10,
      augment="pad_crop_flip",
      pad=0,
      mean=KINETICS_MEAN,
      std=KINETICS_STD,
      eval_batch_size=256,
  )
  c.unlabelled.kind = "video_list"

  train_stage(c.baseline, "r2plus1d_18", epochs=45.0, warmup_steps=2000)
  train_stage(c.teacher, "r2plus1d_34", epochs=45.0, warmup_steps=2000)
  config.override(c.score, batch_size=256, checkpoint_every=100)
  config.override(c.select, k=4000, p=4)
  train_stage(c.pretrain, "r2plus1d_18", epochs=10.0, warmup_steps=2000)
  train_stage(c.finetune, "r2plus1d_18", epochs=10.0, lr=0.01, step_boundaries=(1 / 2,))

  if "demo" in presets:
    c.name = "video_demo"
    c.num_threads = 1
    config.override(
        c.data,
        kind="moving_fashion_mnist",
        num_classes=20,
        image_size=32,
        channels=1,
        garment_size=20,
        video_frames=16,
        clip_len=8,
        frame_stride=1,
        num_clips=4,
        augment="pad_crop",
        pad=2,
        mean=(28.5,),
        std=(64.0,),
        labelled_per_class=25,
        val_per_class=25,
        eval_batch_size=200,
    )
    c.unlabelled.kind = "rest_of_train"
    c.unlabelled.limit = 30000
    small = dict(widths=(8, 16, 32), depths=(1, 1, 1), stem_mid=8, stem_stride=2)

    def demo_stage(s, steps, lr, batch_size, **extra):
      fields = dict(
          model="r2plus1d_small",
          model_kwargs=small,
          steps=steps,
          epochs=None,
          batch_size=batch_size,
          lr=lr,
          schedule="cosine",
          warmup_fraction=0.05,
          warmup_steps=None,
          nesterov=True,
          weight_decay=5e-4,
          bn_mode="sync",
          dtype="float32",
          log_every=100,
          checkpoint_every=500,
      )
      config.override(c[s], **{**fields, **extra})

    demo_stage("baseline", 1500, 0.1, 32)
    demo_stage("teacher", 0, 0.1, 32, init_from="baseline")
    demo_stage("pretrain", 1500, 0.1, 64)
    demo_stage("finetune", 200, 0.01, 64, warmup_fraction=0.0)
    config.override(c.score, batch_size=200, checkpoint_every=20)
    config.override(c.select, k=1000, p=2)
  if "tiny" in presets:
    c.num_threads = 1
    config.override(
        c.data,
        kind="fake_video",
        num_classes=4,
        image_size=16,
        channels=3,
        video_frames=6,
        clip_len=4,
        frame_stride=1,
        num_clips=3,
        pad=2,
        augment="pad_crop_flip",
        fake_train_size=48,
        fake_test_size=16,
        eval_batch_size=16,
    )
    config.override(c.unlabelled, kind="fake", size=64, limit=None)
    tiny = dict(
        model="r2plus1d_small",
        model_kwargs=dict(widths=(8, 16), depths=(1, 1), stem_mid=8, stem_stride=1),
        steps=4,
        epochs=None,
        batch_size=8,
        log_every=2,
        checkpoint_every=2,
        dtype="float32",
        warmup_steps=1,
        init_from=None,
    )
    for s in ("baseline", "teacher", "pretrain", "finetune"):
      c[s].update(tiny)
    c.teacher.model_kwargs = dict(tiny["model_kwargs"], depths=(2, 1))
    config.override(c.score, batch_size=16, checkpoint_every=2)
    config.override(c.select, k=8, p=2)
  return c
