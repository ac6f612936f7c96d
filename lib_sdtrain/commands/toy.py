"""The bundled toy world: captioned shape pictures, concept datasets and the detector that scores samples.

  toy pictures --out DIR [--n 16]                  plain-world pictures with .txt captions
  toy dataset subject|style|class|base --out DIR   a concept folder in kohya's N_name layout
  toy detect IMAGES_OR_FOLDERS... [--json]         what the detector sees (and, with --score, accuracy
                                                   against the .txt captions beside the pictures)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError

# kind -> (default pictures, default repeats, one-line description)
DATASET_KINDS: dict[str, tuple[int, int, str]] = {
    "subject": (12, 20, "subject instances 'zwx shape' in <out>/img/<N>_zwx shape"),
    "style": (100, 2, "style pictures '... in zkz style' in <out>/img/<N>_zkz style"),
    "class": (200, 1, "regularization/class pictures in <out>/reg/<N>_shape"),
    "base": (1000, 1, "plain-world pictures for pretraining in <out>/img/<N>_shape"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


def run(args: argparse.Namespace) -> int:
    if args.toy_command == "pictures":
        return _pictures(args)
    if args.toy_command == "dataset":
        return _dataset(args)
    return _detect(args)


def _pictures(args: argparse.Namespace) -> int:
    from ..formats.files import atomic_write, atomic_write_text
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
    out.mkdir(parents=True, exist_ok=True)
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
