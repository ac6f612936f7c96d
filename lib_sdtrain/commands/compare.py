"""Compare a run's saved epochs on the same prompts and seeds: one labelled grid PNG (+ JSON with scores and advice).

  python -m lib_sdtrain compare outputs/runs/my-lora --prompts "a zwx shape" "a red zwx shape" \\
      --control-prompts "a red shape" --seeds 1 2 --weights 0.5 1

Rows: the base model, then each saved epoch/step file. Columns: prompt × weight × seed. On the toy model a
concept score (the toy detector) is printed under every picture and summarised per epoch.
"""

from __future__ import annotations

import argparse


def _split(values: list[str] | None) -> list[str] | None:
    """`--seeds 1 2 3` and `--seeds 1,2,3` both work (prompts are never split: they contain commas)."""
    if values is None:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluate.compare import CompareSettings
    from ..evaluate.score import SCORE_CHOICES
    from ..sample_settings import DEFAULT_CFG_SCALE, DEFAULT_STEPS

    help_of = {s.name: s.help for s in CompareSettings.settings()}
    parser.add_argument("run", help="the run folder (<outputs>/runs/NAME), or one of its saved files")
    parser.add_argument("--prompts", nargs="+", metavar="PROMPT", help=help_of["prompts"])
    parser.add_argument("--control-prompts", nargs="+", metavar="PROMPT", help=help_of["control_prompts"])
    parser.add_argument("--seeds", nargs="+", metavar="SEED", help=help_of["seeds"] + " (default: 1234)")
    parser.add_argument("--weights", nargs="+", metavar="W", help=help_of["weights"] + " (default: 1)")
    parser.add_argument("--epochs", nargs="+", metavar="N", help=help_of["epochs"])
    parser.add_argument("--negative", help=help_of["negative"])
    parser.add_argument("--steps", type=int, help=help_of["steps"] + f" (default: {DEFAULT_STEPS})")
    parser.add_argument("--cfg-scale", type=float, help=help_of["cfg_scale"] + f" (default: {DEFAULT_CFG_SCALE:g})")
    parser.add_argument("--sampler", help=help_of["sampler"])     # checked by CompareSettings: A1111's names too
    parser.add_argument("--size", type=int, help=help_of["size"])
    parser.add_argument("--base", dest="include_base", action=argparse.BooleanOptionalAction, default=None,
                        help=help_of["include_base"] + " (default: on)")
    parser.add_argument("--score", choices=list(SCORE_CHOICES), help=help_of["score"])
    parser.add_argument("--model", help=help_of["model"])
    parser.add_argument("--out", help="grid .png to write (default: <outputs>/compare/NAME-compare-<time>.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--no-advice", action="store_true", help="skip the dataset checks behind the advice")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--output-root", help="standalone output root (default: $TRAINING_LAB_OUTPUT or ./outputs)")


def settings_from_args(args: argparse.Namespace):
    from ..evaluate.compare import CompareSettings

    data = {}
    for name in ("prompts", "control_prompts"):
        if getattr(args, name) is not None:
            data[name] = list(getattr(args, name))
    for name in ("seeds", "weights", "epochs"):
        if getattr(args, name) is not None:
            data[name] = _split(getattr(args, name))
    for name in ("negative", "steps", "cfg_scale", "sampler", "size", "include_base", "score", "model"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    return CompareSettings.from_dict(data)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..evaluate.advice import advise, dataset_inputs
    from ..evaluate.compare import check_comparison_output, default_output, render_comparison, save_comparison
    from ..evaluate.runs import discover_run
    from ..events import Events
    from ..hosts.standalone import StandaloneHost

    settings = settings_from_args(args)
    host = StandaloneHost(device=args.device, dtype=args.dtype, output_root=args.output_root)
    run_info = discover_run(args.run, host)
    out = Path(args.out) if args.out else default_output(run_info, host)
    check_comparison_output(out, overwrite=args.overwrite)   # before the rendering, which may take minutes
    print(f"run {run_info.name} ({run_info.method}): {len(run_info.files)} saved file(s) in {run_info.files_dir}")

    def show(event) -> None:
        d = event.data
        if event.kind == "progress":
            print(f"\rrendering {d['step']}/{d['total']}", end="", flush=True)
        elif event.kind in ("status", "warning"):
            print(f"\n{d['text']}", flush=True)

    comp = render_comparison(run_info, settings, host, events=Events(show))
    print()
    if not args.no_advice:
        comp.advice = advise(comp, loss=run_info.loss, **dataset_inputs(run_info))
    grid_path, json_path = save_comparison(comp, out, overwrite=args.overwrite)
    if comp.scores is not None:
        print(f"\ntoy {comp.concept} score (mean per row; trigger prompts / prompts without the trigger):")
        for line in comp.summary():
            ctrl = f"{line['score_control']:.3f}" if line["score_control"] is not None else "-"
            trig = f"{line['score_trigger']:.3f}" if line["score_trigger"] is not None else "-"
            print(f"  {line['row']:<36} {trig:>7} {ctrl:>7}")
    for a in comp.advice:
        print(f"\n[{a.kind}] {a.message}")
    print(f"\nsaved {grid_path}\n      {json_path}")
    return 130 if comp.stopped else 0
