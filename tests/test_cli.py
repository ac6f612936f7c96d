import importlib
import subprocess
import sys

import pytest

from lib_sdtrain import cli
from conftest import ROOT


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_registered_command_exists(name):
    mod = importlib.import_module(f"lib_sdtrain.commands.{cli.COMMANDS[name][0]}")
    assert callable(mod.add_arguments) and callable(mod.run)


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "lib_sdtrain", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert name in out.stdout


def test_user_error_is_one_line_and_nonzero():
    out = subprocess.run([sys.executable, "-m", "lib_sdtrain", "info", "/nonexistent/model.safetensors"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error:")
    assert "Traceback" not in out.stderr
