"""Render pictures with a model: Euler or DDIM with classifier-free guidance, seeded and deterministic."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from ..config import ConfigBase, add_arguments as add_setting_flags, setting
from ..errors import UserError
from ..sample_settings import MAX_PICTURE_SIDE, sampling_setting


@dataclass
class SampleSettings(ConfigBase):
    KIND = "sample"

    prompt: str = setting("", "what to draw")
    negative: str = setting("", "what not to draw (negative prompt)")
    seed: int = sampling_setting("seed")
    steps: int = sampling_setting("steps")
    sampler: str = sampling_setting("sampler")
    cfg_scale: float = sampling_setting("cfg_scale")
    width: int = setting(0, "picture width in pixels (multiple of 8); 0 = the model's native size (SD1 512, "
                            "SD2-v 768, SDXL 1024, the toy model 64)", minimum=0, maximum=MAX_PICTURE_SIDE, step=8)
    height: int = setting(0, "picture height in pixels (multiple of 8); 0 = the model's native size", minimum=0,
                          maximum=MAX_PICTURE_SIDE, step=8)
    count: int = setting(1, "pictures to render (seeds seed, seed+1, ...)", minimum=1, maximum=1000)
    zero_terminal_snr: bool = setting(False, "draw on the zero-terminal-SNR schedule: for a v-prediction model "
                                             "trained with zero_terminal_snr (A1111: the 'Zero Terminal SNR' noise "
                                             "schedule)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="checkpoint to sample from (default: the bundled toy model)")
    parser.add_argument("--out", required=True, help="output .png (with --count > 1: NAME-0000.png, ...)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--clip-skip", type=int, default=1)
    parser.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_setting_flags(parser, SampleSettings)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import overrides_from_args
    from ..formats.files import atomic_write
    from ..hosts import SampleRequest
    from ..hosts.standalone import StandaloneHost
    from ..sampling import render

    known = {s.name for s in SampleSettings.settings()}
    cfg = SampleSettings.from_dict({k: v for k, v in overrides_from_args(args).items() if k in known})
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError("--out must end in .png, .jpg or .webp")
    paths = [out] if cfg.count == 1 else [out.with_name(f"{out.stem}-{i:04d}{out.suffix}") for i in range(cfg.count)]
    for p in paths:
        if p.is_dir():   # --overwrite replaces files only: refused here, not after the pictures are drawn
            raise UserError(f"{p} is a folder; give --out a file name (e.g. {p / 'sample.png'})")
        if p.exists() and not args.overwrite:
            raise UserError(f"{p} exists; pass --overwrite to replace it")
    host = StandaloneHost(device=args.device, dtype=args.dtype, clip_skip=args.clip_skip, prediction=args.prediction)
    if not cfg.width or not cfg.height:   # the model's own size (read from its header; also checks the file)
        native, source = host.native_resolution(args.model)
        cfg = cfg.replace(width=cfg.width or native, height=cfg.height or native)
        print(f"{cfg.width}x{cfg.height} px ({source})")
    for side in (cfg.width, cfg.height):
        if side % 8:
            raise UserError(f"picture sides must be multiples of 8 (got {side})")
    parts = host.load(args.model)
    if cfg.zero_terminal_snr and parts.prediction != "v":
        # train refuses this pairing; here the pictures are still drawn, as A1111 draws them with its 'Zero
        # Terminal SNR' schedule on any model, but the user is told why they will look wrong
        print(f"warning: --zero-terminal-snr with a model that predicts the noise ({parts.prediction}), not v: at "
              "the first step its input is the noise itself, so it cannot tell what to draw and the pictures come "
              "out as noise or flat colour. The schedule is for v-prediction models trained with zero_terminal_snr "
              "(--prediction v if this one is such a model).", file=sys.stderr, flush=True)
    requests = [SampleRequest(cfg.prompt, cfg.negative, cfg.seed + i, cfg.steps, cfg.cfg_scale, cfg.width, cfg.height,
                              cfg.sampler, zero_terminal_snr=cfg.zero_terminal_snr) for i in range(cfg.count)]

    # one picture at a time, saved as soon as it is drawn: --count 1000 at a large size never holds them all
    for i, (req, p) in enumerate(zip(requests, paths)):
        def progress(step: int, total: int, i: int = i) -> None:
            print(f"\rsampling {i + 1}/{len(requests)}: step {step}/{total}", end="", flush=True)

        img = render(parts, [req], progress=progress)[0]
        print()
        atomic_write(p, lambda tmp, img=img, p=p: img.save(tmp, format=p.suffix.lstrip(".").upper().replace("JPG", "JPEG")),
                     overwrite=args.overwrite)
        print(f"saved {p}")
    return 0
