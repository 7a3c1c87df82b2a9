#!/usr/bin/env bash
# Throughput of BagNet-33 and ResNet-50 at 224x224 on a lent GPU, fp32 and bf16, and their
# images/s ratio against the paper's 155/570 = 0.27 (Brendel & Bethge 2019).
#
#   bash bench/gpu.sh                    # from the repository root; needs python3 with torch + torchvision
#   BATCH=128 PATHS=eager,fast,fast+compile bash bench/gpu.sh
#
# Needs no Ray, no network and no weights (random init; speed does not depend on the values).
# CSVs go to bench/out/gpu-*.csv and, when $OUT is set (the device runner), are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BATCH=${BATCH:-64}
PATHS=${PATHS:-eager,fast}
REPEAT=${REPEAT:-20}
WARMUP=${WARMUP:-5}
MODES=${MODES:-infer,train}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'

for precision in fp32 bf16; do
  echo "== $precision =="
  $PY -m bench.throughput --device cuda --models bagnet33,resnet50 --size 224 --precision "$precision" \
      --batch "$BATCH" --fast "$PATHS" --modes "$MODES" --warmup "$WARMUP" --repeat "$REPEAT" \
      --out "bench/out/gpu-$precision.csv"
done

if [ -n "${OUT:-}" ]; then
  cp bench/out/gpu-*.csv "$OUT"/
fi
