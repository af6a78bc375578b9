#!/usr/bin/env bash
# Sets bssl up on a fresh Debian/Ubuntu machine: Debian's dataset-fashion-mnist (the
# offline demo's data), then a virtual environment (.venv, or $BSSL_VENV) with bssl
# installed in it (editable) at the pinned versions of requirements.txt. --dev adds the
# test extras (requirements-dev.txt) and PyTorch (requirements-torch.txt; pip takes a CPU
# build where one is on disk, as here for Python 3.11, else PyPI's default build).
# The environment is bssl's own: a system Python that forbids installs (PEP 668) is not
# touched. Python: $PYTHON, else python3; 3.11, 3.12 and 3.13 are supported.
set -euo pipefail
cd "$(dirname "$0")"
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) echo "usage: bash setup.sh [--dev]   (env: PYTHON=python3.X, BSSL_VENV=DIR)"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg' (accepted: --dev)" >&2; exit 2 ;;
  esac
done
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup.sh: installing Debian's dataset-fashion-mnist"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || { echo "setup.sh: no '$PY' on the PATH (set PYTHON)" >&2; exit 2; }
ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
case "$ver" in
  3.11|3.12|3.13) ;;
  *) echo "setup.sh: $PY is Python $ver; bssl supports 3.11, 3.12 and 3.13 (set PYTHON)" >&2; exit 2 ;;
esac

VENV="${BSSL_VENV:-.venv}"
if [ -x "$VENV/bin/python" ]; then
  have=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  if [ "$have" != "$ver" ]; then
    if [ ! -e "$VENV/.made-by-bssl-setup" ]; then
      echo "setup.sh: $VENV is Python $have, not $ver, and was not made by setup.sh: not touching it (set BSSL_VENV or PYTHON)" >&2
      exit 2
    fi
    echo "setup.sh: $VENV is Python $have, $PY is $ver: making it anew"
    rm -rf "$VENV"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup.sh: creating the virtual environment $VENV (Python $ver)"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"  # Debian/Ubuntu ship venv's ensurepip apart
    echo "setup.sh: installing python$ver-venv"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "python$ver-venv" || $SUDO apt-get install -y -qq python3-venv
    "$PY" -m venv "$VENV"
  fi
  touch "$VENV/.made-by-bssl-setup"
fi

reqs=(-r requirements.txt)
if [ "$dev" = 1 ]; then reqs+=(-r requirements-dev.txt -r requirements-torch.txt); fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${reqs[@]}"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
echo "setup.sh: done; run bssl with $VENV/bin/python -m bssl.main (or $VENV/bin/bssl), or" \
     "'source $VENV/bin/activate' first"
