"""Semi-weakly supervised recipe on Fashion-MNIST, offline (the paper's best setting, at
demo scale): the teacher is first pre-trained on weakly labelled images, then fine-tuned
on D; the student is built from it as usual.

Weak labels: U's 54,800 images carry synthetic hashtag-like tags drawn from their hidden
labels (``bssl/data/weak.py``): 50 tags, 3 "synonyms" per class plus 20 tags of no class;
an image carries one of its class's tags with probability 0.7 (a second with 0.23), and 0-2
tags drawn uniformly from the whole vocabulary. So tags are informative but noisy, several
name one class, many name none, and 30% of the images carry no tag of their class. The
teacher (the demo's small ResNet) is pre-trained on them, images drawn by square-root tag
frequency, with softmax cross-entropy against 1/k on each of an image's k tags; then
fine-tuned on D (200 labels) with a new 10-class head. Everything else is the demo's
(``configs/demo.py``): D, validation split, baseline, K = 5,000, P = 2, student schedule.

The comparison without weak pre-training is the demo itself (its teacher is the model
trained on D alone: the baseline), with the same seeds, hence the same D.

The stages include ``transfer`` (to scikit-learn's digits: fc-only and full fine-tuning
of the baseline, the weak teacher and the student).

Presets: ``tiny`` (seconds, for tests). Seeds: ``--config.seed=N`` (other labelled subsets
and initialisations; with ``tiny`` too).
"""

import os
import sys

from bssl import config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs/ (loaded by path)
import demo


def get_config(arg: str | None = None):
  presets = config.presets(arg, accepted=("tiny",))
  c = demo.get_config("tiny" if "tiny" in presets else None)
  c.name = "semiweak"
  c.stages = ",".join(config.ALL_STAGES)
  config.override(
      c.weak,
      kind="synthetic",
      synonyms_per_class=3,
      distractors=20,
      p_class_tag=0.7,
      max_noise_tags=2,
      resample="sqrt",
  )
  model_kwargs = dict(c.baseline.model_kwargs)
  # Weak pre-training: 2,000 steps at batch 128 (~4.7 passes over the tagged images).
  demo.train_stage(c.weak_pretrain, model_kwargs, steps=2000, lr=0.2, batch_size=128)
  # The teacher: the weakly supervised model with a new head, fine-tuned on D.
  demo.train_stage(
      c.teacher, model_kwargs, steps=300, lr=0.02, batch_size=32, init_from="weak_pretrain"
  )
  if "tiny" in presets:
    c.transfer.ft_steps, c.transfer.ft_batch_size = 4, 32
    for s in ("weak_pretrain", "teacher"):
      c[s].steps = 6
      c[s].batch_size = 32
      c[s].log_every = 2
      c[s].checkpoint_every = 3
  return c
