"""Dreambooth on the toy subject with and without prior preservation: bleeding, fidelity, retention.

    .venv/bin/python bench/dreambooth_prior.py [--steps 300] [--device cuda] [--out bench/results/dreambooth_prior.json]

Every variant is one `toy.quality.run_quality` run with the same dataset, training seed, prompts and sampling
seeds; only the class pictures differ:
  - none:        no class pictures (plain Dreambooth fine-tune of the UNet and text encoder);
  - world_class: class pictures of the toy world with generic captions ("a large red shape ..."), weighted by
                 prior_loss_weight 1 (kohya-style regularization folder);
  - model_drawn: class pictures drawn by the base model itself from the class prompt (the original Dreambooth
                 prior preservation: `dreambooth.class_prompt`, `num_class_images`).
Bleeding = share of class-prompt samples (no token) in which the detector sees the subject after training,
minus the base model's share on the same prompts and seeds. Lower is better; prior preservation should lower it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {   # quality settings ("class_pictures") and training overrides of each variant
    "none": ({"class_pictures": "none"}, {}),
    "world_class": ({"class_pictures": "world"}, {}),   # the toy class set as reg_data
    "model_drawn": ({"class_pictures": "none"}, {"dreambooth.class_prompt": "a shape",
                                                 "dreambooth.num_class_images": 48}),
}


def main(argv: list[str] | None = None) -> int:
    from lib_sdtrain.errors import UserError
    from lib_sdtrain.events import Events
    from lib_sdtrain.toy.quality import QualitySettings, run_quality

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=0, help="training steps (0 = the toy default)")
    ap.add_argument("--lr", type=float, default=0.0, help="learning rate (0 = the toy default)")
    ap.add_argument("--device", default="", help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--model", default="", help="base model (default: the bundled toy model)")
    ap.add_argument("--world-samples", type=int, default=96, help="plain-world prompts measured (retention)")
    ap.add_argument("--sample-steps", type=int, default=20, help="sampling steps of the measurements")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--samples", type=int, default=96, help="class/token prompts measured per model")
    ap.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dreambooth_prior.json"))
    args = ap.parse_args(argv)

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}")
    rows = {}
    say = Events(lambda e: print("   ", e.data["text"], flush=True) if e.kind in ("status", "warning") else None)
    with tempfile.TemporaryDirectory(prefix="db-prior-") as tmp:
        for name in names:
            quality, train = VARIANTS[name]
            overrides = {**train, "dreambooth.train_text_encoder": args.train_text_encoder}
            settings = QualitySettings(method="dreambooth", concept="subject", steps=args.steps, curve=1, **quality,
                                       learning_rate=args.lr, device=args.device, concept_samples=args.samples,
                                       model=args.model, world_samples=args.world_samples,
                                       sample_steps=args.sample_steps, overrides=overrides)
            print(f"== {name}", flush=True)
            try:
                rows[name] = run_quality(settings, Path(tmp) / name, events=say)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    print()
    def iv(d):
        return "n/a" if not d else f"{d['value']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"

    print(f"{'variant':<12} {'bleeding':>22} {'class share before→after':>26} {'fidelity':>22} {'retention':>22} "
          f"{'train s':>8}")
    for name, r in rows.items():
        print(f"{name:<12} {iv(r['bleeding']):>22} {r['class_share_before']['value']:>12.3f} → "
              f"{r['class_share']['value']:<11.3f} {iv(r['fidelity']):>22} {iv(r.get('retention')):>22} "
              f"{r['seconds']['train']:>8.1f}")
    import torch

    report = {
        "what": "Dreambooth (toy subject) with and without prior preservation, same data, seeds and prompts",
        "variants": {k: {key: v for key, v in r.items() if key not in ("trained_file", "grid")}
                     for k, r in rows.items()},
        "bleeding": {k: r["bleeding"] for k, r in rows.items()},
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "torch": torch.__version__,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
