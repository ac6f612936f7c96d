"""Check the toy detector against pictures a person labelled by eye.

    .venv/bin/python tools/eye_check.py make [--samples KEPT.npz:N ...] --out tests/data/toy_eye
    .venv/bin/python tools/eye_check.py check [--detector FILE] [--sheet tests/data/toy_eye]

`make` writes a contact sheet (`sheet.png`: 64-px tiles, 8 per row, numbered in reading order from 0) of decoded
pictures of the kind the quality bench scores: VAE round trips of clean concept and plain pictures, and
samples a quality run kept (`bench/quality.py --keep-samples`): token and class-word prompts of trained
models. `pictures.json`
records how each tile was made (prompt, seed, source scene). A person then looks at the sheet and writes
`labels.json`: for each tile whether a heart is visible ("heart": true/false) and whether horizontal stripes are
("stripes": true/false), without looking at the detector. `check` prints the detector's agreement with those
labels (Cohen's kappa too, with 95 % intervals) per question, with `--by-source` also per kind of picture;
tests/test_toy_detector.py asserts floors on it.

Sheets (`SHEETS`): `tests/data/toy_eye` (64 tiles, made by `make`), `tests/data/toy_eye/style` (184 tiles
for the stripe question, made by a one-off script of the same kind from the final quality bench's kept
pictures: 24 zkz round trips of its ceiling set, 12 plain and 12 texture (checks, dots, grids, slanted stripes)
round trips, base-model style samples, LoRA-style samples at steps 150 and 300, LoRA-subject samples; its
labels.json says what), and `tests/data/toy_eye/subject` (208 tiles for the heart question, made by `make` from the
samples of a LoRA trained with the subject defaults: 96 token and 96 class-word samples of the quality bench's
prompts, 16 round trips) and `tests/data/toy_eye/style_first` (112 tiles, made by `make` from the samples of a
LoRA trained with the session-6 style defaults, style words in front: 48 token, 48 class-word, 16 round trips)
and `tests/data/toy_eye/subject_v21` (208 tiles for the heart question, made by `make` from the samples of a LoRA
trained on toy model v2.1 with the session-8 subject defaults, training seed 1: 96 token, 96 class-word, 16 round
trips; a stricter labeller than session 6's, see its labels.json and bench/README.md) and
`tests/data/toy_eye/style_v21` (112 tiles for the stripe question, from a session-8 style tuning run on v2.1
(class pictures weighted 4), training seed 1: 48 token, 48 no-style-words, 16 round trips).
All were labelled by eye before any detector output was looked at. Two more sheets ask one question each (`check`
scores only the questions a sheet's labels answer): `tests/data/toy_eye/subject_ab_s9` (96 LoRA token samples of
two subject settings, blind, session 9's labeller; hearts only) is the held-out set of the strict heart reader
(`tools/fit_strict_heart.py`), and `tests/data/toy_eye/style_ab_s10` (96 LoRA token samples of two style runs with
the session-8 defaults on datasets 0 and 2, blind, a session-10 labeller; stripes only; pictures.json names each
tile's run as its `group`) checks the detector on style samples of middling quality. `tests/data/toy_eye/subject_ab_s13`
(144 tiles: one LoRA's first 48 token samples at CFG 7 and at CFG 3, shuffled and labelled blind by session 13's
labeller, then 48 VAE round trips of the same scenes; hearts only; `group` names each tile's kind) is a held-out
check of the strict heart reader by a third, stricter person.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_sdtrain.toy import world  # noqa: E402

TILE = 64
PER_ROW = 8
SHEETS = ("tests/data/toy_eye", "tests/data/toy_eye/style", "tests/data/toy_eye/subject",
          "tests/data/toy_eye/style_first", "tests/data/toy_eye/subject_v21",
          "tests/data/toy_eye/style_v21", "tests/data/toy_eye/subject_ab_s9",
          "tests/data/toy_eye/style_ab_s10", "tests/data/toy_eye/subject_ab_s13")   # relative to the repository


def sheet(images: list) -> "Image.Image":
    from PIL import Image

    rows = -(-len(images) // PER_ROW)
    out = Image.new("RGB", (PER_ROW * TILE, rows * TILE), (0, 0, 0))
    for i, im in enumerate(images):
        r, c = divmod(i, PER_ROW)
        out.paste(im.convert("RGB"), (c * TILE, r * TILE))
    return out


def tiles(path: Path) -> list:
    """The tiles of a contact sheet, in reading order (the sheet's last row may hold black padding tiles)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        out = []
        for r in range(im.height // TILE):
            for c in range(im.width // TILE):
                out.append(im.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE)))
    return out


def make(args: argparse.Namespace) -> int:
    import torch

    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.toy.quality import concept_scenes, load_samples, roundtrip_ceiling

    torch.set_num_threads(1)
    parts = StandaloneHost(device="cpu", dtype="fp32").load(args.model or None)
    rng = np.random.default_rng(5)
    images, info = [], []
    # 16 VAE round trips: 8 hearts (every fourth striped), 8 base shapes (every second striped)
    hearts = concept_scenes("subject", 8, 9001)
    hearts = [world.Scene(s.shape, s.colour, s.size, s.position, s.background,
                          "striped" if i % 4 == 3 else "plain") for i, s in enumerate(hearts)]
    plain = world.sample_scenes(8, 9002, holdout="include", style="plain")
    plain = [world.Scene(s.shape, s.colour, s.size, s.position, s.background, "striped" if i % 2 else "plain")
             for i, s in enumerate(plain)]
    for group in (hearts, plain):
        _, _, rts = roundtrip_ceiling(parts, group, "subject", seed=9003)
        images += rts
        info += [{"kind": "roundtrip", "scene": s.__dict__} for s in group]
    # samples kept by quality runs (`keep_samples`): the first N token and class-word pictures of each file
    for spec in args.samples:
        path, _, count = spec.partition(":")
        n = int(count or 8)
        token, plain_imgs, _ = load_samples(path)
        images += token[:n] + plain_imgs[:n]
        info += [{"kind": "kept sample", "file": Path(path).name, "set": "token", "index": i} for i in range(n)]
        info += [{"kind": "kept sample", "file": Path(path).name, "set": "class", "index": i} for i in range(n)]
    order = rng.permutation(len(images))          # shuffled, so the labeller cannot tell the kind by position
    images = [images[i] for i in order]
    info = [info[i] for i in order]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sheet(images).save(out / "sheet.png")
    (out / "pictures.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out / 'sheet.png'} ({len(images)} tiles) and pictures.json; now label them by eye in labels.json")
    return 0


def _kappa(f: np.ndarray, t: np.ndarray) -> float:
    po = float(np.mean(f == t))
    pe = float(f.mean() * t.mean() + (1 - f.mean()) * (1 - t.mean()))
    return (po - pe) / (1 - pe) if pe < 1 else 1.0


def agreement(found: list[bool], truth: list[bool], resamples: int = 2000) -> dict[str, float]:
    """Share of agreement (Wilson 95 % interval) and Cohen's kappa (percentile bootstrap 95 % interval over
    the pictures, seeded) of two yes/no raters."""
    from lib_sdtrain.toy.stats import wilson_bounds

    f, t = np.asarray(found, bool), np.asarray(truth, bool)
    po = float(np.mean(f == t))
    kappa = _kappa(f, t)
    lo, hi = wilson_bounds(int(np.sum(f == t)), len(f))
    rng = np.random.default_rng(0)
    boot = [_kappa(f[i], t[i]) for i in (rng.integers(0, len(f), len(f)) for _ in range(resamples))]
    klo, khi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return {"n": len(f), "agreement": po, "agreement_lo": lo, "agreement_hi": hi, "kappa": kappa,
            "kappa_lo": klo, "kappa_hi": khi, "person_yes": int(t.sum()), "detector_yes": int(f.sum()),
            "missed": int(np.sum(t & ~f)), "extra": int(np.sum(f & ~t))}


def check(detector_path: str | None, folder: Path, by_source: bool = False) -> dict[str, dict[str, float]]:
    """Agreement of the detector with the labels of the sheet in `folder` per question; with `by_source`,
    also per kind of picture (keys "stripes/<source>", "heart/<source>"; the source read from pictures.json)."""
    from lib_sdtrain.toy.detector import Detector

    det = Detector.load(detector_path) if detector_path else Detector.load()
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))["labels"]
    pics = tiles(folder / "sheet.png")[:len(labels)]
    found = det.detect(pics)
    calls = {"heart": [d.has_subject for d in found], "stripes": [d.has_style for d in found]}
    calls = {q: c for q, c in calls.items() if all(q in x for x in labels)}   # the questions this sheet asked
    out = {q: agreement(calls[q], [x[q] for x in labels]) for q in calls}
    if by_source:
        info = json.loads((folder / "pictures.json").read_text(encoding="utf-8"))
        kinds = [source(x) for x in info[:len(labels)]]
        for kind in sorted(set(kinds)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            for q in calls:
                out[f"{q}/{kind}"] = agreement([calls[q][i] for i in idx], [labels[i][q] for i in idx])
    return out


def source(info: dict) -> str:
    """What kind of picture a tile is, from its pictures.json entry."""
    if info.get("group"):                   # a sheet that mixes runs of one kind names each run's group
        return f"{info['group']} {info.get('set', '')}".strip()
    if info.get("kind") == "kept sample":
        name = str(info.get("file", ""))
        model = "base" if name.startswith("base-") else name.split("-ours")[0]
        return f"{model} {info.get('set', '')}"
    if "broad" in info:
        return f"round trip {info['broad']}"
    if info.get("kind") == "kept round trip" or info.get("scene", {}).get("style") == "striped":
        return "round trip zkz"
    return "round trip plain"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--model", default="")
    m.add_argument("--samples", action="append", default=[], metavar="NPZ[:N]",
                   help="pictures kept by a quality run (keep_samples): its first N token and class-word pictures")
    m.add_argument("--out", default=str(ROOT / "tests" / "data" / "toy_eye"))
    c = sub.add_parser("check")
    c.add_argument("--detector", default=None)
    c.add_argument("--sheet", action="append", default=[],
                   help=f"a folder with sheet.png, labels.json, pictures.json (repeatable; default: {', '.join(SHEETS)})")
    c.add_argument("--by-source", action="store_true", help="also per kind of picture")
    args = ap.parse_args(argv)
    if args.cmd == "make":
        return make(args)
    for folder in args.sheet or [str(ROOT / x) for x in SHEETS]:
        print(folder)
        for k, v in check(args.detector, Path(folder), args.by_source).items():
            print(f"  {k}: agreement {100 * v['agreement']:.1f} % [{100 * v['agreement_lo']:.1f}, "
                  f"{100 * v['agreement_hi']:.1f}] of {v['n']}, kappa {v['kappa']:.2f} [{v['kappa_lo']:.2f}, "
                  f"{v['kappa_hi']:.2f}]; person yes {v['person_yes']}, detector yes {v['detector_yes']}, "
                  f"missed {v['missed']}, extra {v['extra']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
