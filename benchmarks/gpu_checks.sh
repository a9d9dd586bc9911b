#!/usr/bin/env bash
# The GPU checks of one device session, in one go (docs/pretrain.md "GPU"):
#   1. benchmarks/pretrain.py on the GPU: images/s, MFU and peak memory of xrayfm vs lightly,
#      ViT-S/16, ResNet-50, ViT-tiny, ResNet-18 at the reference crops (2 x 224 + 10 x 96, batch 64);
#   2. `xrayfm pretrain` end to end on the GPU (bf16, channels-last ResNet, data loader workers):
#      12 steps straight vs 5 steps + resume to 12, same seed; prints the largest weight difference;
#   3. the bf16 step again with torch.compile'd backbones;
#   4. with LABELS (the synth run of the lake): `xrayfm heads train` segment + detect on the GPU
#      (bf16 head, backbone of part 2) and `xrayfm evaluate` there, timed.
# Usage: benchmarks/gpu_checks.sh LAKE OUTDIR [LABELS]   (python3 = an interpreter with torch, timm, the
# package's dependencies and lightly; each part has a time cap so a slow one cannot eat the rest)
set -u
LAKE=${1:?lake folder}; OUT=${2:?output folder}; LABELS=${3:-}
mkdir -p "$OUT"; RUNS=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
  nproc; } > "$OUT/gpu.txt" 2>&1
timeout 240 python3 benchmarks/pretrain.py --archs vit_small_patch16,resnet50,vit_tiny_patch16,resnet18 \
  --rounds 10 --no-peer --out "$OUT/pretrain_gpu.json" 2>&1 | grep -v Warning | tee "$OUT/bench.log"
pre() { timeout 60 python3 -m xrayfm pretrain --lake "$LAKE" --arch resnet18 --epochs 2 --batch-size 32 --n-local 8 \
  --num-workers 4 --seed 3 "$@"; }
{ time pre --out "$RUNS/straight"; pre --out "$RUNS/resumed" --max-steps 5; pre --out "$RUNS/resumed"
  python3 - "$RUNS" <<'PY'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{sys.argv[1]}/{r}/backbone.safetensors") for r in ("straight", "resumed"))
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
scale = max(a[k].float().abs().max().item() for k in a)
print(f"resume check: {len(a)} tensors, max |straight - resumed| = {diff:.3g} (max |w| {scale:.3g})")
PY
  tail -n 3 "$RUNS/straight/metrics.jsonl"; cat "$RUNS/straight/run.json"; } > "$OUT/e2e.log" 2>&1
timeout 150 python3 benchmarks/pretrain.py --archs vit_small_patch16,resnet50 --precisions bf16 --compile \
  --no-memory --no-peer --rounds 10 --out "$OUT/pretrain_gpu_compile.json" 2>&1 | grep -v Warning \
  | tee "$OUT/compile.log"
timed() { local label=$1 t0=$SECONDS rc; shift; "$@"; rc=$?; echo "$label: $((SECONDS - t0)) s (exit $rc)"; }
if [ -n "$LABELS" ]; then
  { for t in segment detect; do
      timed "heads train $t" timeout 120 python3 -m xrayfm heads train --backbone "$RUNS/straight" \
        --task "$t" --lake "$LAKE" --labels "$LABELS" --img-size 128 --epochs 10 --out "$RUNS/head_$t"
    done
    timed evaluate timeout 120 python3 -m xrayfm evaluate --backbone "$RUNS/straight" \
      --heads "$RUNS/head_segment" --heads "$RUNS/head_detect" --lake "$LAKE" --labels "$LABELS" --knn \
      --out "$OUT/heads_gpu_metrics.json"
    grep -h -E '"device"|precision' "$RUNS/head_segment/run.json" "$RUNS/head_segment/config.yaml"
  } > "$OUT/heads.log" 2>&1
fi
