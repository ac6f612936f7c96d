"""The subject rows of quality results read again by the strict heart reader (`lib_sdtrain/toy/strict.py`).

    .venv/bin/python bench/strict_reading.py RESULT.json [RESULT.json ...] [--out bench/results/strict_reading.json]

Each result must have kept its pictures (`bench/quality.py --keep-samples`). For every subject row and save: the
share of token samples the strict reader calls hearts (Wilson interval), the same for the class-word samples,
and the detector's figure beside them. With several files of one row, one training seed each, the mean over
seeds with a Student t interval. The reader stands in for a strict person (held out against one: agreement
0.81, kappa 0.58, 36 hearts called where the person saw 28 in 96 and the detector 60;
`lib_sdtrain/toy/data/strict_heart.json`), so these figures say roughly what such a person would read, not what
every person would.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def read_rows(paths: list[Path]) -> list[dict]:
    from lib_sdtrain.errors import UserError
    from lib_sdtrain.toy.quality import load_samples
    from lib_sdtrain.toy.stats import share
    from lib_sdtrain.toy.strict import default_strict

    reader = default_strict()
    out = []
    for path in paths:
        rows = json.loads(Path(path).read_text())["rows"]
        for name, row in rows.items():
            if row.get("concept") != "subject":
                continue
            files = row.get("sample_files")
            if not files:
                raise UserError(f"{path}: row {name} kept no pictures (run it with --keep-samples)")
            points = []
            for point in row["curve"][1:]:
                token, plain, _ = load_samples(files[str(point["step"])])
                points.append({"step": point["step"], "strict": share(reader.calls(token)).to_dict(),
                               "strict_class": share(reader.calls(plain)).to_dict(),
                               "detector": point["fidelity"]})
            token, plain, _ = load_samples(files["base"])
            out.append({"file": str(path), "row": name, "label": row.get("label", name),
                        "seed": row["settings"]["seed"], "before": share(reader.calls(token)).to_dict(),
                        "saves": points})
    return out


def main(argv: list[str] | None = None) -> int:
    from lib_sdtrain.toy.stats import mean_t

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    rows = read_rows(args.results)
    print(f"{'file':42s} {'row':20s} seed  step  strict (token)        strict (class)  detector")
    for r in rows:
        for s in r["saves"]:
            st, sc, d = s["strict"], s["strict_class"], s["detector"]
            print(f"{Path(r['file']).name[:42]:42s} {r['row'][:20]:20s} {r['seed']:4d} {s['step']:5d}  "
                  f"{st['value']:.2f} [{st['lo']:.2f}, {st['hi']:.2f}]   {sc['value']:.2f}            "
                  f"{d['value']:.2f}")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["label"], []).append(r)
    summary = {}
    for label, rs in groups.items():
        seeds = sorted({r["seed"] for r in rs})
        if len(seeds) < 2 or len(seeds) != len(rs):
            continue
        last = [r["saves"][-1] for r in rs]
        summary[label] = {"seeds": seeds, "strict": mean_t([s["strict"]["value"] for s in last]).to_dict(),
                          "detector": mean_t([s["detector"]["value"] for s in last]).to_dict()}
        print(f"over seeds {seeds}, {label}: strict {summary[label]['strict']}, detector {summary[label]['detector']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "strict_reading", "rows": rows, "over_seeds": summary},
                                             indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
