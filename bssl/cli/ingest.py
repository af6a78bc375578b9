"""Ingest U once: ``bssl-ingest --input=<folder | file list | tar shards>
--out=<dir | gs://...>`` (= ``python -m bssl.ingest``).

Turns the image files of U, or WebDataset tar shards (img2dataset, LAION, DataComp: a
``.tar``, a folder of them, a brace pattern ``shards/{00000..00127}.tar`` or a list; see
bssl/data/webdataset.py), into ArrayRecord shards of JPEGs re-encoded with a short side
of ``--short_side`` (256), plus a manifest (id -> original path, size, content hash), the
list of bad files with their reasons and the exact duplicates (see bssl/data/ingest.py).
Then score from the shards with ``--config.unlabelled.kind=shards
--config.unlabelled.path=<out>``.

Several processes or hosts split the shards: ``--process_index``/``--process_count``
(defaults from ``BSSL_PROCESS_ID``/``BSSL_NUM_PROCESSES``, which ``launch/local.sh
--module bssl.ingest`` sets). Rerunning the same command after a kill writes only the
missing shards; an input file changed since a finished shard was made from it is refused
(exit 2, naming it: use another --out, or delete it), so an --out never mixes two versions
of the input. The same command on a complete --out with unchanged input (the folder moved,
or given as a file list, included) says "already complete" after one stat per file (the
files' MD5s are cached, bssl/fileid.py). Exit codes: 0 done, 2 a user error (one line on
stderr).
"""

import os

from absl import flags

from bssl.cli import common
from bssl.data import ingest

_INPUT = flags.DEFINE_string(
    "input",
    None,
    "A folder of images (searched recursively, "
    "symlinks followed) or a text file with one path per line; or "
    "WebDataset tar shards: a .tar, a folder of them, a brace "
    "pattern (shards/{00000..00127}.tar) or a list of them; local "
    "or gs://.",
)
_OUT = flags.DEFINE_string("out", None, "Output folder (local or gs://).")
_SHORT = flags.DEFINE_integer(
    "short_side",
    256,
    "Stored images: short side in pixels " "(larger images are scaled down; smaller ones kept).",
)
_QUALITY = flags.DEFINE_integer("quality", 90, "JPEG quality of the stored images.")
_SHARD = flags.DEFINE_integer(
    "shard_size",
    4096,
    "Images per shard (image files; tar " "input keeps one output shard per input tar).",
)
_PH = flags.DEFINE_integer(
    "placeholder_min",
    100,
    "Images sharing one content hash that "
    "make it a placeholder (a dead link's image): all of them are "
    "listed as bad. 0: off.",
)
_EXT = flags.DEFINE_string(
    "extensions",
    ",".join(e[1:] for e in ingest.EXTENSIONS),
    "File extensions taken from a folder, comma-separated; '*' takes " "every file.",
)
_PI = flags.DEFINE_integer(
    "process_index", None, "This process's index (default " "$BSSL_PROCESS_ID or 0)."
)
_PC = flags.DEFINE_integer(
    "process_count", None, "Number of processes (default " "$BSSL_NUM_PROCESSES or 1)."
)


PROG = "bssl.ingest"


def main(argv):
  del argv  # (positional arguments are refused by common.run)
  if not _INPUT.value:
    common.fail("--input is required: a folder of images or a file list")
  if not _OUT.value:
    common.fail("--out is required: an output folder (local or gs://)")
  pi = _PI.value if _PI.value is not None else int(os.environ.get("BSSL_PROCESS_ID", 0))
  pc = _PC.value if _PC.value is not None else int(os.environ.get("BSSL_NUM_PROCESSES", 1))
  ext = (
      None
      if _EXT.value.strip() == "*"
      else tuple("." + e.strip().lstrip(".").lower() for e in _EXT.value.split(",") if e.strip())
  )
  params = ingest.Params(
      short_side=_SHORT.value,
      quality=_QUALITY.value,
      shard_size=_SHARD.value,
      placeholder_min=_PH.value,
  )
  try:
    # processes run together: each finds the duplicates of its part of the hashes
    ingest.run_ingest(
        _INPUT.value,
        _OUT.value,
        params,
        process_index=pi,
        process_count=pc,
        extensions=ext,
        log=lambda m: print(m, flush=True),
        wait_for_others=True,
    )
  except NotADirectoryError as e:
    common.fail(f"--out: {e}")


def run():
  """The ``bssl-ingest`` console command (= ``python -m bssl.ingest``)."""
  common.run(main, prog=PROG, errors=(ingest.IngestError,))


if __name__ == "__main__":
  run()
