"""Ours vs. the reference loop over several training seeds: one figure per seed, the mean with a t interval.

    .venv/bin/python bench/quality.py --rows lora,reference --seed S --curve 1 --out seedS.json   # per seed
    .venv/bin/python bench/seeds.py RESULT.json [RESULT.json ...] [--out bench/results/lora-seeds.json]
    .venv/bin/python bench/seeds.py --row ROW RESULT.json ... [--against RESULT.json ... --names A,B] --out OUT

With `--row`, one row of each file (one seed per file): its figures over the seeds (the mean with a t interval),
and with `--against` the same row of another set of files, paired by seed (e.g. one setting against another).

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


def collect_row(paths: list[Path], row: str, figures: tuple[str, ...] = FIGURES) -> dict[int, dict[str, float]]:
    """{seed: {figure: value}} of one row of each result file (one training seed per file); a seed found twice or
    a file without the row is an error. Figures a row does not have (e.g. a style row's class_share) are left out."""
    out: dict[int, dict[str, float]] = {}
    for path in paths:
        rows = json.loads(Path(path).read_text())["rows"]
        if row not in rows:
            raise SystemExit(f"{path}: no {row} row")
        seed = rows[row]["settings"]["seed"]
        if seed in out:
            raise SystemExit(f"seed {seed} appears twice ({path})")
        out[seed] = {f: rows[row][f]["value"] for f in figures if f in rows[row]}
    if len(out) < 2:
        raise SystemExit("give result files of at least two training seeds")
    return out


def over_seeds(per_seed: dict[int, dict[str, float]]) -> dict:
    """One setting's figures over seeds: {"seeds", "per_seed", "figures": {figure: mean with t interval}}."""
    from lib_sdtrain.toy.stats import mean_t

    seeds = sorted(per_seed)
    figures = [f for f in per_seed[seeds[0]] if all(f in per_seed[s] for s in seeds)]
    return {"seeds": seeds, "per_seed": {str(s): per_seed[s] for s in seeds},
            "figures": {f: mean_t([per_seed[s][f] for s in seeds]).to_dict() for f in figures}}


def _paired(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], names: tuple[str, str],
            figures: tuple[str, ...]) -> tuple[list[int], dict]:
    """(shared seeds, {figure: {A: mean, B: mean, "A_minus_B": paired mean}}) as t Intervals over the seeds."""
    from lib_sdtrain.toy.stats import mean_t

    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise SystemExit(f"the two sets share {len(seeds)} training seed(s); pairing needs at least two")
    x, y = names
    return seeds, {f: {x: mean_t([a[s][f] for s in seeds]), y: mean_t([b[s][f] for s in seeds]),
                       f"{x}_minus_{y}": mean_t([a[s][f] - b[s][f] for s in seeds])} for f in figures}


def _table(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], names: tuple[str, str],
           seeds: list[int], ivs: dict) -> dict:
    return {"seeds": seeds, "per_seed": {str(s): {names[0]: a[s], names[1]: b[s]} for s in seeds},
            "figures": {f: {k: v.to_dict() for k, v in d.items()} for f, d in ivs.items()}}


def compare(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], names: tuple[str, str],
            figures: tuple[str, ...] = FIGURES) -> dict:
    """Two settings over the seeds both have, paired by seed: per figure each one's mean and `A_minus_B`, all
    with t intervals over the seeds."""
    return _table(a, b, names, *_paired(a, b, names, figures))


def summarise(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict:
    ours_by_seed = {s: v["ours"] for s, v in per_seed.items()}
    ref_by_seed = {s: v["reference"] for s, v in per_seed.items()}
    names = ("ours", "reference")
    seeds, ivs = _paired(ours_by_seed, ref_by_seed, names, FIGURES)
    table = _table(ours_by_seed, ref_by_seed, names, seeds, ivs)
    table["targets"] = []
    for f in ("fidelity", "binding"):
        ours, ref, diff = ivs[f]["ours"], ivs[f]["reference"], ivs[f]["ours_minus_reference"]
        ok = ours.value >= ref.value or ref.lo <= ours.value <= ref.hi or ours.lo <= ref.value <= ours.hi
        table["targets"].append({
            "target": f"ours vs reference loop: {f} within each other's intervals or better ({len(seeds)} seeds)",
            "met": bool(ok), "detail": f"ours {ours.text(signed=f == 'binding')}, reference "
                                       f"{ref.text(signed=f == 'binding')}, paired difference {diff.text(signed=True)}"})
    return table


def _cell(x: dict) -> str:
    return f"{x['value']:+.3f} [{x['lo']:+.2f}, {x['hi']:+.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="bench/quality.py result files, one training seed each")
    ap.add_argument("--row", default="", help="summarise this row of each file over the seeds (instead of ours vs "
                    "reference in the same files)")
    ap.add_argument("--against", nargs="+", type=Path, default=[],
                    help="with --row: the same row of these files, paired with the results by seed")
    ap.add_argument("--names", default="a,b", help="with --against: the two sets' names in the table (default a,b)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON to write (default bench/results/lora-seeds.json; required with --row)")
    args = ap.parse_args(argv)
    if args.against and not args.row:
        raise SystemExit("--against needs --row")
    if args.row:
        if args.out is None:
            raise SystemExit("--row needs --out (the default file holds the ours-vs-reference summary)")
        figures = FIGURES + ("class_share",)
        per = collect_row(args.results, args.row, figures)
        if args.against:
            names = tuple(n.strip() for n in args.names.split(","))
            if len(names) != 2 or not all(names):
                raise SystemExit("--names needs two names, e.g. new,old")
            other = collect_row(args.against, args.row, figures)
            shared = tuple(f for f in figures if all(f in d for d in (*per.values(), *other.values())))
            table = compare(per, other, names, shared)   # type: ignore[arg-type]
            table["against"] = [str(p) for p in args.against]
            print(f"{'figure':12} {names[0]:>24} {names[1]:>24} {names[0] + ' - ' + names[1]:>24}   "
                  f"(row {args.row}, seeds {table['seeds']})")
            for f, d in table["figures"].items():
                print(f"{f:12} {_cell(d[names[0]]):>24} {_cell(d[names[1]]):>24} "
                      f"{_cell(d[f'{names[0]}_minus_{names[1]}']):>24}")
        else:
            table = over_seeds(per)
            print(f"row {args.row} over seeds {table['seeds']} (mean, t 95 % interval):")
            for f, d in table["figures"].items():
                print(f"  {f:12} {_cell(d)}")
        table["row"] = args.row
    else:
        table = summarise(collect(args.results))
        print(f"{'figure':10} {'ours':>24} {'reference':>24} {'ours - reference':>24}   (seeds {table['seeds']})")
        for f, d in table["figures"].items():
            print(f"{f:10} {_cell(d['ours']):>24} {_cell(d['reference']):>24} {_cell(d['ours_minus_reference']):>24}")
        for t in table["targets"]:
            print(f"  {'MET    ' if t['met'] else 'NOT MET'}  {t['target']}: {t['detail']}")
    table["sources"] = [str(p) for p in args.results]
    out = args.out or ROOT / "bench" / "results" / "lora-seeds.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
