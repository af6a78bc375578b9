#!/usr/bin/env bash
# Installs what bssl needs on a fresh Debian/Ubuntu machine with Python 3.11:
# the Fashion-MNIST package (the offline default data set) and the pinned Python
# requirements. --dev adds pytest and the CPU build of PyTorch (parity tests).
set -euo pipefail
cd "$(dirname "$0")"
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) echo "usage: bash setup.sh [--dev]"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg' (accepted: --dev)" >&2; exit 2 ;;
  esac
done

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "setup.sh: installing Debian's dataset-fashion-mnist"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PY="${PYTHON:-python3}"
reqs=(-r requirements.txt)
if [ "$dev" = 1 ]; then reqs=(-r requirements-dev.txt -r requirements-torch.txt); fi
"$PY" -m pip install -q --disable-pip-version-check "${reqs[@]}"
echo "setup.sh: done"
