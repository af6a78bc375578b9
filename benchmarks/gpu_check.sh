#!/usr/bin/env bash
# One prepared GPU session (run from the repository root on a CUDA machine with JAX):
# the demo end to end on the GPU, train-step and scoring throughput of resnet50 (with the
# plain jitted step side by side, and MFU on the one- and two-axis meshes), the input
# pipelines side by side with torchvision and the scoring stage's ceiling
# (benchmarks/input.py), the JPEG decoders, ingest, and the R(2+1)D-18 video train step.
# Writes logs and results.json to $OUT (default ./gpu_out). Each part has its own time
# limit, all of them inside one deadline (DEADLINE_S, default 570 s: the whole script
# within 10 minutes on a 16-core GPU host), and a failure in one does not stop the others.
# On the lent H200 (its image lacks grain, simplejpeg, ...), first, here:
#   bash benchmarks/gpu_wheels.sh      # -> .whl/, then run(..., carry=[".whl"])
#   bash benchmarks/gpu_check.sh            # FMNIST_DIR=<idx folder> if not installed
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
# lim N: N seconds, or what is left of the deadline if less (at least 10)
lim() { local left=$(( ${DEADLINE_S:-570} - ($(date +%s) - start) )); (( left < $1 )) && echo $(( left > 10 ? left : 10 )) || echo "$1"; }
folder=${FMNIST_DIR:+--config.data.folder=$FMNIST_DIR}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python3 -c "import jax, flax, optax, grain, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
python3 -c "import bssl.data.decode as d; print('simplejpeg:', d._simplejpeg is not None)"

echo "== demo, end to end on the GPU"
s=$(date +%s)
timeout $(lim ${DEMO_LIMIT:-150}) python3 -m bssl.main --config=configs/demo.py --workdir=/tmp/gpu_demo \
  $folder > "$OUT/demo.log" 2>&1
echo "demo rc $? wall $(( $(date +%s) - s )) s"
grep -E "^bssl:|done in|step (3200|1000|100)/" "$OUT/demo.log"; tail -3 "$OUT/demo.log"
cp /tmp/gpu_demo/report/results.json "$OUT/demo_results.json" 2>/dev/null

echo "== train step (resnet50 fp32/bf16, demo model)"
timeout $(lim ${TRAIN_LIMIT:-100}) python3 benchmarks/train_step.py --models resnet50,small \
  --impls xla --batch ${BATCH:-128} --steps 20 --peak_tflops ${PEAK:-989} > "$OUT/train_step.log" 2>&1
echo "train_step rc $?"; grep -v '^{' "$OUT/train_step.log" | tail -8

echo "== train step MFU on the one- and two-axis meshes (resnet50 bf16; data, then data x fsdp)"
# the two-axis mesh shards the train state over fsdp (2 devices, or 1 on a one-GPU host:
# the same step with the fsdp layout code in); each line also gives bssl's speed as a
# fraction of the plain jitted step's (benchmarks/train_step.py)
ndev=$(python3 -c "import jax; print(jax.device_count())" 2>/dev/null || echo 1)
fsdp=$(( ndev >= 2 ? 2 : 1 ))
for mesh in "$ndev" "$(( ndev / fsdp )),$fsdp"; do
  log="$OUT/train_step_mesh_${mesh/,/x}.log"
  timeout $(lim ${MESH_LIMIT:-60}) python3 benchmarks/train_step.py --models resnet50 \
    --dtypes bfloat16 --impls xla --batch ${BATCH:-128} --steps 10 --repeats 2 \
    --peak_tflops ${PEAK:-989} --mesh_shape "$mesh" > "$log" 2>&1
  echo "train_step mesh $mesh rc $?"
  tail -1 "$log" | python3 -c "
import json, sys
r = json.loads(sys.stdin.read()); c = next(iter(r['cases'].values()))
mfu = 'n/a' if c['mfu'] is None else f\"{100 * c['mfu']:.1f}%\"
print(f\"mesh {'x'.join(map(str, r['mesh_shape']))} ({', '.join(r['mesh_axes'])}): MFU {mfu}, \"
      f\"{c['images_per_s']:.0f} img/s, bssl/plain speed {c['ratio']:.3f}\")" \
    2>/dev/null || grep -v '^{' "$log" | tail -3
done

echo "== scoring from ingested shards (resnet50 bf16 batch 512, whole stage vs forward alone)"
# in-memory U first (the device side alone: transfer + step + top-K overlap), then U from
# ingested 256-px JPEG shards with decode worker processes (12 of the 16 cores)
timeout $(lim ${SCORE_LIMIT:-60}) python3 benchmarks/scoring.py --models resnet50 --images 16384 \
  --batch 512 --dtype bfloat16 --rounds 2 --source memory > "$OUT/scoring_memory.log" 2>&1
echo "scoring (memory) rc $?"; grep -v '^{' "$OUT/scoring_memory.log" | tail -3
timeout $(lim ${SCORE_LIMIT:-80}) python3 benchmarks/scoring.py --models resnet50 --images 16384 \
  --batch 512 --dtype bfloat16 --rounds 2 --source shards --workers ${WORKERS:-12} \
  > "$OUT/scoring.log" 2>&1
echo "scoring (shards) rc $?"; grep -v '^{' "$OUT/scoring.log" | tail -3; tail -1 "$OUT/scoring.log"

echo "== input pipelines side by side (torchvision of this image) and the scoring ceiling"
BSSL_TORCHVISION_PYTHON=$(command -v python3) timeout $(lim ${INPUT_LIMIT:-110}) \
  python3 benchmarks/input.py --images 512 --batches 12 --rounds 1 > "$OUT/input.log" 2>&1
echo "input rc $?"; grep -vE '^\{|^\[null\] round|warn' "$OUT/input.log" | tail -16; tail -1 "$OUT/input.log"

echo "== JPEG decoders, one core"
timeout $(lim ${DECODERS_LIMIT:-30}) python3 benchmarks/decoders.py --images 20 > "$OUT/decoders.log" 2>&1
echo "decoders rc $?"; tail -7 "$OUT/decoders.log" | grep -v '^{'

echo "== ingest and shard decode, one core of this host"
timeout $(lim ${INGEST_LIMIT:-30}) python3 benchmarks/ingest.py > "$OUT/ingest.log" 2>&1
echo "ingest rc $?"; tail -2 "$OUT/ingest.log"

echo "== video: r2plus1d_18 train step and forward, 16 x 112 x 112 clips, batch 32 (XLA 3-D vs factored)"
timeout $(lim ${VIDEO_LIMIT:-60}) python3 benchmarks/video_step.py --model r2plus1d_18 --frames 16 \
  --size 112 --channels 3 --batch 32 > "$OUT/video_step.log" 2>&1
echo "video step rc $?"; tail -3 "$OUT/video_step.log"

echo "== total $(( $(date +%s) - start )) s"
