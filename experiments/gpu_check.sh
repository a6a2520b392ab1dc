#!/usr/bin/env bash
# The GPU check in one command, for the lent GPU machine (../shared/gpu/README.md: prepare `.whl/`
# here with `make install && ../shared/gpu/fetch-wheels.sh`, carry `.whl`, then run
# `bash experiments/gpu_check.sh` there). Installs the carried wheels, then runs the GPU bench
# (experiments/bench_gpu.py) for each shape in $SHAPES (default "3b"; e.g. SHAPES="3b 7b") and
# writes each table's JSON under $OUT (the device tool's folder that comes back).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
out="${OUT:-runs/bench}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for shape in ${SHAPES:-3b}; do
  python3 -m experiments.bench_gpu --shape "$shape" --workdir "/tmp/bench_$shape" \
      --out "$out/gpu_step_$shape.json" "$@" 2>&1 | tee "$out/gpu_step_$shape.log"
done
