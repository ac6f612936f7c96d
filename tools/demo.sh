#!/usr/bin/env bash
# The main job on a fresh machine: train a LoRA on the toy subject concept ("zwx shape", a heart the bundled
# toy model has never seen) on the CPU, then show before/after samples and the three figures:
#   fidelity  - share of prompts WITH the token whose samples show the heart (detector),
#   bleeding  - change in the share of class prompts WITHOUT the token that show it (should stay near 0),
#   retention - plain-world accuracy after training / before (1 = nothing else was damaged).
# Writes out/demo-lora-grid.png (rows: base / trained on token prompts, then base / trained on class prompts)
# and out/demo-quality.json. Measured: under 5 minutes on 2 CPU cores (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
mkdir -p out
PY=.venv/bin/python
# One thread unless told otherwise: on a busy machine two OpenMP threads wait for each other and run several
# times slower than one; on an idle 2-core machine one thread costs about a third more time.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ ! -f lib_sdtrain/toy/data/toy-sd1.safetensors ]; then
  echo "the bundled toy model lib_sdtrain/toy/data/toy-sd1.safetensors is missing" >&2
  exit 1
fi
WORK=out/demo-run-$(date +%Y%m%d-%H%M%S)     # dataset, run folder and the trained LoRA stay here
start=$(date +%s)
$PY -m lib_sdtrain toy quality --method lora --concept subject --work "$WORK" \
  --grid out/demo-lora-grid.png --json out/demo-quality.json --overwrite "$@"
echo "demo done in $(( $(date +%s) - start )) s: before/after samples in out/demo-lora-grid.png"
