#!/usr/bin/env bash
# The main job on a fresh machine. Until the bundled toy model lands, it builds a tiny SD1-layout checkpoint,
# describes it and renders a sample with it; then it trains on the toy world (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
mkdir -p out
PY=.venv/bin/python
if [ -f lib_sdtrain/toy/data/toy-sd1.safetensors ]; then
  MODEL=lib_sdtrain/toy/data/toy-sd1.safetensors
else
  MODEL=out/tiny-sd1.safetensors
  $PY -c "from lib_sdtrain.testing.tiny import make_tiny_checkpoint; make_tiny_checkpoint('$MODEL', 'sd1')"
fi
$PY -m lib_sdtrain info "$MODEL"
$PY -m lib_sdtrain sample "$MODEL" --prompt "a large red circle on a gray background" --negative "blurry" \
  --seed 1 --steps 20 --width 64 --height 64 --out out/demo-sample.png --overwrite
echo "demo done: out/demo-sample.png"
