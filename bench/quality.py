"""Benchmark: what each training method learns on the toy concepts, with 95 % intervals, over its saves.

    .venv/bin/python bench/quality.py [--rows lora,lora-style,reference,embedding,hypernetwork,dreambooth,
        dreambooth-noclass,finetune] [--model PATH] [--steps N] [--samples 96] [--seeds-per-prompt 2]
        [--world-samples 96] [--curve 3] [--cfg 7] [--eval-seed 777] [--set KEY=VALUE ...] [--threads N]
        [--out bench/results/quality.json] [--grids bench/results/quality]

Each row trains one method on one toy concept with `lib_sdtrain.toy.quality.run_quality` (the project's loop,
or for `reference` an independent plain diffusers + peft LoRA loop on the same task, data, steps and seeds),
measures the base model and every save on fixed prompts x seeds, and scores the pictures with the shipped
detector. Figures per save (see `toy/quality.py`): fidelity, fidelity as a share of the VAE round-trip
ceiling, binding, bleeding, effect, retention, each with its 95 % interval and sample count. The base
model's measurement is made once per concept and shared by the rows.

Prints a table of the final saves and the issue's targets (met / not met / undecided, judged on the
95 % intervals), writes
the JSON (every curve point) and one labelled grid per row (prompts, seeds, figures on the picture).
`--set` overrides a training setting for every row (e.g. `--set learning_rate=1e-3 --set lora.network_dim=4`);
`--label` names such a variant in the JSON (the tuning runs in bench/README.md use it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib_sdtrain.errors import UserError

# name -> QualitySettings fields
ROWS: dict[str, dict] = {
    "lora": {"method": "lora", "concept": "subject"},
    "lora-style": {"method": "lora", "concept": "style"},
    "reference": {"method": "lora", "concept": "subject", "loop": "reference"},
    "embedding": {"method": "embedding", "concept": "subject"},
    "embedding-style": {"method": "embedding", "concept": "style"},
    "hypernetwork": {"method": "hypernetwork", "concept": "subject"},
    "dreambooth": {"method": "dreambooth", "concept": "subject", "class_pictures": "world"},
    "dreambooth-noclass": {"method": "dreambooth", "concept": "subject", "class_pictures": "none"},
    "finetune": {"method": "finetune", "concept": "subject"},
    "dreambooth-style": {"method": "dreambooth", "concept": "style", "class_pictures": "world"},
}


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_sets(items: list[str]) -> tuple[dict, dict]:
    """`--set KEY=VALUE` items → (training overrides, quality settings): the dataset and class-picture keys are
    `QualitySettings` fields, everything else a training setting (`QualitySettings.overrides`)."""
    overrides, extra = {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set needs KEY=VALUE, not {item!r}")
        key, value = key.strip(), value.strip()
        if key == "class_pictures":
            extra[key] = value
        else:
            quality = ("images", "repeats", "captions", "class_images", "class_captions", "class_paired", "size",
                       "background_weight")
            (extra if key in quality else overrides)[key] = _value(value)
    return overrides, extra


def fmt(d: dict | None, signed: bool = False) -> str:
    if not d:
        return "n/a"
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"{f.format(d['value'])} [{f.format(d['lo'])}, {f.format(d['hi'])}]"


def judge(d: dict | None, target: float, at_least: bool) -> bool | None:
    """True: the whole 95 % interval is on the target's side; False: the whole interval misses it; None: the
    interval straddles the target (undecided: the value alone would be a claim inside the noise)."""
    if not d:
        return False
    lo, hi = d["lo"], d["hi"]
    if at_least:
        return True if lo >= target else (False if hi < target else None)
    return True if hi <= target else (False if lo > target else None)


def verdict(met: bool | None) -> str:
    return {True: "MET      ", False: "NOT MET  ", None: "UNDECIDED"}[met]


def targets(rows: dict[str, dict]) -> list[dict]:
    """The issue's targets, each judged on the intervals: met (the whole interval is on the right side), not
    met (the whole interval misses), or undecided (None: the interval straddles the target)."""
    out = []

    def add(what: str, ok: bool | None, detail: str) -> None:
        out.append({"target": what, "met": ok, "detail": detail})

    r = rows.get("lora")
    if r:
        foc = r.get("fidelity_of_ceiling")
        add("LoRA subject: fidelity >= 0.85 of the ceiling", judge(foc, 0.85, True),
            f"fidelity/ceiling {fmt(foc)}, fidelity {fmt(r['fidelity'])}, ceiling {fmt(r['ceiling'])}")
        add("LoRA subject: binding >= 0.6", judge(r["binding"], 0.6, True), f"binding {fmt(r['binding'], True)}")
        add("LoRA subject: bleeding <= 0.05", judge(r["bleeding"], 0.05, False),
            f"bleeding {fmt(r['bleeding'], True)}")
        ret = r.get("retention")
        add("LoRA subject: retention >= 0.95", judge(ret, 0.95, True), f"retention {fmt(ret)}")
        add("LoRA subject: <= 5 min of 2-core CPU (training)", r["seconds"]["train"] <= 300,
            f"{r['seconds']['train']:.0f} s training, {r['settings']['max_steps']} steps")
    r = rows.get("lora-style")
    if r:
        add("LoRA style: with the token >= 0.8", judge(r["fidelity"], 0.8, True), f"with token {fmt(r['fidelity'])}")
        add("LoRA style: without <= 0.1", judge(r["class_share"], 0.1, False), f"without {fmt(r['class_share'])}")
    for name in ("embedding", "hypernetwork", "dreambooth", "finetune"):
        r = rows.get(name)
        if r:
            e = r["effect"]
            add(f"{name}: learning effect interval excludes zero", e["lo"] > 0 or e["hi"] < 0,
                f"effect {fmt(e, True)} (fidelity {fmt(r['fidelity_before'])} -> {fmt(r['fidelity'])})")
    a, b = rows.get("dreambooth"), rows.get("dreambooth-noclass")
    if a and b:
        add("Dreambooth: class pictures lower bleeding than without, intervals separated",
            a["bleeding"]["hi"] < b["bleeding"]["lo"],
            f"with {fmt(a['bleeding'], True)}, without {fmt(b['bleeding'], True)}")
    a, b = rows.get("lora"), rows.get("reference")
    if a and b:
        for k in ("fidelity", "binding"):
            x, y = a[k], b[k]
            ok = x["value"] >= y["value"] or (y["lo"] <= x["value"] <= y["hi"]) or (x["lo"] <= y["value"] <= x["hi"])
            add(f"ours vs reference loop: {k} within each other's intervals or better", ok,
                f"ours {fmt(x, k == 'binding')}, reference {fmt(y, k == 'binding')}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows among {', '.join(ROWS)}; "
                   "ROW:N measures N saves of that row (default: --curve)")
    p.add_argument("--methods", default="", help="(older name) comma-separated methods, subject concept")
    p.add_argument("--model", default="", help="base model (default: the bundled toy model)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: each method's toy default)")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate (default: each method's toy default)")
    p.add_argument("--seed", type=int, default=0, help="dataset and training seed")
    p.add_argument("--samples", type=int, default=96, help="token (= class) samples per figure (default: 96)")
    p.add_argument("--seeds-per-prompt", type=int, default=1,
                   help="seeds per prompt (default: 1: 96 different prompts; on the toy model two seeds of one "
                        "prompt draw nearly the same picture, so they are not independent samples)")
    p.add_argument("--world-samples", type=int, default=96, help="plain-world samples (default: 96)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale of every measurement "
                   "(default: 7, A1111's)")
    p.add_argument("--eval-seed", type=int, default=777, help="seed of the measuring prompts and sampling seeds "
                   "(default: 777; another value draws other prompts, e.g. to confirm a choice on fresh ones)")
    p.add_argument("--curve", type=int, default=3, help="saves measured per row (default: 3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="training setting for every row (TrainSettings field or section.field; class_pictures, "
                        "images, repeats, captions (full/short/token), class_images, class_captions "
                        "(generic/full/mixed), size (picture side, a multiple of 64) are quality settings)")
    p.add_argument("--label", default="", help="name of this variant in the JSON")
    p.add_argument("--keep-samples", default="", help="folder: keep every sampled picture, so --rescore can "
                   "score them again (with another detector) without sampling")
    p.add_argument("--rescore", default="", help="a result JSON written with --keep-samples: score its pictures "
                   "again with --detector (default: the shipped one) and write --out")
    p.add_argument("--detector", default="", help="detector weights for --rescore")
    p.add_argument("--merge", nargs="+", default=[], metavar="RESULT.json",
                   help="combine the rows of these result files into --out and judge the targets on them")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    p.add_argument("--grids", default=str(ROOT / "bench" / "results" / "quality"))
    args = p.parse_args(argv)

    import torch

    from lib_sdtrain.events import Events
    from lib_sdtrain.methods import METHODS
    from lib_sdtrain.toy.quality import QualitySettings, run_quality_full

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.merge:
        parts = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge]
        rows = {k: v for d in parts for k, v in d["rows"].items()}
        data = {**parts[0], "rows": rows, "merged_from": args.merge,   # a row measured in another file drops its note
                "notes": [n for d in parts for n in d.get("notes", []) if n.split(":")[0] not in rows]}
        data["targets"] = targets(data["rows"])
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        for c in data["targets"]:
            print(f"  {verdict(c['met'])} {c['target']}: {c['detail']}")
        print(f"wrote {args.out}")
        return 0
    if args.rescore:
        from lib_sdtrain.toy.detector import Detector
        from lib_sdtrain.toy.quality import rescore

        data = json.loads(Path(args.rescore).read_text(encoding="utf-8"))
        det = Detector.load(args.detector or None)
        grids = Path(args.grids)
        grids.mkdir(parents=True, exist_ok=True)
        data["rows"] = {k: rescore(r, det, grid=grids / f"{k}.png") for k, r in data["rows"].items()}
        for r in data["rows"].values():
            r["grid"] = os.path.relpath(r["grid"], ROOT) if Path(r["grid"]).is_relative_to(ROOT) else r["grid"]
        data["targets"] = targets(data["rows"])
        data["rescored_with"] = args.detector or "shipped detector"
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        for c in data["targets"]:
            print(f"  {verdict(c['met'])} {c['target']}: {c['detail']}")
        print(f"wrote {args.out}")
        return 0
    names = [m.strip() for m in (args.methods or args.rows).split(",") if m.strip()]
    grids = Path(args.grids)
    grids.mkdir(parents=True, exist_ok=True)
    try:
        overrides, extra = parse_sets(args.set)
    except UserError as e:
        p.error(str(e))
    rows, notes, bases = {}, [], {}

    def show(event) -> None:
        if event.kind in ("status", "warning"):
            print(f"  {time.strftime('%H:%M:%S')} {event.data.get('text', '')}", flush=True)

    for entry in names:
        name, _, curve = entry.partition(":")
        spec = ROWS.get(name) or ({"method": name, "concept": "subject"} if name in METHODS else None)
        if spec is None or spec["method"] not in METHODS:
            notes.append(f"{name}: skipped (not a row of this bench, nor a method in lib_sdtrain.methods.METHODS)")
            print(notes[-1])
            continue
        print(f"{name}: {spec['method']} on the toy {spec['concept']}", flush=True)
        settings = QualitySettings(**{**spec, **extra}, model=args.model, steps=args.steps, learning_rate=args.lr,
                                   seed=args.seed, concept_samples=args.samples,
                                   seeds_per_prompt=args.seeds_per_prompt, world_samples=args.world_samples,
                                   sample_steps=args.sample_steps, cfg_scale=args.cfg, eval_seed=args.eval_seed,
                                   curve=int(curve or args.curve), device=args.device,
                                   keep_samples=str(Path(args.keep_samples) / name) if args.keep_samples else "",
                                   overrides=dict(overrides))
        with tempfile.TemporaryDirectory(prefix=f"quality-{name}-") as tmp:
            try:
                row, base = run_quality_full(settings, Path(tmp) / "work", grid=grids / f"{name}.png",
                                             events=Events(show), base=bases.get(spec["concept"]))
            except (UserError, ImportError, NotImplementedError) as e:
                notes.append(f"{name}: skipped ({e})")
                print(notes[-1])
                continue
        bases[spec["concept"]] = base
        row.pop("trained_file", None)
        row["grid"] = os.path.relpath(row["grid"], ROOT) if "grid" in row else None
        row["model"] = os.path.relpath(row["model"], ROOT) if Path(row["model"]).is_relative_to(ROOT) else row["model"]
        rows[name] = row
        print(f"  {name}: fidelity {fmt(row['fidelity'])}  binding {fmt(row['binding'], True)}  "
              f"bleeding {fmt(row['bleeding'], True)}  retention {fmt(row.get('retention'))}", flush=True)

    print()
    head = f"{'row':<20}{'steps':>6}{'fidelity':>20}{'of ceiling':>20}{'binding':>22}{'bleeding':>22}{'retention':>20}{'train s':>8}"
    print(head)
    for name, r in rows.items():
        print(f"{name:<20}{r['steps']:>6}{fmt(r['fidelity']):>20}{fmt(r.get('fidelity_of_ceiling')):>20}"
              f"{fmt(r['binding'], True):>22}{fmt(r['bleeding'], True):>22}{fmt(r.get('retention')):>20}"
              f"{r['seconds']['train']:>8.0f}")
    print("value [95 % interval]; n =", args.samples, "per concept figure,", args.world_samples, "for retention")
    checks = targets(rows)
    for c in checks:
        print(f"  {verdict(c['met'])} {c['target']}: {c['detail']}")
    for n in notes:
        print(n)
    result = {
        "benchmark": "quality v2",
        "label": args.label,
        "overrides": {**overrides, **extra},
        "rows": rows,
        "targets": checks,
        "notes": notes,
        "intervals": "95 %: Wilson (shares), Newcombe paired score method 10 (binding, bleeding, effect), "
                     "percentile bootstrap 2,000 resamples (retention paired; fidelity/ceiling unpaired)",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
