"""Benchmark: how well each training method learns a toy concept: fidelity, bleeding, retention.

    .venv/bin/python bench/quality.py [--methods lora,embedding,hypernetwork,dreambooth] [--concept subject]
        [--steps N] [--out bench/results/quality.json] [--grids bench/results/quality]

For each method: train on the toy concept (default: the subject "zwx shape", 12 pictures) with the project's
training loop on the bundled toy model (`lib_sdtrain.toy.quality.run_quality`), then sample fixed prompts and
seeds before and after and score them with the shipped detector:

- fidelity: share of samples prompted WITH the token that show the concept (after training);
- bleeding: share of class-prompt samples WITHOUT the token that show the concept, minus the base model's share;
- retention: plain-world accuracy (mean of colour and shape accuracy) after training ÷ before.

Methods not registered in `lib_sdtrain.methods.METHODS` (or whose file cannot be put back on a model) are
skipped with a note. Prints a table, writes JSON and one small PNG grid per method (rows: base and trained
model on the token prompts, then on the class prompts; same seeds in each column).
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="lora,embedding,hypernetwork,dreambooth",
                   help="comma-separated methods (default: lora,embedding,hypernetwork,dreambooth)")
    p.add_argument("--concept", choices=("subject", "style"), default="subject")
    p.add_argument("--model", default="", help="base model (default: the bundled toy model)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: each method's toy default)")
    p.add_argument("--seed", type=int, default=0, help="dataset and training seed")
    p.add_argument("--samples", type=int, default=24, help="token and class prompts each (default: 24)")
    p.add_argument("--world-samples", type=int, default=48, help="plain-world prompts (default: 48)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    p.add_argument("--grids", default=str(ROOT / "bench" / "results" / "quality"))
    args = p.parse_args(argv)

    import torch

    from lib_sdtrain.errors import UserError
    from lib_sdtrain.events import Events
    from lib_sdtrain.methods import METHODS
    from lib_sdtrain.toy.quality import QualitySettings, run_quality

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    grids = Path(args.grids)
    grids.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []

    def show(event) -> None:
        if event.kind in ("status", "warning"):
            print(f"  {time.strftime('%H:%M:%S')} {event.data.get('text', '')}", flush=True)

    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method not in METHODS:
            notes.append(f"{method}: skipped (not registered in lib_sdtrain.methods.METHODS)")
            print(notes[-1])
            continue
        print(f"{method}: training on the toy {args.concept}", flush=True)
        settings = QualitySettings(method=method, concept=args.concept, model=args.model, steps=args.steps,
                                   seed=args.seed, concept_samples=args.samples, world_samples=args.world_samples)
        with tempfile.TemporaryDirectory(prefix=f"quality-{method}-") as tmp:
            try:
                row = run_quality(settings, Path(tmp) / "work", grid=grids / f"{method}-{args.concept}.png",
                                  events=Events(show))
            except (UserError, ImportError, NotImplementedError) as e:
                notes.append(f"{method}: skipped ({e})")
                print(notes[-1])
                continue
        row.pop("trained_file", None)
        row["grid"] = os.path.relpath(row["grid"], ROOT) if "grid" in row else None
        row["model"] = os.path.relpath(row["model"], ROOT) if Path(row["model"]).is_relative_to(ROOT) else row["model"]
        rows.append(row)

    print()
    print(f"{'method':<14}{'fidelity':>9}{'(base)':>8}{'bleeding':>10}{'retention':>11}{'steps':>7}{'train s':>9}")
    for r in rows:
        print(f"{r['method']:<14}{r['fidelity']:>9.2f}{r['fidelity_before']:>8.2f}{r['bleeding']:>+10.2f}"
              f"{r['retention']:>11.3f}{r['steps']:>7}{r['seconds']['train']:>9.1f}")
    for n in notes:
        print(n)
    result = {
        "benchmark": "quality",
        "concept": args.concept,
        "rows": rows,
        "notes": notes,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu",
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
