"""Ours vs. the reference loop over several training seeds: one figure per seed, the mean with a t interval.

    .venv/bin/python bench/quality.py --rows lora,reference --seed S --curve 1 --out seedS.json   # per seed
    .venv/bin/python bench/seeds.py RESULT.json [RESULT.json ...] [--out bench/results/lora-seeds.json]

Each result file holds the `lora` (our loop) and `reference` rows of one training seed (`settings.seed`; a file
with several seeds' rows is not expected: one run of bench/quality.py is one seed). Within one run every figure
has its own 95 % interval over its 96 samples, but that interval does not see how much a figure moves when only
the training seed changes (other training scenes, noise, timesteps and adapter initialisation). Over seeds:

- per loop and figure (fidelity, binding, bleeding, retention): the mean of the per-seed values with Student's t
  95 % interval (`toy.stats.mean_t`, n = seeds);
- ours − reference, paired by seed (both loops of one seed train on the same dataset): mean and t interval;
- the issue's target "ours vs. reference: fidelity and binding within each other's intervals or better", judged
  on the seed-level intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIGURES = ("fidelity", "binding", "bleeding", "retention")
LOOPS = {"ours": "lora", "reference": "reference"}


def collect(paths: list[Path]) -> dict[int, dict[str, dict[str, float]]]:
    """{seed: {loop: {figure: value}}} from result files; a seed found twice or a file without both rows is an
    error (the comparison is paired by seed)."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for path in paths:
        rows = json.loads(Path(path).read_text())["rows"]
        missing = [r for r in LOOPS.values() if r not in rows]
        if missing:
            raise SystemExit(f"{path}: no {' or '.join(missing)} row (each file must hold both loops of one seed)")
        seeds = {rows[r]["settings"]["seed"] for r in LOOPS.values()}
        if len(seeds) != 1:
            raise SystemExit(f"{path}: the two rows were trained with different seeds {sorted(seeds)}")
        seed = seeds.pop()
        if seed in out:
            raise SystemExit(f"seed {seed} appears twice ({path})")
        out[seed] = {loop: {f: rows[r][f]["value"] for f in FIGURES} for loop, r in LOOPS.items()}
    if len(out) < 2:
        raise SystemExit("give result files of at least two training seeds")
    return out


def summarise(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict:
    from lib_sdtrain.toy.stats import mean_t

    seeds = sorted(per_seed)
    table: dict = {"seeds": seeds, "per_seed": {str(s): per_seed[s] for s in seeds}, "figures": {}, "targets": []}
    for f in FIGURES:
        ours = mean_t([per_seed[s]["ours"][f] for s in seeds])
        ref = mean_t([per_seed[s]["reference"][f] for s in seeds])
        diff = mean_t([per_seed[s]["ours"][f] - per_seed[s]["reference"][f] for s in seeds])
        table["figures"][f] = {"ours": ours.to_dict(), "reference": ref.to_dict(), "ours_minus_reference": diff.to_dict()}
        if f in ("fidelity", "binding"):
            ok = ours.value >= ref.value or ref.lo <= ours.value <= ref.hi or ours.lo <= ref.value <= ours.hi
            table["targets"].append({
                "target": f"ours vs reference loop: {f} within each other's intervals or better ({len(seeds)} seeds)",
                "met": bool(ok), "detail": f"ours {ours.text(signed=f == 'binding')}, reference "
                                           f"{ref.text(signed=f == 'binding')}, paired difference {diff.text(signed=True)}"})
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="bench/quality.py result files, one training seed each")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora-seeds.json")
    args = ap.parse_args(argv)
    table = summarise(collect(args.results))
    table["sources"] = [str(p) for p in args.results]
    print(f"{'figure':10} {'ours':>24} {'reference':>24} {'ours - reference':>24}   (seeds {table['seeds']})")
    for f, d in table["figures"].items():
        cell = lambda x: f"{x['value']:+.3f} [{x['lo']:+.2f}, {x['hi']:+.2f}]"   # noqa: E731
        print(f"{f:10} {cell(d['ours']):>24} {cell(d['reference']):>24} {cell(d['ours_minus_reference']):>24}")
    for t in table["targets"]:
        print(f"  {'MET    ' if t['met'] else 'NOT MET'}  {t['target']}: {t['detail']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
