"""The bundled toy world: captioned shape pictures, concept datasets and the detector that scores samples.

  toy pictures --out DIR [--n 16]                  plain-world pictures with .txt captions
  toy dataset subject|style|class|base --out DIR   a concept folder in kohya's N_name layout
  toy detect IMAGES_OR_FOLDERS... [--json]         what the detector sees (and, with --score, accuracy
                                                   against the .txt captions beside the pictures)
  toy pretrain --out FILE [--minutes VAE UNET]     pretrain the toy SD1 model from scratch (time-budgeted)
  toy evaluate [MODEL] [--n 200]                   colour/shape/background accuracy on held-out prompts
  toy quality --work DIR [--method lora]           train on a toy concept: fidelity, bleeding, retention + grid
  toy pretrain-vae --out FILE [--minutes 18]      the VAE stage alone (pretrain --vae FILE reuses it)
  toy polish|resume MODEL --out FILE               decoder alone / UNet (+ text encoder) further, re-evaluated
  toy combine --unet A --vae B --out FILE          UNet + text encoder of A with the VAE of B (same encoder)
  toy install --webui DIR                          copy the toy model into an A1111 install (with its .yaml)
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from ..errors import UserError
from ..methods import METHOD_NAMES
from ..sample_settings import MAX_SEED, SAMPLERS, SAMPLING, canonical_sampler

# kind -> (default pictures, default repeats, one-line description)
DATASET_KINDS: dict[str, tuple[int, int, str]] = {
    "subject": (12, 20, "subject instances 'zwx shape' in <out>/img/<N>_zwx shape"),
    "style": (100, 2, "style pictures 'zkz style, a ...' in <out>/img/<N>_zkz style"),
    "class": (200, 1, "regularization/class pictures in <out>/reg/<N>_shape"),
    "base": (1000, 1, "plain-world pictures for pretraining in <out>/img/<N>_shape"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _model_job_flags(p: argparse.ArgumentParser, *, eval_samples: bool = True, eval_cfg: bool = True,
                     threads: str = "as the model was trained") -> None:
    """The flags every command that writes a toy model shares: the final evaluation, device, threads, overwrite."""
    if eval_samples:
        p.add_argument("--eval-samples", type=int, default=None, help="held-out prompts scored at the end (default: 200)")
    if eval_cfg:
        p.add_argument("--eval-cfg", type=float, default=None,
                       help="guidance scale of the final evaluation (default: as the model was trained)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help=f"CPU threads (default: {threads})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _architecture_flags(p: argparse.ArgumentParser, *, unet: bool = True) -> None:
    """What a new toy model is made of (the defaults are the bundled model's recipe): for trials of another
    resolution, a wider VAE or a UNet that also learns textures, without editing code."""
    p.add_argument("--size", type=int, default=None, help="picture side, a multiple of 64 (default: 64)")
    p.add_argument("--vae-widths", type=_widths, default=None, help="VAE channels per level, e.g. 64,128,256,256 "
                   "(multiples of 32; default: 32,64,128,128)")
    p.add_argument("--vae-layers", type=int, default=None, help="VAE ResNet blocks per level (default: 1)")
    p.add_argument("--vae-data", choices=("broad", "broad-bands", "world"), default=None,
                   help="the VAE's pictures (default: broad; broad-bands also has bands inside shapes at every angle)")
    if unet:
        p.add_argument("--unet-widths", type=_widths, default=None,
                       help="UNet channels per level (multiples of 32; default: 32,64,64,64)")
        p.add_argument("--batch", dest="unet_batch", type=int, default=None, help="UNet batch (default: 64)")
        p.add_argument("--latent-pictures", type=int, default=None,
                       help="pictures in the UNet's latent cache (default: 8000)")
        p.add_argument("--textured-share", type=float, default=None, help="trial: share of base-shape pictures "
                       "drawn with a captioned texture inside the shape (default: 0)")


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if not 2 <= len(widths) <= 6 or any(w < 32 or w > 1024 or w % 32 for w in widths):
        raise argparse.ArgumentTypeError(f"{text!r}: give 2 to 6 widths, each a multiple of 32 from 32 to 1024")
    return widths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="toy_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("pictures", help="write plain-world pictures with .txt captions")
    p.add_argument("--out", required=True, help="folder to write (must be new or empty)")
    p.add_argument("--n", type=int, default=16, help="number of pictures (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--size", type=int, default=64, help="picture side in pixels (default: 64)")
    p.add_argument("--holdout", choices=("exclude", "only", "include"), default="include",
                   help="held-out attribute combinations: leave out, only those, or any (default: include)")
    p.add_argument("--concept", choices=("none", "subject", "style"), default="none",
                   help="draw the subject (zwx shape) or the style (zkz) instead of plain shapes")

    p = sub.add_parser("dataset", help="write a toy concept dataset folder")
    p.add_argument("kind", choices=list(DATASET_KINDS),
                   help="; ".join(f"{k}: {v[2]}" for k, v in DATASET_KINDS.items()))
    p.add_argument("--out", required=True, help="dataset root (img/ and reg/ are made inside)")
    p.add_argument("--n", type=int, default=None, help="number of pictures (default: 12/100/200/1000 by kind)")
    p.add_argument("--repeats", type=int, default=None, help="kohya repeats in the folder name (default: 20/2/1/1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--size", type=int, default=64, help="picture side in pixels (default: 64)")
    p.add_argument("--captions", default=None,
                   help="subject/style: full, short or token; class: generic, full or token (default: full/generic)")

    p = sub.add_parser("detect", help="name shape, colour, background, size, position and concepts in pictures")
    p.add_argument("images", nargs="+", help="picture files or folders of pictures")
    p.add_argument("--json", action="store_true", help="print one JSON object per picture")
    p.add_argument("--score", action="store_true",
                   help="compare with the toy captions in the .txt files beside the pictures and print accuracy")
    p.add_argument("--weights", default=None, help="detector weights (default: the shipped ones)")

    p = sub.add_parser("pretrain", help="pretrain the toy SD1 model from scratch, budgeted by wall time")
    p.add_argument("--out", required=True, help="output .safetensors (its .yaml is written beside it)")
    p.add_argument("--minutes", type=float, nargs=2, metavar=("VAE", "UNET"), default=None,
                   help="time budget per stage in minutes (default: 12 36)")
    p.add_argument("--decoder-minutes", type=float, default=None,
                   help="after the UNet, train the VAE decoder alone for this long (default: 0 = skip)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: 1234)")
    _model_job_flags(p, eval_cfg=False, threads="torch's choice; 1 is fastest on a busy shared machine")

    p.add_argument("--vae", default=None,
                   help="start from a VAE written by `toy pretrain-vae` (its VAE stage is then skipped)")
    _architecture_flags(p)

    p = sub.add_parser("pretrain-vae", help="train only the toy VAE (stage 1 of pretrain), budgeted by wall time")
    p.add_argument("--out", required=True, help="output .safetensors (the VAE alone, with its training record)")
    _architecture_flags(p, unet=False)
    p.add_argument("--minutes", type=float, default=18.0, help="time budget in minutes (default: 18)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: 1234)")
    _model_job_flags(p, eval_samples=False, eval_cfg=False, threads="torch's choice")

    p = sub.add_parser("combine", help="UNet + text encoder of one toy model, VAE of another (same encoder)")
    p.add_argument("--unet", required=True, help="the model whose UNet and text encoder are kept")
    p.add_argument("--vae", required=True, help="the model whose VAE is kept (its encoder must equal the other's)")
    p.add_argument("--out", required=True, help="output .safetensors (its .yaml is written beside it)")
    _model_job_flags(p)

    p = sub.add_parser("polish", help="train only the VAE decoder of a saved toy model (encoder frozen), re-evaluate")
    p.add_argument("model", help="the toy model to start from")
    p.add_argument("--out", required=True, help="output .safetensors (its .yaml is written beside it)")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget in minutes (default: 8)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model's decoder_lr)")
    p.add_argument("--pictures", choices=("broad", "broad-bands", "world"), default=None,
                   help="training pictures: broad (v2: bands inside shapes held out), broad-bands (v2.1 trial: "
                        "bands at every angle, the toy world and textures twice as often) or world (v1); default: "
                        "the model's own")
    _model_job_flags(p)

    p = sub.add_parser("resume", help="train the UNet of a saved toy model further, then re-evaluate")
    p.add_argument("model", help="the toy model to start from")
    p.add_argument("--out", required=True, help="output .safetensors (its .yaml is written beside it)")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget in minutes (default: 10)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: half the pretraining one)")
    p.add_argument("--size", type=int, default=None, help="picture side to train at, a multiple of 64 (default: the "
                   "model's own; 128 teaches a 64-px model 16 x 16 latents, and it is then evaluated at that size)")
    p.add_argument("--batch", dest="unet_batch", type=int, default=None, help="UNet batch (default: the model's own)")
    p.add_argument("--latent-pictures", type=int, default=None, help="pictures in the latent cache (default: the "
                   "model's own)")
    p.add_argument("--textured-share", type=float, default=None, help="trial: share of base-shape pictures drawn "
                   "with a captioned texture inside the shape (slanted stripes, checks, dots, grid; default: the "
                   "model's own, 0)")
    _model_job_flags(p)

    p = sub.add_parser("evaluate", help="score a model on held-out toy prompts with the detector")
    p.add_argument("model", nargs="?", default=None, help=".safetensors model (default: the bundled toy model)")
    p.add_argument("--n", type=int, default=200, help="number of held-out prompts (default: 200)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--cfg", type=float, default=6.0, help="classifier-free guidance scale (default: 6)")
    p.add_argument("--sampler", type=canonical_sampler, choices=SAMPLERS, default="ddim",
                   help="sampler (default: ddim; A1111's DDIM / Euler work too)")
    p.add_argument("--seed", type=int, default=None, help="prompt/noise seed (default: 2024)")
    p.add_argument("--holdout", choices=("only", "exclude", "include"), default="only",
                   help="prompts from the held-out triples only (default), the training ones, or any")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--grid", default=None, help="also write the first 64 samples as a PNG grid here (a new file "
                                                "ending in .png)")

    p = sub.add_parser("quality", help="train a method on a toy concept; print fidelity, binding, bleeding, "
                                       "retention with 95 % intervals")
    p.add_argument("--method", default="lora", help="training method (default: lora)")
    p.add_argument("--concept", choices=("subject", "style"), default="subject", help="toy concept (default: subject)")
    p.add_argument("--model", default="", help="base model (default: the bundled toy model)")
    p.add_argument("--work", required=True, help="new or empty folder for the dataset, the run and the trained file")
    p.add_argument("--grid", default=None, help="write the labelled before/after PNG grid here (default: WORK/grid.png)")
    p.add_argument("--json", default=None, help="also write the result row as JSON here")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the method's toy default)")
    p.add_argument("--samples", type=int, default=96, help="token and class samples each (default: 96)")
    p.add_argument("--seeds-per-prompt", type=int, default=1, help="seeds per prompt (default: 1)")
    p.add_argument("--world-samples", type=int, default=96, help="plain-world samples (default: 96)")
    p.add_argument("--curve", type=int, default=1, help="saves measured (default: 1, the final file)")
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale of the measuring samples "
                   "(default: 7, A1111's)")
    p.add_argument("--seed", type=int, default=0, help="dataset and training seed (default: 0)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--train-threads", type=int, default=0, help="CPU threads while training (default: as the "
                   "process is set); the measurements keep the process's count")
    p.add_argument("--tensorboard", action="store_true", help="also write a TensorBoard log (loss, learning rate and "
                   "the quality figures per save); its folder is printed at the end")
    p.add_argument("--overwrite", action="store_true", help="replace existing --grid / --json files")

    p = sub.add_parser("install", help="copy the toy model into an AUTOMATIC1111 install, with its .yaml")
    p.add_argument("--webui", required=True, help="the A1111 folder, or its models/Stable-diffusion folder")
    p.add_argument("--model", default=None, help="model to install (default: the bundled toy model)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different model of that name, or an edited .yaml or tokenizer file beside it")


def run(args: argparse.Namespace) -> int:
    if args.toy_command == "pictures":
        return _pictures(args)
    if args.toy_command == "dataset":
        return _dataset(args)
    if args.toy_command == "pretrain":
        return _pretrain(args)
    if args.toy_command == "pretrain-vae":
        return _pretrain_vae(args)
    if args.toy_command in ("polish", "resume", "combine"):
        return _polish(args)
    if args.toy_command == "evaluate":
        return _evaluate(args)
    if args.toy_command == "quality":
        return _quality(args)
    if args.toy_command == "install":
        return _install(args)
    return _detect(args)


def _pictures(args: argparse.Namespace) -> int:
    from ..formats.files import atomic_write, atomic_write_text, make_folder
    from ..toy import world

    if args.n < 1 or args.n > 100_000:
        raise UserError(f"--n must be from 1 to 100000, not {args.n}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; choose another --out")
    shapes = (world.SUBJECT_SHAPE,) if args.concept == "subject" else world.BASE_SHAPES
    holdout = "include" if args.concept == "subject" else args.holdout
    style = "striped" if args.concept == "style" else "plain"
    scenes = world.sample_scenes(args.n, args.seed, holdout, shapes=shapes, style=style)
    images = world.render_scenes(scenes, args.size, args.seed)
    make_folder(out)
    for i, (img, scene) in enumerate(zip(images, scenes)):
        path = out / f"{i:04d}.png"
        atomic_write(path, lambda p, img=img: img.save(p, format="PNG"), overwrite=False)
        atomic_write_text(path.with_suffix(".txt"), scene.caption() + "\n", overwrite=False)
    print(f"wrote {len(images)} pictures with captions to {out}")
    return 0


def _dataset(args: argparse.Namespace) -> int:
    from ..toy import datasets

    n_default, repeats_default, _ = DATASET_KINDS[args.kind]
    n = args.n if args.n is not None else n_default
    repeats = args.repeats if args.repeats is not None else repeats_default
    common = dict(n_images=n, repeats=repeats, seed=args.seed, size=args.size)
    if args.kind == "subject":
        written = datasets.make_subject_dataset(args.out, captions=args.captions or "full", **common)
    elif args.kind == "style":
        written = datasets.make_style_dataset(args.out, captions=args.captions or "full", **common)
    elif args.kind == "class":
        written = datasets.make_class_set(args.out, captions=args.captions or "generic", **common)
    else:
        if args.captions is not None:
            raise UserError("--captions does not apply to the base dataset")
        written = datasets.make_base_dataset(args.out, **common)
    print(f"wrote {len(written.images)} pictures to {written.folder} ({written.repeats} repeats)")
    print(f"  e.g. {written.images[0].name}: {written.captions[0]}")
    return 0


def _collect(items: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise UserError(f"no pictures in {p}")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"not found: {p}")
    return paths


def _detect(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from ..toy import world
    from ..toy.detector import Detector

    paths = _collect(args.images)
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read picture {p}: {e}") from None
    found = Detector.load(args.weights).detect(images)

    for p, d in zip(paths, found):
        if args.json:
            print(json.dumps({"path": str(p), **d.to_dict()}))
        else:
            print(f"{p}: {d.size} {d.colour} {d.shape} {d.position} / {d.background} background"
                  f"  (shape {d.shape_conf:.2f}, colour {d.colour_conf:.2f})"
                  f"  subject {d.subject:.2f}  style {d.style:.2f}")

    if args.score:
        hits: dict[str, list[bool]] = {}
        for p, d in zip(paths, found):
            txt = p.with_suffix(".txt")
            if not txt.is_file():
                raise UserError(f"--score needs a caption beside every picture; {txt} is missing")
            attrs = world.caption_attributes(txt.read_text(encoding="utf-8"))
            for key in ("shape", "colour", "background", "size", "position"):
                if key in attrs:
                    hits.setdefault(key, []).append(getattr(d, key) == attrs[key])
            hits.setdefault("subject", []).append(d.has_subject == (attrs.get("shape") == world.SUBJECT_SHAPE))
            hits.setdefault("style", []).append(d.has_style == ("style" in attrs))
        summary = {k: sum(v) / len(v) for k, v in hits.items()}
        if args.json:
            print(json.dumps({"accuracy": summary, "pictures": len(paths)}))
        else:
            parts = ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary.items())
            print(f"accuracy: {parts} ({len(paths)} pictures)")
    return 0


def _stamp(text: str) -> None:
    import time

    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


def _pretrain(args: argparse.Namespace) -> int:
    from ..events import Events
    from ..toy.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig()
    if args.minutes is not None:
        if not all(0 <= m <= 24 * 60 for m in args.minutes):     # also refuses NaN
            raise UserError("--minutes must be between 0 and 1440 per stage")
        cfg.vae_minutes, cfg.unet_minutes = args.minutes
    if args.decoder_minutes is not None:
        if not 0 <= args.decoder_minutes <= 24 * 60:
            raise UserError("--decoder-minutes must be between 0 and 1440")
        cfg.decoder_minutes = args.decoder_minutes
    _set_checked(cfg, args, "seed", "threads", "eval_samples", *ARCHITECTURE)
    with _ctrl_c_stops() as stop:
        result = pretrain(args.out, cfg, events=Events(_printer()), stop=stop, device=args.device,
                          overwrite=args.overwrite, vae_path=args.vae)
    _report(result)
    return 0


def _pretrain_vae(args: argparse.Namespace) -> int:
    from ..events import Events
    from ..toy.pretrain import PretrainConfig, pretrain_vae

    cfg = PretrainConfig()
    if not 0 < args.minutes <= 24 * 60:
        raise UserError("--minutes must be more than 0 and at most 1440")
    cfg.vae_minutes = args.minutes
    _set_checked(cfg, args, "seed", "threads", *ARCHITECTURE[:4])
    with _ctrl_c_stops() as stop:
        info = pretrain_vae(args.out, cfg, events=Events(_printer()), stop=stop, device=args.device,
                            overwrite=args.overwrite)
    _stamp(f"wrote {args.out}: {json.dumps(info)}")
    return 0


# The architecture flags a new model takes (`_architecture_flags`; pretrain-vae: the first four).
# No UNet block count: A1111 names LoRA layers for 2 ResNet blocks a level only (lora targets refuse other counts).
ARCHITECTURE = ("size", "vae_widths", "vae_layers", "vae_data", "unet_widths", "unet_batch", "latent_pictures",
                "textured_share")

# Range checks of the options that several toy commands share: (test, message when it fails), or None for an
# option whose type already checks it.
_CHECKS = {
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"--seed must be from 0 to {MAX_SEED}"),
    "threads": (lambda v: 0 <= v <= 256, "--threads must be from 0 to 256"),
    # as `toy evaluate --n`: a larger count only failed after the whole run, at its final evaluation
    "eval_samples": (lambda v: 1 <= v <= 100_000, "--eval-samples must be from 1 to 100000"),
    "size": (lambda v: 64 <= v <= 512 and v % 64 == 0, "--size must be a multiple of 64 from 64 to 512"),
    "unet_batch": (lambda v: 1 <= v <= 4096, "--batch must be from 1 to 4096"),
    "latent_pictures": (lambda v: 16 <= v <= 1_000_000, "--latent-pictures must be from 16 to 1,000,000"),
    "textured_share": (lambda v: 0 <= v <= 0.9, "--textured-share must be from 0 to 0.9"),
    "vae_layers": (lambda v: 1 <= v <= 4, "--vae-layers must be from 1 to 4"),
    # checked by argparse as they are read (`_widths`, choices): copied as they are
    "vae_widths": None, "unet_widths": None, "vae_data": None,
}


def _set_checked(cfg, args: argparse.Namespace, *names: str) -> None:
    """Copy the given options that were set onto cfg, each after its range check (UserError when out of range)."""
    for name in names:
        value = getattr(args, name)
        if value is None:
            continue
        check = _CHECKS[name]
        if check is not None and not check[0](value):
            raise UserError(check[1])
        setattr(cfg, name, value)


@contextlib.contextmanager
def _ctrl_c_stops():
    """A StopToken that Ctrl-C requests while the block runs (the run ends cleanly at its next check)."""
    import signal

    from ..events import StopToken

    stop = StopToken()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.request("interrupted"))
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _printer():
    last: dict[str, float] = {}

    def show(event) -> None:
        import time

        if event.kind in ("status", "warning"):
            _stamp(("warning: " if event.kind == "warning" else "") + event.data["text"])
        elif event.kind == "loss":
            now = time.monotonic()
            if now - last.get("t", 0.0) >= 30:          # one line per 30 s is plenty for a long run
                last["t"] = now
                d = event.data
                _stamp(f"{d['stage']} step {d['step']} loss {d['loss']:.4f} lr {d['lr']:.2e}")

    return show


def _polish(args: argparse.Namespace) -> int:
    from ..events import Events
    from ..toy.pretrain import PretrainConfig, combine, polish, resume_unet

    if args.toy_command != "combine" and not 0 < args.minutes <= 24 * 60:
        raise UserError("--minutes must be more than 0 and at most 1440")
    with _ctrl_c_stops() as stop:
        from ..formats.safetensors_io import read_metadata

        source = args.unet if args.toy_command == "combine" else args.model
        cfg = PretrainConfig.from_metadata(read_metadata(source), source)
        # --threads as pretrain checks it: -5 became 0 unsaid, 10**20 reached torch.set_num_threads (a traceback)
        _set_checked(cfg, args, "eval_samples", "threads")
        if args.eval_cfg is not None:
            if not 1 <= args.eval_cfg <= 30:
                raise UserError("--eval-cfg must be from 1 to 30")
            cfg.eval_cfg = args.eval_cfg
        if args.toy_command == "combine":
            result = combine(args.unet, args.vae, args.out, cfg, events=Events(_printer()), stop=stop,
                             device=args.device, overwrite=args.overwrite)
        elif args.toy_command == "resume":
            if args.lr is not None and not 0 < args.lr < 1:
                raise UserError("--lr must be between 0 and 1")
            _set_checked(cfg, args, "size", "unet_batch", "latent_pictures", "textured_share")
            result = resume_unet(args.model, args.out, args.minutes, cfg, lr=args.lr, events=Events(_printer()),
                                 stop=stop, device=args.device, overwrite=args.overwrite)
        else:
            if args.lr is not None:
                if not 0 < args.lr < 1:
                    raise UserError("--lr must be between 0 and 1")
                cfg.decoder_lr = args.lr
            if args.pictures is not None:
                cfg.vae_data = args.pictures
            result = polish(args.model, args.out, args.minutes, cfg, events=Events(_printer()), stop=stop,
                            device=args.device, overwrite=args.overwrite)
    _report(result)
    return 0


def _report(result) -> None:
    acc = result.accuracy
    _stamp(f"wrote {result.path} and {result.yaml_path.name}")
    print(f"steps: {json.dumps(result.steps)}; "
          f"seconds: {json.dumps({k: round(v) for k, v in result.seconds.items()})}")
    print(f"held-out accuracy: colour {100 * acc['colour']:.1f}%, shape {100 * acc['shape']:.1f}%, "
          f"background {100 * acc['background']:.1f}% ({int(acc['samples'])} prompts)")


def _evaluate(args: argparse.Namespace) -> int:
    from ..hosts.standalone import StandaloneHost
    from ..toy.evaluate import DEFAULT_EVAL_SEED, GATE, check_grid_path, evaluate_parts

    if args.n < 1 or args.n > 100_000:
        raise UserError(f"--n must be from 1 to 100000, not {args.n}")
    if args.steps < 1 or args.steps > 1000:
        raise UserError(f"--steps must be from 1 to 1000, not {args.steps}")
    cfg_range = SAMPLING["cfg_scale"]      # as every sampling box: NaN, inf or 1e300 scored pictures of NaN as empty
    if not cfg_range.minimum <= args.cfg <= cfg_range.maximum:
        raise UserError(f"--cfg must be from {cfg_range.minimum:g} to {cfg_range.maximum:g}, not {args.cfg}")
    if args.grid:
        check_grid_path(args.grid)       # before minutes of sampling, not after them
    parts = StandaloneHost(device=args.device, dtype="fp32").load(args.model)
    seed = DEFAULT_EVAL_SEED if args.seed is None else args.seed
    if seed < 0:
        raise UserError("--seed must be a non-negative integer")
    acc = evaluate_parts(parts, n=args.n, seed=seed, steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler,
                         holdout=args.holdout, grid=args.grid)
    if args.json:
        print(json.dumps({"model": parts.info.path, **acc}))
        return 0
    print(f"{parts.info.name}: {int(acc['samples'])} prompts ({args.holdout} held-out), {args.steps} steps, "
          f"CFG {args.cfg:g}, {args.sampler}")
    for key in ("colour", "shape", "background", "size", "position"):
        bar = f"  (gate {100 * GATE[key]:.0f}%)" if key in GATE else ""
        print(f"  {key:<10} {100 * acc[key]:5.1f}%{bar}")
    print(f"  shape: small {100 * acc.get('shape_small', 0):.1f}%, large {100 * acc.get('shape_large', 0):.1f}%; "
          f"empty pictures {100 * acc['empty']:.1f}%")
    if args.grid:
        print(f"  grid: {args.grid}")
    return 0


def _install(args: argparse.Namespace) -> int:
    from ..toy.install import install_toy_model

    path = install_toy_model(Path(args.webui), overwrite=args.overwrite, model=args.model)
    print(f"installed {path.name} in {path.parent}")
    print(f"  config: {path.with_suffix('.yaml')}")
    print("  refresh the checkpoint list in the WebUI and pick it")
    return 0


def _quality(args: argparse.Namespace) -> int:
    import time

    from ..events import Events
    from ..formats.files import atomic_write_text, make_folder
    from ..toy.evaluate import check_grid_path
    from ..toy.quality import QualitySettings, run_quality

    work = Path(args.work)
    grid = check_grid_path(args.grid or work / "grid.png", overwrite=args.overwrite, overwrite_flag="--overwrite")
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise UserError(f"{args.json} already exists; pass --overwrite or choose another path")
    overrides = {}
    if args.tensorboard:
        overrides = {"tensorboard": True}
    settings = QualitySettings(method=args.method, concept=args.concept, model=args.model, steps=args.steps,
                               seed=args.seed, concept_samples=args.samples, seeds_per_prompt=args.seeds_per_prompt,
                               world_samples=args.world_samples, curve=args.curve, cfg_scale=args.cfg,
                               device=args.device,
                               train_threads=args.train_threads, overrides=overrides)
    t0 = time.monotonic()

    def show(event) -> None:
        if event.kind in ("status", "warning"):
            _stamp(("warning: " if event.kind == "warning" else "") + event.data["text"])
        elif event.kind == "progress" and "steps_per_s" in event.data:
            d = event.data
            if d["step"] % 50 == 0 or d["step"] == d["total"]:
                _stamp(f"step {d['step']}/{d['total']} loss {d.get('ema') or d['loss']:.4f}")

    settings.validate()                      # bad settings are refused before any folder is made
    make_folder(grid.parent)
    row = run_quality(settings, work, grid=grid, events=Events(show))
    if args.json:
        atomic_write_text(args.json, json.dumps(row, indent=2) + "\n", overwrite=True)
    concept = "zwx shape" if args.concept == "subject" else "zkz style"

    def iv(d, signed=False):
        f = "{:+.1f}" if signed else "{:.1f}"
        return f"{f.format(100 * d['value'])} % [{f.format(100 * d['lo'])}, {f.format(100 * d['hi'])}]"

    n = row["samples"]
    print()
    print(f"{args.method} on the toy {args.concept} ({concept}): {row['steps']} steps, "
          f"{row['seconds']['train']:.0f} s training, {time.monotonic() - t0:.0f} s in all")
    print(f"  95 % intervals; {n['concept']} samples per figure ({n['prompts']} prompts x {n['seeds_per_prompt']} "
          f"seeds), {n['world']} plain prompts for retention")
    print(f"  fidelity   {iv(row['fidelity'])} of prompts with the token show the concept "
          f"(base model: {iv(row['fidelity_before'])})")
    if row.get("fidelity_of_ceiling"):
        print(f"             = {iv(row['fidelity_of_ceiling'])} of the VAE round-trip ceiling {iv(row['ceiling'])}")
    if row.get("fidelity_strict"):
        print(f"             {iv(row['fidelity_strict'])} as a strict person reads the hearts (a reader fitted to "
              "pictures labelled by eye; lib_sdtrain/toy/data/README.md)")
    print(f"  binding    {iv(row['binding'], True)} points: with the token minus the same prompt with the class word")
    print(f"  bleeding   {iv(row['bleeding'], True)} points: class-word prompts showing it, after minus before")
    if row.get("retention"):
        wa = row["world_accuracy"]
        print(f"  retention  {row['retention']['value']:.3f} [{row['retention']['lo']:.3f}, {row['retention']['hi']:.3f}]"
              f" plain-world accuracy after / before ({100 * wa['after']:.1f} % / {100 * wa['before']:.1f} %)")
    print(f"  samples: {row['grid']}")
    print(f"  trained file: {row['trained_file']}")
    if row.get("tensorboard"):
        print(f"  TensorBoard log: {row['tensorboard']}  (view: tensorboard --logdir {row['tensorboard']})")
    elif args.tensorboard:
        print("  no TensorBoard log was written (install tensorboardX or tensorboard)")
    return 0
