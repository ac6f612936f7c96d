#!/usr/bin/env bash
# Everything this project measures on a GPU, in one command with each part time-capped (about 9 minutes in all),
# for a machine lent for a short while:
#   1. bench/cuda_checks.py - every speed / memory technique against the run without it, every method under bf16
#      (tiny models built in code);
#   2. bench/gpu.py         - full-size SD1.5 / SDXL LoRA and Dreambooth, ours vs. the diffusers + peft reference;
#   3. the README main job (toy LoRA quality run) on CUDA, with its labelled grid;
#   4. the torch.compile check (its first steps compile, so it comes last).
#     bash bench/gpu_session.sh [OUT_DIR]        (default bench/results; PYTHON=... picks the interpreter)
# Without a CUDA GPU each part prints that it needs one and the script exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T0=$(date +%s)
say() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/gpu_session.sh needs a CUDA GPU and this machine has none: nothing measured."
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
checks=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); import cuda_checks as c; print(','.join(n for n in c.CHECKS if n != 'torch-compile'))")
say "CUDA checks"
timeout "${CHECK_S:-100}" "$PY" bench/cuda_checks.py --out-dir "$OUT" --only "$checks" 2>&1 | tee "$OUT/cuda-checks.log"
say "GPU benchmark"
timeout "${BENCH_S:-320}" "$PY" bench/gpu.py --budget-s "${BUDGET_S:-260}" --out-dir "$OUT" 2>&1 | tee "$OUT/gpu.log"
say "toy LoRA quality run (the README main job) on CUDA"
demo=$(mktemp -d)
timeout "${DEMO_S:-70}" "$PY" -m lib_sdtrain toy quality --method lora --concept subject --device cuda --work "$demo/work" \
  --grid "$OUT/demo-cuda-grid.png" --json "$OUT/demo-cuda.json" --overwrite 2>&1 | tail -15
rm -rf "$demo"
say "torch.compile check"
mkdir -p "$OUT/compile"
timeout "${COMPILE_S:-45}" "$PY" bench/cuda_checks.py --out-dir "$OUT/compile" --only torch-compile 2>&1 | tail -5
say "done"
