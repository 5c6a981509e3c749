#!/usr/bin/env bash
# The CUDA check of a GPU machine, in one run and one log (README "Training throughput"):
#   1. the environment (nvidia-smi, torch, CUDA, bf16 support);
#   2. `pytest -m gpu` (bf16 training, compile vs eager, deterministic generation, torchrun over NCCL,
#      exact resume on CUDA);
#   3. a 2-minute `--preset gpu` training at 256 px with bf16, then the same with torch.compile;
#   4. training throughput at 256 px, paper widths, batch 32 (s/kimg, % of the measured bf16 peak);
#   5. generation throughput at 256 px, paper widths (img/s, peak memory).
# Each step's exit status is logged and the script goes on to the next, so one failure still leaves
# the rest measured. Usage (from the repository root, the project installed):
#     bash benchmarks/gpu_check.sh [LOG] [WORK_DIR]          # default gpu_check.log, a temporary folder
#     ONLY="pytest-gpu train-bf16-2min" bash benchmarks/gpu_check.sh part1.log   # a subset of the steps
# Each step has its own time limit (at most 16 minutes in all, about 10 expected: two calls of
# ONLY=... where one device command may run 10 minutes); nothing is downloaded.
set -u
LOG=${1:-gpu_check.log}
WORK=${2:-$(mktemp -d -t retinagen-gpu-check-XXXXXX)}
PY=${PYTHON:-python}
mkdir -p "$WORK"
: >"$LOG"
FAILED=0

step() {  # step NAME TIMEOUT_S CMD...: run CMD with a time limit, log its output and exit status
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        echo "=== $name: skipped (not in ONLY)" | tee -a "$LOG"
        return
    fi
    echo "=== $(date -u +%H:%M:%S) $name: $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=30 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

step environment 30 bash -c "nvidia-smi; $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name(0), \"bf16\", torch.cuda.is_bf16_supported())'"
step pytest-gpu 180 "$PY" -m pytest -m gpu -n 0 -p no:cacheprovider -rA tests/test_gpu.py  # one process: one CUDA context
step train-bf16-2min 270 retinagen train --dataset synthfundus --preset gpu --minutes 2 --out "$WORK/run_bf16" \
    --set model.resolution=256 --set train.amp=bf16 --set train.batch_size=32 --set train.workers=4
DATA=$(ls "$WORK"/run_bf16/data/*.zip 2>/dev/null | head -n 1)
step train-bf16-compile-2min 300 retinagen train --dataset synthfundus --preset gpu --data "${DATA:-missing.zip}" \
    --minutes 2 --out "$WORK/run_compile" --set model.resolution=256 --set train.amp=bf16 --set train.compile=true \
    --set train.batch_size=32 --set train.workers=4
step train-throughput-256 120 "$PY" benchmarks/train_throughput.py --device cuda --widths paper --resolutions 256 \
    --batch 32 --steps 16
step generate-throughput-256 60 "$PY" benchmarks/generate_throughput.py --device cuda --widths paper --resolutions 256 \
    --batch 64 --batches 20
echo "=== done: $FAILED step(s) failed; log $LOG, runs in $WORK" | tee -a "$LOG"
exit "$FAILED"
