"""A subset of the suite under transformers 4.30.2 / tokenizers 0.13.3, the versions A1111 WebUI 1.10 pins.

The main .venv has a current transformers, where CLIP's `position_ids` is a non-persistent buffer; under 4.30.2
it is persistent, and code that assumed otherwise failed on every model inside A1111 while CI passed.
`tools/setup_a1111_pins.sh` installs the two pinned packages (no dependencies) into `.pins-a1111/`; this test
runs the SUBSET below with the main .venv's interpreter and that folder in front on PYTHONPATH (everything else,
torch, peft, diffusers, accelerate, is the main .venv's), after checking in that same process that the
transformers imported is 4.30.2 from `.pins-a1111/`, so the lane cannot quietly run the newer one.

DESELECTED lists the tests of those files that do not run under 4.30.2, each with the reason; none of them is a
fault of the project's code under A1111 (see the reasons).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / ".pins-a1111"
STAMP = PINS / ".training-lab-pins"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
TIMEOUT_S = 240          # the lane takes about a minute
WANT = "4.30.2"

# Checkpoint loading and saving, CLIP text encoders, tokenizer and prompt conditioning, LoRA / embedding files
# and their conversions, short training runs of the tiny models, and the fake WebUI host against the standalone
# one: 452 tests, measured 61 s wall on one thread (otherwise quiet 2-core machine, one interpreter).
# test_train_loop's gradient-checkpointing test is in: it failed here until StandaloneHost fell back to the
# reentrant checkpointing of transformers < 4.35 (no gradient_checkpointing_kwargs there). Left out for time, and
# failing under 4.30.2 when last run for reasons of the tests themselves: the stock-key tests of test_webui_host / test_webui_methods (they expect position_ids
# to be non-persistent) and test_dreambooth's diffusers-export test (a diffusers pipeline reads the folder).
SUBSET = [
    "tests/test_models.py",
    "tests/test_toy_model.py",
    "tests/test_tokenizer.py",
    "tests/test_conditioning.py",
    "tests/test_a1111_pt.py",
    "tests/test_lora_files.py",
    "tests/test_lora_targets.py",
    "tests/test_lora_train.py",
    "tests/test_convert_lora.py",
    "tests/test_convert_checkpoint.py",
    "tests/test_convert_embedding.py",
    "tests/test_convert_diffusers.py",
    "tests/test_embedding.py",
    "tests/test_lora_openclip_ldm.py",
    "tests/test_train_loop.py::test_gradient_checkpointing_gives_the_same_weights_and_is_switched_off_after",
    "tests/test_webui_host.py::test_outputs_equal_the_standalone_host_on_the_same_file",
    "tests/test_webui_methods.py::test_tokenizers_are_a1111s_own_ids_without_start_and_end",
    "tests/test_webui_methods.py::test_embedding_splices_through_a1111_like_the_standalone_host",
]

# diffusers 0.33's pipelines import transformers' SiglipImageProcessor (transformers >= 4.37), so the tests that
# use a diffusers pipeline as the outside reader or writer of a file cannot run here. The project's own code
# imports no diffusers pipeline (only UNet2DConditionModel, AutoencoderKL, schedulers), which do import.
_PIPELINE = "uses diffusers 0.33's StableDiffusion(XL)Pipeline, which needs transformers >= 4.37"
DESELECTED = {
    "tests/test_convert_lora.py::test_converted_lora_matches_peft_in_a1111[sd1-diffusers+config]":
        _PIPELINE + " (the fixture writes the file with Pipeline.save_lora_weights)",
    "tests/test_convert_diffusers.py::test_folder_loads_in_diffusers": _PIPELINE + " (it reads the folder back)",
    # The test reads CLIPTextTransformer.eos_token_id (transformers >= 4.31) to try both pooling rules; 4.30.2
    # has one rule (argmax of the ids), which the test's first pooled-output checks already cover.
    "tests/test_conditioning.py::test_sdxl_concatenates_penultimate_layers_and_pools_the_first_chunk":
        "reads CLIPTextTransformer.eos_token_id, an attribute added in transformers 4.31",
}

_CHECK = f"""
import os, sys
import transformers
where = os.path.realpath(transformers.__file__)
assert transformers.__version__ == {WANT!r} and where.startswith(os.path.realpath({str(PINS)!r}) + os.sep), \\
    f"the lane would run transformers {{transformers.__version__}} from {{where}}, not {WANT} from .pins-a1111/"
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_subset_passes_under_a1111_transformers_4_30_2():
    if os.environ.get("SKIP_A1111_PINS") == "1":
        pytest.skip("SKIP_A1111_PINS=1: the subset is not rerun under transformers 4.30.2 (A1111's pin)")
    if not STAMP.is_file():
        pytest.skip(".pins-a1111/ is missing or incomplete: run tools/setup_a1111_pins.sh to test a subset under "
                    "transformers 4.30.2 (A1111's pin); tools/test.sh does unless SKIP_A1111_PINS=1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PINS), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    # --maxfail=5 stops early with the failures in full; faulthandler_timeout: a test stuck for a minute (none
    # takes 10 s) prints where it waits, and the lane is killed after TIMEOUT_S with that in the message (with a
    # broken loader, test_lora_openclip_ldm's A1111-host test left A1111's queue lock held and the next one hung)
    args = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", "-o", "faulthandler_timeout=60", "--maxfail=5", "-rfE",
            *SUBSET]
    for node in DESELECTED:
        args += ["--deselect", node]
    python = VENV_PYTHON if VENV_PYTHON.is_file() else Path(sys.executable)   # the interpreter the pins were built for
    try:
        proc = subprocess.run([str(python), "-c", _CHECK, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the A1111-pins lane (transformers {WANT}) did not finish in {TIMEOUT_S} s:\n"
                    + _tail(e.stdout, e.stderr))
    if proc.returncode != 0 or " passed" not in proc.stdout:
        pytest.fail(f"the A1111-pins lane (transformers {WANT}) failed:\n" + _tail(proc.stdout, proc.stderr))


def _tail(stdout: str | bytes | None, stderr: str | bytes | None) -> str:
    out, err = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (stdout, stderr))
    return out[-5000:] + ("\n--- stderr ---\n" + err[-4000:] if err.strip() else "")
