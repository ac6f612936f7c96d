"""Convert .ckpt / .pt / .pth / .bin files to .safetensors without executing pickled code.

Inputs are files or folders (searched recursively; sub-folders are mirrored under --output). Each file is
read by Training Lab's restricted unpickler (never torch.load), checked, converted (checkpoints: state dict
without EMA/optimizer; embeddings: A1111's emb_params or clip_l/clip_g), written atomically, re-read and
compared tensor for tensor. Hypernetworks are scanned and reported but stay .pt (A1111 lists only .pt).
The exit code is 1 when any input was refused.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import add_arguments as add_config_arguments
    from ..convert.output import ConvertConfig

    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="model files or folders to convert")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="folder for the .safetensors files (created if missing)")
    add_config_arguments(parser, ConvertConfig)


class _Progress:
    """Events -> a one-line live status on a terminal's stderr (nothing when redirected)."""

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self.file_step = ""

    def __call__(self, event: Any) -> None:
        if not self.live:
            return
        d = event.data
        if event.kind == "progress" and d.get("phase") == "files":
            self.file_step = f"[{d['step'] + 1}/{d['total']}] " if d["step"] < d["total"] else ""
            text = f"{self.file_step}{d.get('file', '')}"
        elif event.kind == "progress" and d.get("phase") == "tensors":
            text = f"{self.file_step}{d.get('file', '')}: tensor {d['step']}/{d['total']}"
        elif event.kind == "status":
            text = f"{self.file_step}{d['text']}"
        else:
            return
        self.stream.write("\r\033[K" + text[:160])
        self.stream.flush()

    def clear(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _print_result(result: Any, progress: _Progress) -> None:
    progress.clear()
    name = result.source.name
    if result.status == "refused":
        print(f"REFUSED  {result.message if result.message.startswith(name) else name + ': ' + result.message}")
        return
    line = f"{result.status:<9} {name} -> {result.output}"
    if result.message:
        line += f" ({result.message})"
    print(line)
    h = result.hashes
    if h:
        extra = f"  model hash {h['model_hash']}" if "model_hash" in h else ""
        print(f"          A1111 hash {h['shorthash']}{extra}  sha256 {h['sha256']}")
    for warning in result.warnings:
        print(f"          warning: {warning}")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import merge_overrides, overrides_from_args
    from ..convert.output import ConvertConfig
    from ..errors import UserError
    from ..events import Events

    cfg = merge_overrides(ConvertConfig(), overrides_from_args(args))
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output {out_dir} is a file, not a folder")

    import torch  # noqa: F401 - fail here, with the import error, before any file is touched

    from ..convert.batch import convert_all
    progress = _Progress()
    results = convert_all(args.inputs, out_dir, cfg, Events(progress),
                          on_result=lambda r: _print_result(r, progress))
    progress.clear()
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing to do")
    return 0 if all(r.ok for r in results) else 1
