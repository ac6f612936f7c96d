#!/usr/bin/env bash
# Create .venv with everything the standalone core and the tests need. Safe to run again (installs what is
# missing). TORCH_SPEC overrides the torch requirement (default: the CPU build 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and explicitly: a bare "torch" requirement would pull several GB of CUDA packages.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0} (the largest download; a few minutes on a slow line)"
  $PIP install "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
echo "setup: installing the pinned packages of requirements-lock.txt (what is missing only)"
$PIP install -r requirements-lock.txt 2>&1 | grep -v "is ignored" || true
echo "setup: installing open-clip-torch (for its CLIP vocabulary file)"
# Only for the CLIP BPE vocabulary file it ships; --no-deps keeps torchvision out (CPU-only machines).
$PIP install --no-deps "open-clip-torch>=2.20,<4" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, diffusers, transformers, peft, safetensors; print('setup ok: torch', torch.__version__)"
