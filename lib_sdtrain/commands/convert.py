"""Convert model files safely: pickles to .safetensors, diffusers/PEFT LoRAs to kohya, diffusers folders.

--to safetensors (pickled inputs): .ckpt/.pt/.pth/.bin files or folders (searched recursively; sub-folders
are mirrored under --output) are read by Training Lab's restricted unpickler (never torch.load), checked,
converted (checkpoints: state dict without EMA/optimizer; embeddings: A1111's emb_params or clip_l/clip_g),
written atomically, re-read and compared tensor for tensor. Hypernetworks are scanned and reported but stay
.pt (A1111 lists only .pt).
--to kohya: a diffusers `pytorch_lora_weights.safetensors` or PEFT `adapter_model.safetensors` (file or
folder) becomes a kohya LoRA A1111 loads (same delta: up @ down * alpha / rank).
--to single-file: a diffusers model folder (SD1/SD2/SDXL) becomes one A1111 checkpoint .safetensors.
--to diffusers: a single-file checkpoint becomes a diffusers folder under --output.
Without --to each input goes where it fits (diffusers folder -> single file, diffusers/PEFT LoRA -> kohya,
pickles -> .safetensors). Nothing existing is replaced without --overwrite. The temporary files an interrupted
conversion left for the same outputs are removed first (nothing else). The exit code is 1 when any input was
refused.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

TARGETS = ("safetensors", "kohya", "single-file", "diffusers")   # = convert.report.TARGETS (no import here)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import add_arguments as add_config_arguments
    from ..convert.output import ConvertConfig

    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="model files or folders to convert")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="folder for the outputs (created if missing)")
    parser.add_argument("--to", choices=TARGETS, default=None,
                        help="what to make: safetensors (from pickles), kohya (from a diffusers/PEFT LoRA), "
                             "single-file (from a diffusers folder), diffusers (from a single-file checkpoint); "
                             "default: decided per input")
    parser.add_argument("--family", choices=["sd1", "sd2", "sdxl"], default=None,
                        help="model family when the input cannot tell (LoRAs for non-stock sizes; folders)")
    parser.add_argument("--prediction", choices=["eps", "v"], default=None,
                        help="prediction type to record (default: from the scheduler config / probe; SD2 "
                             "LoRAs: v)")
    parser.add_argument("--lora-alpha", type=float, default=None, metavar="ALPHA",
                        help="LoRA alpha to use for every module instead of the file's / adapter_config.json's")
    add_config_arguments(parser, ConvertConfig)


class _Progress:
    """Events -> a one-line live status on a terminal's stderr (nothing when redirected)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr   # looked up now: tests swap sys.stderr
        try:
            self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        except ValueError:   # a closed stream
            self.live = False
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
        extra += f"  addnet hash {h['addnet_hash']}" if "addnet_hash" in h else ""
        print(f"          A1111 hash {h['shorthash']}{extra}  sha256 {h['sha256']}")
    for warning in result.warnings:
        print(f"          warning: {warning}")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import merge_overrides, overrides_from_args
    from ..convert.output import ConvertConfig
    from ..errors import UserError
    from ..events import Events
    from ..formats.names import MODEL_SUFFIXES

    cfg = merge_overrides(ConvertConfig(), overrides_from_args(args))
    if args.lora_alpha is not None:       # refused once, before any input is read (not once per input)
        from ..convert.lora import check_lora_alpha

        check_lora_alpha(args.lora_alpha)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output {out_dir} is a file, not a folder")
    if not out_dir.exists() and out_dir.suffix.lower() in MODEL_SUFFIXES:
        # a file name where a folder is meant would become a folder named like a model file
        raise UserError(f"--output is the folder the converted files go in, not a file name: {out_dir.name} looks "
                        f"like a model file. Give a folder (e.g. --output {out_dir.parent / 'converted'}); each "
                        "output is named after its input")

    import torch  # noqa: F401 - fail here, with the import error, before any file is touched

    from ..convert.report import clean_stale_outputs, convert_inputs
    stale = clean_stale_outputs(args.inputs, out_dir, to=args.to)
    if stale:
        print(f"removed {len(stale)} temporary file(s) an interrupted conversion left behind: "
              + ", ".join(p.name for p in stale[:3]) + (" ..." if len(stale) > 3 else ""))
    progress = _Progress()
    results = convert_inputs(args.inputs, out_dir, cfg, to=args.to, family=args.family,
                             prediction=args.prediction, lora_alpha=args.lora_alpha, events=Events(progress),
                             on_result=lambda r: _print_result(r, progress), clean_stale=False)   # done above
    progress.clear()
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing to do")
    return 0 if all(r.ok for r in results) else 1
