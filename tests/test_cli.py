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


def _all_parsers(parser, path=()):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, path + (name,))


def test_every_commands_help_renders_its_texts():
    """`--help` of every command and subcommand formats (no argparse internals from a stray `%`), and the help
    texts that contain a percent sign print it as written."""
    from lib_sdtrain.cli import _escape, build_parser

    seen = 0
    for path, parser in _all_parsers(build_parser()):
        text = parser.format_help()
        assert "option_strings" not in text and "container" not in text, path
        seen += 1
    assert seen > len(cli.COMMANDS)
    out = subprocess.run([sys.executable, "-m", "lib_sdtrain", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "option_strings" not in out.stdout
    assert "30% slower" in " ".join(out.stdout.split())
    assert _escape("50% of %(default)s, 10%% off") == "50%% of %(default)s, 10%% off"
