#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. This is the command .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# Browser test: Debian's chromium and its driver (tests/test_ui_browser.py skips, saying why, without them).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests: installing Debian's chromium and chromium-driver for the browser test (a minute or two)"
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) >/dev/null 2>&1 \
      || echo "warning: could not install chromium; the browser test will be skipped"
  else
    echo "note: chromium is missing and this is not root: the browser test will be skipped"
  fi
fi
# gradio 3.41.2 (A1111's pin) in .venv-gradio3 for tests/test_ui_gradio3.py; SKIP_GRADIO3=1 leaves it out.
if [ "${SKIP_GRADIO3:-0}" != 1 ]; then
  bash tools/setup_gradio3.sh || echo "warning: .venv-gradio3 could not be built; the gradio 3 test will be skipped"
fi
# transformers 4.30.2 / tokenizers 0.13.3 (A1111's pins) in .pins-a1111/ for tests/test_a1111_pins.py, which reruns
# a subset of the suite under them; SKIP_A1111_PINS=1 leaves it out (and skips that test).
if [ "${SKIP_A1111_PINS:-0}" != 1 ]; then
  bash tools/setup_a1111_pins.sh || echo "warning: .pins-a1111 could not be built; the A1111-pins test will be skipped"
fi
# The tests run one torch thread each (tests/conftest.py), so the suite runs one pytest worker per core (at most 4;
# TEST_WORKERS=N chooses, 1 runs it in this process). A test file stays on one worker (--dist loadfile), so its
# module-wide fixtures are built once. Progress, the reasons for skips, and the 10 slowest tests at the end.
workers=${TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
[ "$workers" -gt 4 ] && workers=4
parallel=()
if [ "$workers" -gt 1 ] && .venv/bin/python -c "import xdist" 2>/dev/null; then
  parallel=(-n "$workers" --dist loadfile)
else
  workers=1
fi
echo "tests: running the suite on ${workers} worker(s); the 10 slowest tests are listed at the end"
exec .venv/bin/python -m pytest --durations=10 ${parallel[@]+"${parallel[@]}"} "$@"
