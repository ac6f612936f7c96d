"""Print the tuning table of bench/README.md from bench/quality.py result files (one per variant).

    .venv/bin/python bench/tuning_table.py bench/results/tuning/*.json     (bench/quality.py or `toy quality --json` files)
    .venv/bin/python bench/tuning_table.py --final bench/results/quality.json

One line per row and save: variant label, row, step, fidelity, binding, bleeding, retention (value [95 %
interval]) and the sample counts, so the chosen defaults can be traced to measured curves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(d, signed=False):
    if not d:
        return "n/a"
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"{f.format(d['value'])} [{f.format(d['lo'])}, {f.format(d['hi'])}]"


def final_table(path: Path) -> int:
    """`--final RESULT.json`: one line per row (its last save) with every figure, for bench/README.md."""
    data = json.loads(path.read_text(encoding="utf-8"))
    print("| row | steps | fidelity (base) | of ceiling | binding | bleeding | effect | retention | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in data["rows"].items():
        print(f"| {name} ({r.get('label', name)}) | {r['steps']} | {fmt(r['fidelity'])} ({r['fidelity_before']['value']:.2f}) | "
              f"{fmt(r.get('fidelity_of_ceiling'))} | {fmt(r['binding'], True)} | {fmt(r['bleeding'], True)} | "
              f"{fmt(r['effect'], True)} | {fmt(r.get('retention'))} | {r['seconds']['train']:.0f} |")
    for c in data.get("targets", []):
        print(f"- {'met' if c['met'] else '**not met**'}: {c['target']} ({c['detail']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    if args and args[0] == "--final":
        return final_table(Path(args[1]))
    files = [Path(a) for a in args]
    if not files:
        print(__doc__)
        return 2
    print("| variant | row | step | fidelity | binding | bleeding | retention | n | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f in files:
        data = json.loads(f.read_text(encoding="utf-8"))
        # bench/quality.py writes {"rows": {name: row}} and a variant label; `toy quality --json` one row (its
        # label names the method, not the variant: the file name does)
        label = (data.get("label") if "rows" in data else "") or f.stem
        rows = data["rows"] if "rows" in data else {"lora-style" if data.get("concept") == "style" and
                                                    data.get("method") == "lora" else data.get("method", "row"): data}
        for name, row in rows.items():
            n = f"{row['samples']['concept']}/{row['samples']['world']}"
            for p in row["curve"][1:]:
                best = " *" if p["step"] == row["best_step"] else ""
                print(f"| {label} | {name} | {p['step']}{best} | {fmt(p['fidelity'])} | {fmt(p['binding'], True)} | "
                      f"{fmt(p['bleeding'], True)} | {fmt(p.get('retention'))} | {n} | {row['seconds']['train']:.0f} |")
    print("\n`*` = the save with the highest binding; n = samples per concept figure / plain samples (retention)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
