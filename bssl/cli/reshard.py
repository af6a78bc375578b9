"""Write D̂'s images out as WebDataset tar shards: ``bssl-reshard --workdir=<a run's work
directory> --out=<folder, local or gs://>`` (= ``python -m bssl.reshard``).

One sample per selected image, ``--shard_size`` per ``dhat-<n>.tar``; a rerun after a
kill writes only the missing shards (bssl/stages/reshard.py says what a sample holds).
Exit codes: 0 done, 2 a user error (one line on stderr).
"""

import sys

from absl import flags

from bssl.cli import common
from bssl.stages import reshard

PROG = "bssl.reshard"
_WORKDIR = common.define_workdir_flag()
_OUT = flags.DEFINE_string("out", None, "Output folder for the tar shards (local or gs://).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 10_000, "Images per tar shard.")


def _main(argv) -> int:
  del argv  # (positional arguments are refused by common)
  missing = [f"--{f.name}" for f in (_WORKDIR, _OUT) if not f.value]
  if missing:
    common.fail(f"the following arguments are required: {', '.join(missing)}")
  try:
    reshard.reshard(
        _WORKDIR.value, _OUT.value, _SHARD_SIZE.value, log=lambda m: print(m, flush=True)
    )
  except (reshard.ReshardError, FileNotFoundError, ValueError) as e:
    common.fail(" ".join(str(e).split())[:800])
  return 0


def main(argv=None) -> int:
  """In-process: ``argv`` without the program name; 0 done, else SystemExit."""
  return common.call(_main, sys.argv[1:] if argv is None else argv, prog=PROG, errors=())


def run():
  """The ``bssl-reshard`` console command (= ``python -m bssl.reshard``)."""
  common.run(_main, prog=PROG, errors=())


if __name__ == "__main__":
  run()
