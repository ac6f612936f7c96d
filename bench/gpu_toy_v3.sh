#!/usr/bin/env bash
# Issue #13's open targets (the style's round-trip ceiling >= 0.95 and its LoRA >= 0.8) on a lent GPU, with each
# part time-capped so that a short loan is enough. Two stages, each under the device tool's 10 minutes a call:
#   bash bench/gpu_toy_v3.sh pretrain [OUT]   a new toy model: a wider, deeper VAE (64,128,256,256 channels,
#                                             2 blocks a level) on the broad pictures with bands inside shapes,
#                                             then the UNet and text encoder on its latents (about 8 minutes:
#                                             picture rendering runs on the CPU before each stage)
#   bash bench/gpu_toy_v3.sh measure [OUT]    on that model: the round-trip ceilings of four style families
#                                             (bench/style_families.py), the style LoRA row and the subject LoRA
#                                             row of bench/quality.py (n = 96 each, seed 0, CFG 3; about 6 minutes)
#   bash bench/gpu_toy_v3.sh all [OUT]        both (over 10 minutes: for a machine held longer)
# OUT defaults to bench/results/toy-v3. Knobs (environment): VAE_MIN, UNET_MIN (stage budgets in minutes),
# VAE_WIDTHS, VAE_LAYERS, UNET_WIDTHS, SIZE, TEXTURED (textured_share), and the *_S caps in seconds.
# The model is a trial: it replaces the bundled one only after every #13 figure is measured on it.
# Without a CUDA GPU it prints that it needs one and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
OUT=${2:-bench/results/toy-v3}
case "$STAGE" in pretrain|measure|all) ;; *) echo "usage: bash bench/gpu_toy_v3.sh pretrain|measure|all [OUT]" >&2; exit 2 ;; esac
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/gpu_toy_v3.sh needs a CUDA GPU and this machine has none: nothing measured."
  exit 0
fi
mkdir -p "$OUT"
MODEL="$OUT/toy-v3.safetensors"
T0=$(date +%s)
say() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null

if [ "$STAGE" != measure ]; then
  say "pretrain: VAE ${VAE_MIN:-2} min, UNet ${UNET_MIN:-3} min"
  timeout "${PRETRAIN_S:-540}" "$PY" -m lib_sdtrain toy pretrain --device cuda --out "$MODEL" --overwrite \
    --minutes "${VAE_MIN:-2}" "${UNET_MIN:-3}" --size "${SIZE:-64}" --vae-widths "${VAE_WIDTHS:-64,128,256,256}" \
    --vae-layers "${VAE_LAYERS:-2}" --vae-data broad-bands --unet-widths "${UNET_WIDTHS:-32,64,64,64}" \
    --textured-share "${TEXTURED:-0}" --eval-samples 96 2>&1 | tee "$OUT/pretrain.log" | grep -v " step " | tail -20
fi
if [ "$STAGE" != pretrain ]; then
  if [ ! -f "$MODEL" ]; then
    echo "no $MODEL: run the pretrain stage first" >&2
    exit 1
  fi
  say "round-trip ceilings of the style families"
  timeout "${FAMILIES_S:-90}" "$PY" bench/style_families.py --model "$MODEL" --sizes "${SIZE:-64}" \
    --out "$OUT/style_families.json" --grid "$OUT/style_families.png" 2>&1 | tail -12
  say "style LoRA row"
  timeout "${STYLE_S:-200}" "$PY" bench/quality.py --device cuda --cfg 3 --curve 1 --rows lora-style --seed 0 \
    --model "$MODEL" --out "$OUT/quality-style-s0.json" --grids "$OUT/grids" 2>&1 | tail -8
  say "subject LoRA row"
  timeout "${SUBJECT_S:-150}" "$PY" bench/quality.py --device cuda --cfg 3 --curve 1 --rows lora --seed 0 \
    --model "$MODEL" --out "$OUT/quality-subject-s0.json" --grids "$OUT/grids" 2>&1 | tail -8
fi
say "done"
