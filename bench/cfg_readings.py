"""What the guidance scale (CFG) does to a trained toy LoRA's figures: one trained file, several CFGs, the same
prompts and seeds, the base model measured at each CFG too.

    .venv/bin/python bench/cfg_readings.py train --row lora --seed S --work DIR [--set KEY=VALUE ...]
    .venv/bin/python bench/cfg_readings.py measure --work DIR --cfgs 3,7 [--eval-seed 777] --out OUT.json
    .venv/bin/python bench/cfg_readings.py summary OUT.json [OUT.json ...] --out SUMMARY.json

`train` runs the quality bench's row (`toy.quality.run_quality_full`, the row's defaults, training seed S, CFG 7
as the bench measures it) into DIR and keeps the trained file, the row (DIR/row.json) and its samples (DIR/keep).
`measure` samples the base model and the trained file at each CFG (Euler 20, batched, 96 token prompts, the same
96 with the class word or without the style words, 96 plain prompts; `--eval-seed` draws other prompts) and keeps
every picture (DIR/cfg-*.npz; pictures already kept there are scored again rather than drawn again). Figures per CFG: fidelity (Wilson), for the subject also the strict reader's share
(`toy.strict`), class share, retention (plain-world accuracy ÷ the base model's at the same CFG), and the paired
difference against the first CFG listed (Newcombe, same prompts and seeds). `summary` takes one `measure` file
per training seed and gives each figure over the seeds (mean, Student's t 95 % interval, n = seeds) and the
difference against the first CFG paired by seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib_sdtrain.errors import UserError

ROWS = {"lora": "subject", "lora-style": "style"}
FIGURES = ("fidelity", "strict", "class_share", "retention")


def _settings(row: str, seed: int, work: Path, overrides: dict, extra: dict | None = None):
    from lib_sdtrain.toy.quality import QualitySettings

    if row not in ROWS:
        raise UserError(f"unknown row {row!r}; choose {', '.join(ROWS)}")
    return QualitySettings(**(extra or {}), method="lora", concept=ROWS[row], seed=seed,
                           keep_samples=str(work / "keep"), overrides=overrides, train_threads=1)


def train(row: str, seed: int, work: Path, overrides: dict, extra: dict | None = None) -> dict:
    from lib_sdtrain.toy.quality import run_quality_full

    if (work / "row.json").exists():
        raise UserError(f"{work} already holds a trained row; give a new folder")
    settings = _settings(row, seed, work, overrides, extra)
    result, _ = run_quality_full(settings, work / "work", grid=work / "grid.png")
    result["bench_row"] = row
    (work / "row.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def measure(work: Path, cfgs: list[float], eval_seed: int) -> dict:
    from lib_sdtrain.hosts.standalone import StandaloneHost, default_model
    from lib_sdtrain.toy import quality
    from lib_sdtrain.toy.stats import paired_difference, share

    if not cfgs:
        raise UserError("give at least one CFG")
    row = json.loads((work / "row.json").read_text())
    st = row["settings"]
    settings = quality.QualitySettings.from_row(row)
    model = Path(row["model"]) if row.get("model") else default_model()
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=work / "measure-outputs")
    parts = host.load(str(model))
    cfg = quality.train_settings(settings, work / "work" / "data", None, model, work / "measure-out")
    sets = quality.prompt_sets(row["concept"], 96, 96, eval_seed, 1)

    def sample(p, scale: float, name: str):
        kept = work / f"cfg-{name}-e{eval_seed}-cfg{scale:g}.npz"
        if kept.is_file():                  # pictures this measurement made before: scored again, not re-drawn
            return quality.score_measure(sets, *quality.load_samples(kept))
        return quality.measure(p, sets, steps=20, cfg_scale=scale, save=kept, size=settings.size)

    readings, first = {}, None
    for scale in cfgs:
        t0 = time.monotonic()
        base = sample(parts, scale, "base")
        trained, undo = quality._apply_file(host, parts, cfg, Path(row["trained_file"]))
        try:
            m = sample(trained, scale, "lora")
        finally:
            undo()
        entry = {"fidelity": m.fidelity().to_dict(), "class_share": m.class_share().to_dict(),
                 "class_share_base": base.class_share().to_dict(),
                 "world_accuracy": round(m.world_accuracy(), 4), "world_accuracy_base": round(base.world_accuracy(), 4),
                 "retention": round(m.world_accuracy() / base.world_accuracy(), 4) if base.world_accuracy() else None,
                 "seconds": round(time.monotonic() - t0, 1)}
        if m.token_strict:
            entry["strict"] = share(m.token_strict).to_dict()
        if first is None:
            first = m
        else:
            entry["fidelity_minus_first"] = paired_difference(m.token_hits, first.token_hits).to_dict()
            if m.token_strict:
                entry["strict_minus_first"] = paired_difference(m.token_strict, first.token_strict).to_dict()
        readings[f"{scale:g}"] = entry
        print(f"CFG {scale:g}: fidelity {entry['fidelity']['value']:.3f}"
              + (f", strict {entry['strict']['value']:.3f}" if "strict" in entry else "")
              + f", retention {entry['retention']}", flush=True)
    return {"what": "one trained toy LoRA measured at several CFGs (bench/cfg_readings.py)", "row": row.get("bench_row"),
            "concept": row["concept"], "training_seed": st["seed"], "eval_seed": eval_seed,
            "trained_at_cfg7": {k: row[k] for k in ("fidelity", "retention") if k in row},
            "sampler": "euler, 20 steps", "samples": 96, "cfgs": [f"{c:g}" for c in cfgs], "readings": readings}


def summary(paths: list[Path]) -> dict:
    from lib_sdtrain.toy.stats import mean_t

    files = [json.loads(Path(p).read_text()) for p in paths]
    concepts = {f["concept"] for f in files}
    if len(concepts) != 1:
        raise UserError(f"the files measure different concepts: {sorted(concepts)}")
    seeds = [f["training_seed"] for f in files]
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise UserError("give one file per training seed, at least two seeds")
    cfgs = files[0]["cfgs"]
    if any(f["cfgs"] != cfgs for f in files):
        raise UserError("the files were measured at different CFGs")

    def value(f: dict, c: str, k: str):
        d = f["readings"][c].get(k)
        return d["value"] if isinstance(d, dict) else d

    out: dict = {"concept": concepts.pop(), "training_seeds": seeds, "cfgs": cfgs, "per_cfg": {}, "minus_first": {}}
    for c in cfgs:
        out["per_cfg"][c] = {}
        for k in FIGURES:
            vals = [value(f, c, k) for f in files]
            if None not in vals:
                out["per_cfg"][c][k] = {"per_seed": vals, **mean_t(vals).to_dict()}
    for c in cfgs[1:]:
        out["minus_first"][c] = {}
        for k in FIGURES:
            diffs = [value(f, c, k) - value(f, cfgs[0], k) for f in files
                     if value(f, c, k) is not None and value(f, cfgs[0], k) is not None]
            if len(diffs) == len(files):
                out["minus_first"][c][k] = {"per_seed": [round(d, 4) for d in diffs], **mean_t(diffs).to_dict()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--row", default="lora", choices=sorted(ROWS))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--work", required=True)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    m = sub.add_parser("measure")
    m.add_argument("--work", required=True)
    m.add_argument("--cfgs", default="7,3", help="comma-separated; differences are against the first")
    m.add_argument("--eval-seed", type=int, default=777)
    m.add_argument("--out", required=True)
    s = sub.add_parser("summary")
    s.add_argument("files", nargs="+")
    s.add_argument("--out", required=True)
    for q in (t, m):
        q.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    try:
        if args.command in ("train", "measure"):
            import torch

            torch.set_num_threads(max(1, args.threads))
        if args.command == "train":
            from bench.quality import parse_sets

            overrides, extra = parse_sets(args.set)
            row = train(args.row, args.seed, Path(args.work), overrides, extra)
            print(f"trained: fidelity {row['fidelity']['value']:.3f} at CFG 7; file {row['trained_file']}")
            return 0
        if args.command == "measure":
            cfgs = [float(c) for c in args.cfgs.split(",") if c.strip()]
            result = measure(Path(args.work), cfgs, args.eval_seed)
        else:
            result = summary([Path(f) for f in args.files])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
