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
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0} (the largest download; a few minutes on a slow line)"
  $PIP install "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
OPEN_CLIP_SPEC="open-clip-torch>=2.20,<4"
# A re-run skips pip (about 10 s of resolving and importing) when requirements-lock.txt and the open-clip spec are
# those of the last setup that finished (.venv/.training-lab-setup holds their digest) and the packages are still
# there. Remove that file to make setup check every package again.
STAMP=.venv/.training-lab-setup
want=$( { cat requirements-lock.txt; echo "$OPEN_CLIP_SPEC"; } | .venv/bin/python -c \
  "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
FOUND="import importlib.metadata as md, importlib.util as u
missing = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'safetensors', 'open_clip') if u.find_spec(m) is None]
assert not missing, missing
print('setup ok: torch', md.version('torch'))"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && found=$(.venv/bin/python -c "$FOUND" 2>/dev/null); then
  echo "setup: requirements-lock.txt unchanged since the last setup; nothing to install"
  echo "$found"
  exit 0
fi
echo "setup: installing the pinned packages of requirements-lock.txt (what is missing only)"
$PIP install -r requirements-lock.txt 2>&1 | grep -v "is ignored" || true
echo "setup: installing open-clip-torch (for its CLIP vocabulary file)"
# Only for the CLIP BPE vocabulary file it ships; --no-deps keeps torchvision out (CPU-only machines).
$PIP install --no-deps "$OPEN_CLIP_SPEC" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, diffusers, transformers, peft, safetensors
$FOUND"
echo "$want" > "$STAMP"
