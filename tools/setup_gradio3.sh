#!/usr/bin/env bash
# Build .venv-gradio3: a second test environment with gradio 3.41.2, the version AUTOMATIC1111 WebUI 1.10 pins,
# so tests/test_ui_gradio3.py can build the Training Lab tab and answer its events under that gradio.
# Safe to run again (installs what is missing). TORCH_SPEC overrides torch (default: the CPU build 2.13.0).
# gradio 3.41.2 needs numpy<2 and pydantic<2; fastapi/httpx are held at versions that gradio 3.41.2 runs on
# (the same ones A1111 1.10 uses: fastapi 0.94.0, httpx 0.24.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv-gradio3
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_gradio3: creating $VENV (A1111's gradio 3.41.2, for tests/test_ui_gradio3.py)"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first and explicitly: a bare "torch" requirement would pull several GB of CUDA packages.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup_gradio3: installing ${TORCH_SPEC:-torch==2.13.0} into $VENV"
  $PIP install "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
CONSTRAINTS=$(mktemp)
REQS=$(mktemp)
trap 'rm -f "$CONSTRAINTS" "$REQS"' EXIT
# the project's requirements without the standalone app's gradio (4/5) and the browser-test packages
grep -v -i -E '^(gradio|selenium)([<>=!~ ;]|$)' requirements.txt > "$REQS"
cat > "$CONSTRAINTS" <<'PINS'
numpy>=1.26,<2
pydantic>=1.10,<2
fastapi==0.94.0
httpx==0.24.1
Pillow>=9.5,<11
PINS
# skip pip's resolver (half a minute online) when nothing changed since the last complete install
STAMP="$VENV/.training-lab-requirements"
WANT=$(cat "$CONSTRAINTS" "$REQS" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "setup_gradio3: installing gradio 3.41.2 and the project's requirements under A1111's pins"
  $PIP install -c "$CONSTRAINTS" "gradio==3.41.2" -r "$REQS" 2>&1 | grep -v "is ignored" || true
  if "$VENV/bin/python" -c "import gradio, sys; sys.exit(gradio.__version__ != '3.41.2')" 2>/dev/null; then
    echo "$WANT" > "$STAMP"
  fi
fi
if ! "$VENV/bin/python" -c "import open_clip" 2>/dev/null; then
  $PIP install --no-deps "open-clip-torch>=2.20,<4" 2>&1 | grep -v "is ignored" || true
fi
"$VENV/bin/python" -c "import torch, numpy, pydantic, gradio, diffusers, transformers, peft; \
print('gradio3 setup ok: gradio', gradio.__version__, 'numpy', numpy.__version__, 'pydantic', pydantic.VERSION, \
'torch', torch.__version__)"
