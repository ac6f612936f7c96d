#!/usr/bin/env bash
# One command for the GPU benchmark (see bench/gpu.py): full-size SD1.5 / SDXL LoRA, ours vs. diffusers + peft,
# img/s, peak VRAM, model FLOPs utilisation -> bench/results/gpu-<GPU name>.json. Without a GPU: a note, exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" bench/gpu.py "$@"
