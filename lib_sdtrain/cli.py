"""`python -m lib_sdtrain <command>`: the command-line face of the core.

Each command lives in `lib_sdtrain/commands/<name>.py` with two functions, `add_arguments(parser)` and
`run(args) -> int`, and one line in `COMMANDS`. Command modules import heavy libraries (torch, diffusers)
inside `run`, so `--help` stays fast. A `UserError` becomes one line on stderr and exit code 2; Ctrl-C exits
with 130 after the command had its chance to save.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from . import __version__
from .errors import UserError

# name -> (module under lib_sdtrain.commands, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("info", "show a model's family, prediction type, parameter counts and hashes"),
    "sample": ("sample", "render a picture with a model (Euler or DDIM, classifier-free guidance)"),
    "train": ("train", "train a LoRA, embedding, hypernetwork, Dreambooth or fine-tune on a dataset folder"),
    "convert": ("convert", "convert .ckpt/.pt to .safetensors without running pickled code; LoRA and diffusers layouts"),
    "dataset": ("dataset", "scan, caption, bucket and de-duplicate a training dataset"),
    "toy": ("toy", "the bundled toy world: pictures, concept datasets, detector"),
    "app": ("app", "the web app: dataset, training, monitor, convert and compare tabs in a browser"),
    "compare": ("compare", "compare a run's saved epochs on the same prompts and seeds (labelled grid)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdtrain" if Path(sys.argv[0]).name == "sdtrain" else "python -m lib_sdtrain",
        description="Training Lab: train LoRA, embeddings, hypernetworks and checkpoints for Stable Diffusion.",
    )
    parser.add_argument("--version", action="version", version=f"Training Lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        try:
            mod = importlib.import_module(f"lib_sdtrain.commands.{module}")
        except ModuleNotFoundError as e:  # a command not written yet; tests/test_cli.py requires all of them
            if e.name != f"lib_sdtrain.commands.{module}":
                raise
            continue
        p = sub.add_parser(name, help=summary, description=(mod.__doc__ or summary).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)   # keep the docstring's lists
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    literal_percent_signs(parser)
    return parser


_PERCENT = re.compile(r"%%|%\(\w+\)[a-z]|%")       # escaped, a placeholder, or a lone sign


def _escape(text: str) -> str:
    return _PERCENT.sub(lambda m: m.group(0) if len(m.group(0)) > 1 else "%%", text)


def literal_percent_signs(parser: argparse.ArgumentParser) -> None:
    """Make every `%` in the help texts print as itself, in this parser and all parsers below it.

    argparse formats each help string with `%` (for `%(default)s`), so a plain "30% slower" taken from a setting's
    description would print argparse's internals instead; `%(name)s` placeholders are left working.
    """
    for action in parser._actions:
        if isinstance(action.help, str) and action.help is not argparse.SUPPRESS:
            action.help = _escape(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if isinstance(choice.help, str):
                    choice.help = _escape(choice.help)
            for sub in set(action.choices.values()):
                literal_percent_signs(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    """The `sdtrain` command (pyproject.toml [project.scripts])."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
