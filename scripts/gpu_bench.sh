#!/usr/bin/env bash
# The GPU figures in one run, for a session lent a GPU machine through the `device` tool (its
# python3 has torch but not this project's pins), or any CUDA machine with the project's venv
# (SKIP_WHEELS=1 PY=.venv/bin/python).
#
#   Once, here:  see "GPU figures" in models/citrusv/README.md (downloads ./.whl, git-ignored)
#   There:       bash scripts/gpu_bench.sh            (writes to $OUT, else ./bench_out)
#
# Runs: the engine bench of the random-init 8B shape (bf16: capture-while-generating overhead,
# prefill/decode tokens/s, cold vs cached mask step, GPU memory) and the fine-tune memory with
# the training run's MLLM copy kept vs released; then the engine bench of the shipped models/nano,
# and its evaluation where the held-out copy of the sample data came along (HELD_OUT, below).
# SHAPE, DEVICE override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SHAPE=${SHAPE:-8b}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/models" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"
# Each step runs even when one before it failed; the script exits 1 when any of them failed.
rc=0
"$PY" -m citrusv.cli bench --shape "$SHAPE" --device "$DEVICE" --size 512 --new-tokens 32 \
    --repeats 5 2>&1 | tee "$OUT/bench_$SHAPE.txt" || rc=1
"$PY" -m citrusv.cli bench --shape "$SHAPE" --device "$DEVICE" --finetune-steps 10 2>&1 \
    | tee "$OUT/finetune_$SHAPE.txt" || rc=1
"$PY" -m citrusv.cli bench --model models/nano --device "$DEVICE" --size 512 --new-tokens 32 \
    --repeats 5 2>&1 | tee "$OUT/bench_nano.txt" || rc=1
# nano's evaluation on this device, where the small sample-data copy came along
# (python scripts/held_out_copy.py work/held_out here; carry work/held_out too; ~2 min on an H200)
HELD_OUT=${HELD_OUT:-work/held_out}
if [ -f "$HELD_OUT/studies/chest_ct.nii.gz" ]; then
    "$PY" -m citrusv.cli eval --device "$DEVICE" --sample-data "$HELD_OUT" \
        --json "$OUT/eval_nano.json" 2>&1 | tr '\r' '\n' | grep -v '^slice' \
        | tee "$OUT/eval_nano.txt" || rc=1
fi
exit $rc
