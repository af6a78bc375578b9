"""PyTorch <-> Flax weights: ``bssl-convert`` (= ``python -m bssl.convert``).

  bssl-convert --from_torch=ckpt.pth --model=resnet50 --out=DIR [--num_classes=N]
  bssl-convert --to_torch=DIR --model=resnet50 --out=ckpt.pth

DIR is an orbax StandardCheckpointer checkpoint of {'params', 'batch_stats'} (with
``bssl_convert.json``: the model and its kwargs, so ``--to_torch`` needs no --model);
``--to_torch=<workdir>/<stage>`` reads a stage's variables and its model from the work
directory's config.json. The mapping is bssl/backends/convert.py. Exit codes: 0 done, 2 a
user error (a bad checkpoint, a mismatched model, an existing --out: one line on stderr).
"""

import json
import os
import sys

from absl import flags

from bssl import models
from bssl.backends import convert
from bssl.cli import common

PROG = "bssl.convert"
_ERRORS = (
    ValueError,
    KeyError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

_FROM_TORCH = flags.DEFINE_string("from_torch", None, "PyTorch state_dict (CKPT.pth) to convert.")
_TO_TORCH = flags.DEFINE_string("to_torch", None, "Converted (orbax) checkpoint DIR to export.")
_MODEL = flags.DEFINE_string(
    "model",
    None,
    f"Architecture, one of: {', '.join(models.MODEL_NAMES)} "
    "(default for --to_torch: the one recorded in DIR).",
)
_OUT = flags.DEFINE_string("out", None, "Output orbax directory (from_torch) or .pth file.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "Default: read off fc.")
_MODEL_KWARGS = flags.DEFINE_string(
    "model_kwargs",
    None,
    "JSON of model kwargs, e.g. '{\"depths\": [2, 2, 2]}' for resnet_small.",
)


def _convert() -> int:
  if not _FROM_TORCH.value and not _TO_TORCH.value:
    common.fail("one of the arguments --from_torch --to_torch is required")
  if _FROM_TORCH.value and _TO_TORCH.value:
    common.fail("argument --to_torch: not allowed with argument --from_torch")
  if not _OUT.value:
    common.fail("the following arguments are required: --out")
  try:
    kwargs = json.loads(_MODEL_KWARGS.value) if _MODEL_KWARGS.value else None
  except json.JSONDecodeError as e:
    common.fail(f"--model_kwargs: not JSON ({e}): {_MODEL_KWARGS.value!r}")
  names = models.MODEL_NAMES
  if _MODEL.value and _MODEL.value not in names:
    common.fail(f"--model: unknown architecture {_MODEL.value!r}; one of: {', '.join(names)}")

  out = _OUT.value
  if _FROM_TORCH.value:
    model = _MODEL.value
    if not model:
      common.fail("--model is required with --from_torch")
    kwargs = kwargs or {}
    variables = convert.torch_state_dict_to_flax(
        convert.load_torch_checkpoint(_FROM_TORCH.value), model, _NUM_CLASSES.value, **kwargs
    )
    num_classes = variables["params"]["fc"]["kernel"].shape[1]
    convert.save_converted(
        variables,
        out,
        info=dict(
            model=model,
            num_classes=int(num_classes),
            model_kwargs=kwargs,
            source=os.path.abspath(_FROM_TORCH.value),
        ),
    )
    n = models.count_params(variables["params"])
    print(f"wrote {out}: {model}, {num_classes} classes, {n:,} parameters")
  else:
    import torch

    info = convert.converted_info(_TO_TORCH.value)
    model = _MODEL.value or info.get("model")
    if not model:
      common.fail("--model is required: the checkpoint does not record one")
    kwargs = kwargs if kwargs is not None else (info.get("model_kwargs") or {})
    sd = convert.flax_to_torch_state_dict(
        convert.load_converted(info.get("variables", _TO_TORCH.value)),
        model,
        _NUM_CLASSES.value,
        **kwargs,
    )
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, out)
    print(f"wrote {out}: {model}, {len(sd)} tensors")
  return 0


def _main(argv) -> int:
  del argv  # (positional arguments are refused by common)
  try:
    return _convert()
  except _ERRORS as e:  # one line, at most 800 characters (a model's missing keys)
    common.fail(" ".join(str(e).split())[:800])


def main(argv=None) -> int:
  """In-process (tests): ``argv`` without the program name; 0 done, else SystemExit."""
  return common.call(_main, sys.argv[1:] if argv is None else argv, prog=PROG, errors=())


def run():
  """The ``bssl-convert`` console command (= ``python -m bssl.convert``)."""
  common.run(_main, prog=PROG, errors=())


if __name__ == "__main__":
  run()
