#!/usr/bin/env bash
# Build .pins-a1111/: transformers 4.30.2 and tokenizers 0.13.3, the versions AUTOMATIC1111 WebUI 1.10 pins,
# installed with --no-deps into a plain folder. tests/test_a1111_pins.py puts it in front of the main .venv's
# packages (PYTHONPATH) and runs a subset of the suite there, so code that only works with the newer
# transformers fails CI (e.g. CLIP's position_ids, a persistent buffer before transformers 4.31).
# Everything else (torch, peft, diffusers, accelerate, huggingface_hub, safetensors, numpy) is the main .venv's:
# transformers 4.30.2 needs nothing newer or older than what is there except tokenizers (<0.14).
# Safe to run again: returns at once when the folder is complete. Needs tools/setup.sh's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.pins-a1111
PY=.venv/bin/python
PINS="transformers==4.30.2 tokenizers==0.13.3"
STAMP="$DIR/.training-lab-pins"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$PINS" ]; then
  exit 0
fi
echo "setup_a1111_pins: installing $PINS into $DIR (A1111's pins, for tests/test_a1111_pins.py)"
# built beside the final folder and moved into place, so an interrupted run never leaves a half folder there
TMP="$DIR.partial"
rm -rf "$TMP"
"$PY" -m pip --disable-pip-version-check -q install --no-deps --target "$TMP" $PINS 2>&1 | grep -v "is ignored" || true
if ! PYTHONPATH="$TMP" "$PY" -c "import transformers, tokenizers, sys; \
sys.exit(transformers.__version__ != '4.30.2' or tokenizers.__version__ != '0.13.3')" 2>/dev/null; then
  rm -rf "$TMP"
  echo "setup_a1111_pins: $PINS did not install or import" >&2
  exit 1
fi
echo "$PINS" > "$TMP/.training-lab-pins"
rm -rf "$DIR"
mv "$TMP" "$DIR"
echo "setup_a1111_pins ok: $PINS in $DIR"
