#!/usr/bin/env bash
# Makes .venv-torchvision: the torchvision pipeline that benchmarks/input.py measures bssl's
# input against (ImageFolder + DataLoader). A separate environment because PyPI's
# torchvision wheels link against PyPI's (CUDA) torch, not the CPU build bssl installs
# (torchvision 0.28.0 with torch 2.13.0+cpu fails at import: "operator torchvision::nms
# does not exist"). ~5.5 GB (the CUDA libraries come along, unused here), ~75 s on this
# project's VM. Pillow and numpy at bssl's own pins, so both sides decode with the same
# libjpeg. Not needed by bssl or its tests.
#   bash benchmarks/torchvision_env.sh     (env: PYTHON=python3.X, TV_VENV=DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${TV_VENV:-.venv-torchvision}"
pillow=$(grep -E '^pillow==' requirements.txt)
numpy=$(grep -E '^numpy==' requirements.txt)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.14.0 torchvision==0.29.0 "$pillow" "$numpy"
"$VENV/bin/python" -c "import torch, torchvision, PIL; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'pillow', PIL.__version__)"
echo "benchmarks/input.py finds $VENV by itself (or pass --torchvision_python=$VENV/bin/python)"
