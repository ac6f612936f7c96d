"""Train a LoRA, embedding, hypernetwork, Dreambooth checkpoint or full fine-tune on a dataset folder, standalone.

Settings come from `--config run.toml` (or .json), or with `--resume RUN_FOLDER` alone from that run's state, and
are overridden by flags. Ctrl-C stops cleanly after the current step and keeps a resumable state; press it
twice to abort at once. A run that diverges (or whose weights become NaN) exits with code 3, keeping its
last good save.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train.settings import TrainSettings
    from ..config import add_arguments as add_setting_flags

    parser.add_argument("--config", help="TOML or JSON file with the settings (flags override it)")
    parser.add_argument("--save-config", metavar="PATH", help="write the effective settings to PATH and exit")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="dtype of the frozen base model (auto: fp16 on CUDA, fp32 on CPU)")
    add_setting_flags(parser, TrainSettings)


def settings_from_args(args: argparse.Namespace):
    from ..config import load_config, merge_overrides, overrides_from_args
    from ..train.settings import TrainSettings

    if args.config:
        cfg = load_config(TrainSettings, args.config)
    elif getattr(args, "resume", None):   # `--resume DIR` alone: the run's own settings, flags still override
        from ..train.state import read_state_settings

        cfg = TrainSettings.from_dict(read_state_settings(args.resume))
    else:
        cfg = TrainSettings()
    own = {"config", "save_config", "device", "dtype", "command"}
    return merge_overrides(cfg, {k: v for k, v in overrides_from_args(args).items() if k not in own})


class ProgressPrinter:
    """One updating line: step, loss, steps/s, ETA; warnings and saves on their own lines."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, event) -> None:
        d = event.data
        if event.kind == "progress" and d.get("phase") != "cache":
            now = time.time()
            if now - self.last < 0.2 and d["step"] < d["total"]:
                return
            self.last = now
            eta = d.get("eta_s")
            eta_text = f"{int(eta // 60)}:{int(eta % 60):02d}" if eta is not None else "?"
            bar = "#" * int(30 * d["step"] / max(1, d["total"]))
            norms = f" keys scaled {d['keys_scaled']}" if "keys_scaled" in d else ""   # scale_weight_norms
            print(f"\r[{bar:<30}] {d['step']}/{d['total']} loss {d.get('ema') if d.get('ema') is not None else d.get('loss', 0):.4f} "
                  f"{d.get('steps_per_s', 0):.2f} it/s ETA {eta_text}{norms}  ", end="", flush=True)
        elif event.kind in ("status", "warning"):
            prefix = "warning: " if event.kind == "warning" else ""
            print(f"\n{prefix}{d['text']}", file=sys.stderr if event.kind == "warning" else sys.stdout, flush=True)
        elif event.kind == "saved":
            print(f"\nsaved {d['path']}", flush=True)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import save_config
    from ..errors import UserError

    cfg = settings_from_args(args)
    if args.save_config:
        target = Path(args.save_config).expanduser()
        # a file of the user's is not replaced (the Train tab asks for 'replace'); the --config file itself is
        # updated, which is what naming it for both asks
        if target.exists() and not (args.config and target.is_file() and os.path.samefile(target, args.config)):
            raise UserError(f"{target} already exists; give --save-config a new file name (or the --config file "
                            "itself to update it with these settings)")
        save_config(cfg, target)
        print(f"wrote {args.save_config}")
        return 0
    from ..train.preflight import FolderHost, preflight

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:   # one process: refuse bad input before torch loads
        preflight(cfg, FolderHost())
    from ..events import Events, StopToken
    from ..hosts.standalone import StandaloneHost
    from ..train.loop import train

    stop = StopToken()
    # Several processes (torchrun, accelerate launch): Ctrl-C in the terminal reaches every process, and the
    # launcher, catching it too, sends each process another SIGINT at once. A second signal within this many
    # seconds of the first is that copy, not a second Ctrl-C: the processes still agree on a step, save, exit.
    # (torchrun kills them after its --shutdown_timeout, 30 s by default, so the save must fit in that.)
    echo_s = 3.0 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0.0
    first = [0.0]

    def on_sigint(signum, frame):
        if stop.requested:
            if time.monotonic() - first[0] < echo_s:
                return
            raise KeyboardInterrupt
        first[0] = time.monotonic()
        stop.request("Ctrl-C")
        print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        host = StandaloneHost(device=args.device, dtype=args.dtype)
        result = train(cfg, host, Events(ProgressPrinter()), stop)
    finally:
        signal.signal(signal.SIGINT, previous)
    print()
    if result.stopped == "diverged":
        return 3
    if result.stopped == "stopped":
        return 130
    print(f"done: {result.steps} steps, final file {result.final}")
    return 0
