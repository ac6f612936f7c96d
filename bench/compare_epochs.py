"""Benchmark: on the toy world, the subject concept score of a LoRA's saved epochs, through `compare`.

    .venv/bin/python bench/compare_epochs.py [--model lib_sdtrain/toy/data/toy-sd1.safetensors] [--epochs 6]
        [--seeds 4] [--out bench/results/compare_epochs.json] [--work DIR]

Steps: write the toy subject dataset (hearts captioned "zwx shape", toy/datasets.py) and class pictures; train
a LoRA on the toy model saving every epoch (train/loop.py); then run the epoch comparison
(evaluate/compare.py) on prompts with the trigger ("zwx, a large red shape ...") and without it ("a large red
shape ..."), every saved epoch plus the base model, scored per picture by the toy detector. Prints the table
(mean subject probability per epoch, and the share of pictures read as the subject), writes JSON and the
grid PNG next to it. Expected: the score on trigger prompts rises with the epochs while the score on
prompts without the trigger stays near the base model's.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TRIGGER_PROMPTS = [
    "zwx, a large red shape in the centre of a gray background",
    "zwx, a large blue shape in the centre of a white background",
    "zwx, a large green shape in the centre of a black background",
]
CONTROL_PROMPTS = [
    "a large red shape in the centre of a gray background",
    "a large blue circle in the centre of a white background",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "lib_sdtrain" / "toy" / "data" / "toy-sd1.safetensors"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--images", type=int, default=12, help="subject pictures")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--device", default=None)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compare_epochs.json"))
    args = ap.parse_args(argv)

    import torch

    from lib_sdtrain.evaluate.advice import advise, dataset_inputs
    from lib_sdtrain.evaluate.compare import CompareSettings, render_comparison, save_comparison
    from lib_sdtrain.evaluate.runs import discover_run
    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.toy.datasets import make_subject_dataset
    from lib_sdtrain.train.loop import train
    from lib_sdtrain.train.settings import TrainSettings

    model = Path(args.model)
    if not model.is_file():
        print(f"toy model not found: {model}", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="compare-epochs-"))
    data = work / "data"
    if not data.exists():
        make_subject_dataset(data, n_images=args.images, repeats=args.repeats, seed=0, size=64)
    host = StandaloneHost(device=args.device, dtype="fp32", output_root=work / "outputs")
    cfg = TrainSettings.from_dict({
        "model": str(model), "data": str(data / "img"), "name": "zwx-bench", "overwrite": True, "resolution": 64,
        "min_bucket": 64, "max_bucket": 64, "batch_size": 4, "epochs": args.epochs, "learning_rate": args.lr,
        "save_every_n_epochs": 1, "save_state": False, "tensorboard": False, "sample_every_n_epochs": 0,
        "seed": 0, "lora": {"network_dim": args.rank, "network_alpha": args.rank}})
    t0 = time.time()
    result = train(cfg, host)
    train_s = time.time() - t0
    run = discover_run(result.run_dir, host)
    settings = CompareSettings(prompts=TRIGGER_PROMPTS, control_prompts=CONTROL_PROMPTS,
                               seeds=list(range(1, args.seeds + 1)), steps=args.steps, cfg_scale=6.0, size=64,
                               score="subject")
    t1 = time.time()
    comp = render_comparison(run, settings, host)
    compare_s = time.time() - t1
    comp.advice = advise(comp, loss=run.loss, **dataset_inputs(run))
    grid_path = Path(args.out).with_name(Path(args.out).stem + "-grid.png")   # + its -grid.json
    save_comparison(comp, grid_path, overwrite=True)

    rows = []
    for i, line in enumerate(comp.summary()):
        trig = [comp.scores[i][c] for c, col in enumerate(comp.cols) if not col.control]
        ctrl = [comp.scores[i][c] for c, col in enumerate(comp.cols) if col.control]
        rows.append({**line, "share_trigger": sum(s >= 0.5 for s in trig) / len(trig),
                     "share_control": sum(s >= 0.5 for s in ctrl) / len(ctrl)})
    print(f"{'row':<32} {'epoch':>5} {'step':>5} {'score+trig':>10} {'share+trig':>10} {'score-trig':>10} "
          f"{'share-trig':>10}")
    for r in rows:
        print(f"{r['row']:<32} {str(r['epoch']):>5} {str(r['step']):>5} {r['score_trigger']:>10.3f} "
              f"{r['share_trigger']:>10.2f} {r['score_control']:>10.3f} {r['share_control']:>10.2f}")
    for a in comp.advice:
        print(f"[{a.kind}] {a.message}")
    trig_scores = [r["score_trigger"] for r in rows if r["epoch"]]
    out = {
        "model": model.name, "epochs": args.epochs, "images": args.images, "repeats": args.repeats, "lr": args.lr,
        "rank": args.rank, "seeds": args.seeds, "sampling_steps": args.steps, "train_steps": result.steps,
        "train_seconds": round(train_s, 1), "compare_seconds": round(compare_s, 1),
        "cells": len(comp.rows) * len(comp.cols), "rows": rows,
        "rising": all(b >= a - 0.05 for a, b in zip(trig_scores, trig_scores[1:])) and
                  trig_scores[-1] > rows[0]["score_trigger"] + 0.2,
        "advice": [a.to_dict() for a in comp.advice], "grid": str(grid_path),
        "torch": torch.__version__, "python": platform.python_version(),
        "device": str(host.device), "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
