#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. This is the command .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
