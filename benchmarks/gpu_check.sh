#!/usr/bin/env bash
# One prepared GPU session (run from the repository root on a CUDA machine with JAX):
# the demo end to end on the GPU, then train-step and scoring throughput of resnet50,
# ingest, and the R(2+1)D-18 video train step.
# Writes logs and results.json to $OUT (default ./gpu_out). Each part has its own
# time limit and a failure in one does not stop the others.
#   bash benchmarks/gpu_check.sh            # FMNIST_DIR=<idx folder> if not installed
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
folder=${FMNIST_DIR:+--config.data.folder=$FMNIST_DIR}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, grain, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"

echo "== demo, end to end on the GPU"
s=$(date +%s)
timeout ${DEMO_LIMIT:-240} python3 -m bssl.main --config=configs/demo.py --workdir=/tmp/gpu_demo \
  $folder > "$OUT/demo.log" 2>&1
echo "demo rc $? wall $(( $(date +%s) - s )) s"
grep -E "^bssl:|done in|step (3200|1000|100)/" "$OUT/demo.log"; tail -3 "$OUT/demo.log"
cp /tmp/gpu_demo/report/results.json "$OUT/demo_results.json" 2>/dev/null

echo "== train step (resnet50 fp32/bf16, demo model)"
timeout ${TRAIN_LIMIT:-180} python3 benchmarks/train_step.py --models resnet50,small \
  --impls xla --batch ${BATCH:-128} --steps 20 --peak_tflops ${PEAK:-989} > "$OUT/train_step.log" 2>&1
echo "train_step rc $?"; grep -v '^{' "$OUT/train_step.log" | tail -8

echo "== scoring from ingested shards (resnet50 bf16 batch 512, whole stage vs forward alone)"
# in-memory U first (the device side alone: transfer + step + top-K overlap), then U from
# ingested 256-px JPEG shards with decode worker processes (12 of the 16 cores)
timeout ${SCORE_LIMIT:-120} python3 benchmarks/scoring.py --models resnet50 --images 16384 \
  --batch 512 --dtype bfloat16 --rounds 2 --source memory > "$OUT/scoring_memory.log" 2>&1
echo "scoring (memory) rc $?"; grep -v '^{' "$OUT/scoring_memory.log" | tail -3
timeout ${SCORE_LIMIT:-150} python3 benchmarks/scoring.py --models resnet50 --images 16384 \
  --batch 512 --dtype bfloat16 --rounds 2 --source shards --workers ${WORKERS:-12} \
  > "$OUT/scoring.log" 2>&1
echo "scoring (shards) rc $?"; grep -v '^{' "$OUT/scoring.log" | tail -3; tail -1 "$OUT/scoring.log"

echo "== ingest and shard decode, one core of this host"
timeout ${INGEST_LIMIT:-60} python3 benchmarks/ingest.py > "$OUT/ingest.log" 2>&1
echo "ingest rc $?"; tail -2 "$OUT/ingest.log"

echo "== video: r2plus1d_18 train step and forward, 16 x 112 x 112 clips, batch 32 (XLA 3-D vs factored)"
timeout ${VIDEO_LIMIT:-120} python3 benchmarks/video_step.py --model r2plus1d_18 --frames 16 \
  --size 112 --channels 3 --batch 32 > "$OUT/video_step.log" 2>&1
echo "video step rc $?"; tail -3 "$OUT/video_step.log"
