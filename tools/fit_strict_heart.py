"""Fit the strict heart reader (`lib_sdtrain/toy/strict.py`) to the pictures labelled by eye, and measure it.

    .venv/bin/python tools/fit_strict_heart.py [--l2 10] [--out lib_sdtrain/toy/data/strict_heart.json]
    .venv/bin/python tools/fit_strict_heart.py --check      # the shipped reader against every labelled set

Labelled sets (all LoRA-subject samples or round trips of the toy model, decoded pictures, heart yes/no):

- A  `tests/data/toy_eye/subject_v21`: 208 tiles (v2.1, training seed 1: 96 token, 96 class-word, 16 round
     trips), session 8's labeller;
- B  48 token tiles of `tests/data/toy_eye/subject` (v2), relabelled by session 8's labeller
     (`relabel_s8.json`);
- C  session 8's blind A/B (`bench/results/eye-ab-subject-v2-v21.json`): 48 other v2 token tiles of that sheet
     and 48 v2.1 token samples (seed 2), whose pictures are the defaults tiles of
     `tests/data/toy_eye/subject_ab_s9` (`heart_session8` there);
- D  `tests/data/toy_eye/subject_ab_s9`: 96 tiles (v2.1, seed 2: 48 of the defaults, 48 of rank 32 / alpha 16),
     session 9's labeller; D* = its 48 rank-32 tiles, pictures no fit has seen.

The shipped reader is fitted on A + B + C (one labeller, one criterion) and held out on D and D* (another
labeller); the leave-one-set-out rows show how it carries across sheets of the same labeller. Agreement and
Cohen's kappa per set, with the detector's own call (P(heart) >= 0.5) beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EYE = ROOT / "tests" / "data" / "toy_eye"


def _tiles(sheet: Path, indices) -> list:
    from PIL import Image

    with Image.open(sheet) as im:
        arr = np.asarray(im.convert("RGB"))
    per_row = arr.shape[1] // 64
    return [Image.fromarray(arr[(i // per_row) * 64:(i // per_row + 1) * 64, (i % per_row) * 64:(i % per_row + 1) * 64])
            for i in indices]


def labelled_sets() -> dict[str, tuple[list, list[bool]]]:
    """{name: (pictures, person's heart labels)} for the sets A, B, C, D, D* (see the module text)."""
    out = {}
    a = json.loads((EYE / "subject_v21" / "labels.json").read_text())["labels"]
    out["A"] = (_tiles(EYE / "subject_v21" / "sheet.png", [x["tile"] for x in a]), [bool(x["heart"]) for x in a])
    b = json.loads((EYE / "subject" / "relabel_s8.json").read_text())
    out["B"] = (_tiles(EYE / "subject" / "sheet.png", b["tiles"]), [bool(h) for h in b["heart_session8"]])
    d = json.loads((EYE / "subject_ab_s9" / "labels.json").read_text())["labels"]
    pics = json.loads((EYE / "subject_ab_s9" / "pictures.json").read_text())
    d_tiles = _tiles(EYE / "subject_ab_s9" / "sheet.png", [x["tile"] for x in d])
    defaults_tile = {p["index"]: t for t, p in enumerate(pics) if "defaults" in p["run"]}
    c = json.loads((ROOT / "bench" / "results" / "eye-ab-subject-v2-v21.json").read_text())
    c_imgs = [(_tiles(EYE / "subject" / "sheet.png", [i])[0] if src == "v2" else d_tiles[defaults_tile[i]])
              for src, i in c["key"]]
    out["C"] = (c_imgs, [bool(h) for h in c["heart"]])
    out["D"] = (d_tiles, [bool(x["heart"]) for x in d])
    star = [t for t, p in enumerate(pics) if "rank 32" in p["run"]]
    out["D*"] = ([d_tiles[t] for t in star], [bool(d[t]["heart"]) for t in star])
    return out


def anchor_set(n: int, seed: int = 4242) -> tuple[list, list[bool]]:
    """Clean drawings of the world, labelled by what they are: `n` hearts (yes: a clean heart is a heart to anyone)
    and `n` base shapes (no), all sizes, colours, positions and backgrounds. The labelled LoRA samples hold few
    clean hearts; without these the reader called only 80 % of clean hearts hearts."""
    from lib_sdtrain.toy import world

    hearts = world.sample_scenes(n, seed, holdout="include", shapes=(world.SUBJECT_SHAPE,))
    plain = world.sample_scenes(n, seed + 1, holdout="include")
    return (world.render_scenes(hearts, 64, seed + 2) + world.render_scenes(plain, 64, seed + 3),
            [True] * n + [False] * n)


def agreement(calls, person) -> dict:
    from lib_sdtrain.toy.evaluate import wilson_interval

    a, b = np.asarray(calls, bool), np.asarray(person, bool)
    po = float(np.mean(a == b))
    pe = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    lo, hi = wilson_interval(int(np.sum(a == b)), len(a))
    return {"n": len(a), "person": int(b.sum()), "called": int(a.sum()), "agreement": round(po, 4),
            "agreement_lo": round(lo, 4), "agreement_hi": round(hi, 4),
            "kappa": round((po - pe) / (1 - pe), 4) if pe < 1 else None}


def main(argv=None) -> int:
    from lib_sdtrain.toy import strict
    from lib_sdtrain.toy.detector import default_detector

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--l2", type=float, default=10.0)
    p.add_argument("--out", default=str(strict.STRICT_PATH))
    p.add_argument("--anchors", type=int, default=200, help="clean hearts and clean base shapes added to the fit "
                   "(each; 0 = none)")
    p.add_argument("--check", action="store_true", help="measure the shipped reader; fit nothing")
    args = p.parse_args(argv)
    det = default_detector()
    sets = labelled_sets()
    feats = {k: strict.features(det, imgs) for k, (imgs, _) in sets.items()}
    detector_calls = {k: [d.has_subject for d in det.detect(imgs)] for k, (imgs, _) in sets.items()}
    if args.check:
        reader = strict.default_strict()
        for k, (imgs, y) in sets.items():
            print(f"{k:3s} reader {agreement(reader.calls(imgs), y)}")
            print(f"{k:3s} detector {agreement(detector_calls[k], y)}")
        return 0
    train = ("A", "B", "C")
    anchors = anchor_set(args.anchors) if args.anchors > 0 else ([], [])
    anchor_x = strict.features(det, anchors[0]) if args.anchors > 0 else np.zeros((0, feats["A"].shape[1]))
    x = np.concatenate([feats[k] for k in train] + [anchor_x])
    y = [v for k in train for v in sets[k][1]] + anchors[1]
    table = strict.fit(x, y, args.l2)
    reader = strict.StrictHeart(table, det)
    held_out = {}
    for k in ("D", "D*"):
        held_out[k] = {"reader": agreement(reader.calls(sets[k][0]), sets[k][1]),
                       "detector": agreement(detector_calls[k], sets[k][1])}
    leave_one_out = {}
    for k in train:
        rest = [t for t in train if t != k]
        sub = strict.StrictHeart(strict.fit(np.concatenate([feats[t] for t in rest] + [anchor_x]),
                                            [v for t in rest for v in sets[t][1]] + anchors[1], args.l2), det)
        leave_one_out[k] = {"reader": agreement(sub.calls(sets[k][0]), sets[k][1]),
                            "detector": agreement(detector_calls[k], sets[k][1])}
    fitted_on = {k: agreement(reader.calls(sets[k][0]), sets[k][1]) for k in train}
    fresh = anchor_set(200, seed=777)          # other clean drawings than the anchors
    clean = {"hearts_called": int(sum(reader.calls(fresh[0][:200]))), "shapes_called": int(sum(
        reader.calls(fresh[0][200:]))), "n": 200}
    table = {"format": strict.FORMAT, "detector_sha256": strict.detector_sha256(),
             "fitted_on": "sets A + B + C of tools/fit_strict_heart.py (session 8's labeller) and "
                          f"{args.anchors} clean hearts + {args.anchors} clean base shapes: "
                          f"{len(y)} pictures, {int(np.sum(y))} hearts",
             "clean_drawings": clean,
             "question": "heart: would a person call the shape a heart (lobed or notched top, narrowing to a point)?",
             "held_out": held_out, "leave_one_set_out": leave_one_out, "on_the_fitted_sets": fitted_on, **table}
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print("clean drawings (other than the anchors):", clean)
    for name, part in (("held out", held_out), ("leave one set out", leave_one_out)):
        for k, v in part.items():
            print(f"{name:18s} {k:3s} reader {v['reader']}\n{'':18s} {k:3s} detector {v['detector']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
