#!/usr/bin/env bash
# Prepare, on this machine, what a lent GPU machine lacks for benchmarks/gpu_goals256.sh
# (docs/heads.md "The goals on a GPU"): its image holds python3 3.12 with torch, timm, numpy,
# scipy, pyarrow, opencv, scikit-learn, typer, rich, safetensors, pyyaml, fsspec and pillow, but
# not pydicom, duckdb, zstandard or nibabel, and it cannot download. Writes (git-ignored):
#   .gpu/whl/      cp312 manylinux wheels of those four, this venv's versions (about 36 MB)
#   .gpu/demo_ct/  the demo CT, its label map and structure table (`xrayfm data fetch`; about 35 MB)
#                  (on the device: XRAYFM_CACHE=$PWD/.gpu)
# Together they exceed one device call's 64 MiB, so the run is two calls (the wheels, then the CT).
# Usage: benchmarks/gpu_prepare.sh   (from the repository root, after `make install`)
set -euo pipefail
PY=${PY:-.venv/bin/python}
mkdir -p .gpu/whl .gpu/demo_ct
rm -f .gpu/whl/*.whl
for pkg in pydicom duckdb zstandard nibabel; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/whl "$pkg==$version" 2>&1 | grep -v "^WARNING: Location" || true
  ls .gpu/whl | grep -qi "^${pkg}-" || { echo "no cp312 wheel of $pkg==$version downloaded" >&2; exit 1; }
done
"$PY" -m xrayfm data fetch  # idempotent: the default cache, or $XRAYFM_CACHE
cache=$("$PY" -c "from xrayfm.synth.demo_data import default_cache; print(default_cache())")
cp "$cache"/{cxr.nii.gz,mask.nii.gz,structures.csv} .gpu/demo_ct/
du -sh .gpu/whl .gpu/demo_ct
