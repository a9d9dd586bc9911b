#!/usr/bin/env bash
# The issue's goals at 256 px (region accuracy >= 0.96, metal Dice >= 0.94, screw head / tip
# error <= 3 / 6 px, angle <= 1.5 deg), measured end to end with the CLI a user types, sized for a
# lent GPU (docs/heads.md "The goals on a GPU"):
#   1. synth: the 256-px benchmark render of the CPU runs (2,000 views of the demo CT, seed 11);
#   2. ingest: anonymized lake, 70/10/20 patient split, a key derived from a fixed phrase (so not
#      the CPU runs' patient split);
#   3. DINO pretraining of ARCH (resnet18) on the train split, the small-data recipe with
#      `input_norm: equalize` at GLOBAL px crops for EPOCHS epochs (bf16 on the GPU);
#   4. region, metal and screw heads at 256 px on the frozen backbone (each task's defaults);
#   5. evaluate on the test split (screws matched within 20 px), then OUT/goals.json: each goal,
#      its value, reached or not, the seconds of every step and the device.
# Every step is skipped when its output exists, and pretraining resumes from its checkpoint, so a
# run cut by the device's 10-minute limit continues when the same command is run again.
# Needs python3 with torch and the package's dependencies, and the demo CT under $XRAYFM_CACHE
# (benchmarks/gpu_prepare.sh). QUICK=1: 48 images at 64 px and a few epochs, to check the chain
# on a CPU (its numbers mean nothing).
# Usage: benchmarks/gpu_goals256.sh OUT   (env: PY, ARCH, EPOCHS, GLOBAL, BATCH, WORKERS, PRETRAIN_S)
set -u
OUT=${1:?output folder, e.g. runs/goals256 (git-ignored, kept between calls on a warm machine)}
PY=${PY:-python3}
ARCH=${ARCH:-resnet18}
if [ "${QUICK:-0}" = 1 ]; then
  N=48 SIZE=64 PER=2 EPOCHS=${EPOCHS:-2} GLOBAL=${GLOBAL:-64} BATCH=${BATCH:-16} HEAD_SIZE=64 HEAD_EPOCHS=2 MATCH=5
else
  N=2000 SIZE=256 PER=8 EPOCHS=${EPOCHS:-200} GLOBAL=${GLOBAL:-224} BATCH=${BATCH:-64} HEAD_SIZE=256 HEAD_EPOCHS=30 MATCH=20
fi
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
X=("$PY" -m xrayfm)
LABELS=$OUT/synth

step() {  # step NAME DONE_FILE COMMAND...: run unless DONE_FILE exists ("-": always); seconds to OUT/times.tsv
  local name=$1 done=$2 t0=$SECONDS rc; shift 2
  if [ "$done" != - ] && [ -e "$done" ]; then echo "== $name: done before"; return 0; fi
  echo "== $name: $*"
  "$@"; rc=$?
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$rc" >> "$OUT/times.tsv"
  if [ $rc -ne 0 ]; then echo "$name failed (exit $rc); run the same command again to resume" >&2; exit $rc; fi
}

step synth "$OUT/synth/run.json" "${X[@]}" synth --out "$OUT/synth" --ct demo --n $N --size $SIZE \
  --images-per-study $PER --seed 11 --screws 0-4 --workers "$WORKERS"
[ -e "$OUT/goals.key" ] || (umask 077 && "$PY" -c "import hashlib, sys; open(sys.argv[1], 'wb').write(hashlib.sha256(b'xrayfm goals256').digest())" "$OUT/goals.key")
step ingest - "${X[@]}" ingest "$OUT/synth/dicom" --lake "$OUT/lake" --key-file "$OUT/goals.key" \
  --split 0.7,0.1,0.2 --workers "$WORKERS"  # idempotent: images already in the lake are skipped
"$PY" -c "from xrayfm.cli.demo import SMALL_DATA_PRETRAIN as r; print(r + 'input_norm: equalize')" > "$OUT/recipe.yaml"
step pretrain "$OUT/backbone/model_card.json" timeout "${PRETRAIN_S:-360}" "${X[@]}" pretrain --lake "$OUT/lake" \
  --arch "$ARCH" --out "$OUT/backbone" --config "$OUT/recipe.yaml" --epochs "$EPOCHS" --batch-size "$BATCH" \
  --global-size "$GLOBAL" --local-size $((GLOBAL / 2)) --n-local 0 --out-dim 1024 --num-workers "$WORKERS" \
  --seed 1  # no --knn-labels: its per-epoch probe would cost as much as the training here
for task in classify segment detect; do
  extra=(); [ $task = detect ] && extra=(--match-px $MATCH)
  step "heads $task" "$OUT/heads/$task/run.json" "${X[@]}" heads train --backbone "$OUT/backbone" --task $task \
    --lake "$OUT/lake" --labels "$LABELS" --out "$OUT/heads/$task" --img-size $HEAD_SIZE --epochs $HEAD_EPOCHS "${extra[@]}"
done
step evaluate "$OUT/metrics_test.json" "${X[@]}" evaluate --backbone "$OUT/backbone" --heads "$OUT/heads/classify" \
  --heads "$OUT/heads/segment" --heads "$OUT/heads/detect" --lake "$OUT/lake" --labels "$LABELS" --split test \
  --match-px $MATCH --out "$OUT/metrics_test.json"
"$PY" - "$OUT" <<'PY'
import csv, json, platform, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
m = json.loads((out / "metrics_test.json").read_text())
goals = {  # name: (section, key, goal, higher is better)
    "region_accuracy": ("classification", "accuracy", 0.96, True),
    "metal_dice_mean": ("segmentation", "dice_mean", 0.94, True),
    "screw_head_error_px": ("detection", "head_error_px", 3.0, False),
    "screw_tip_error_px": ("detection", "tip_error_px", 6.0, False),
    "screw_angle_error_deg": ("detection", "angle_error_deg", 1.5, False),
    "screw_angle_error_median_deg": ("detection", "angle_error_median_deg", 1.5, False),
}
rows = {}
for name, (section, key, goal, higher) in goals.items():
    v = m.get(section, {}).get(key)
    rows[name] = {"value": v, "goal": goal, "reached": v is not None and (v >= goal if higher else v <= goal)}
    print(f"{name:30s} {'-' if v is None else f'{v:.4f}':>8s}  goal {'>=' if higher else '<='} {goal}  "
          f"{'reached' if rows[name]['reached'] else 'not reached'}")
times = {r[0]: {"seconds": int(r[1]), "exit": int(r[2])} for r in csv.reader(open(out / "times.tsv"), delimiter="\t")}
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
doc = {"goals": rows, "times": times, "device": device, "torch": torch.__version__,
       "detection": {k: m["detection"].get(k) for k in ("ap", "precision", "recall", "n_true")},
       "segmentation": {k: m["segmentation"].get(k) for k in ("dice_positive_mean", "iou_mean")},
       "backbone_card": json.loads((out / "backbone" / "model_card.json").read_text())}
(out / "goals.json").write_text(json.dumps(doc, indent=2, default=str))
print(f"-> {out / 'goals.json'} ({device})")
PY
