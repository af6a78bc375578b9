#!/usr/bin/env bash
# Fetches, here, the wheels bssl needs on the lent GPU machine and that its image lacks
# (it has jax/jaxlib with CUDA, flax, optax, orbax, torch, torchvision, pillow, numpy,
# pyarrow; nothing can be fetched there): grain and its array_record and portpicker,
# ml_collections, simplejpeg, tensorboardX, av; for its Python 3.12. Into .whl/ (ignored
# by git), which the device call carries:  run(command="bash benchmarks/gpu_check.sh",
# carry=[".whl"]).  ~40 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
pin() { grep -iE "^$1==" requirements.txt; }
for spec in "$(pin grain)" array_record==0.8.6 portpicker==1.6.0 "$(pin ml_collections)" \
            "$(pin simplejpeg)" "$(pin tensorboardX)" "$(pin av)"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$spec" 2>&1 | grep -v "^WARNING: Location" || true
done
ls -la .whl; du -sh .whl
