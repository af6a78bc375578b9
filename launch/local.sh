#!/usr/bin/env bash
# N CPU processes of bssl on this machine as N hosts (tests, laptops): the supervisor is
# bssl/cli/local.py; `launch/local.sh --help` lists its flags. Same as
#   python -m bssl.cli.local [flags] -- PROGRAM_ARGS...
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m bssl.cli.local "$@"
