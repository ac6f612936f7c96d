"""How much a trigger word changes the text encoder's output, by where it stands in the caption.

    .venv/bin/python bench/caption_position.py [--model FILE] [--n 48] [--out bench/results/caption_position.json]

CLIP's text encoder is causal: a word reaches only the positions after it. A style trigger at the end of a caption
("... in zkz style") therefore changes only the end token and the padding, one in front ("zkz style, a ...") every
word of the caption. This prints, for `--n` plain toy-world captions, the change of the context (the text
encoder's output the UNet attends to) when the trigger words are added, per position and as a share of the
context's energy: at the end, in front (with and without the comma), and the subject token "zwx" in the middle
("a red zwx shape ..." against "a red shape ...", the older subject captions) and in front ("zwx, a red shape ...",
the toy world's subject captions since session 8). No training; seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def variants(n: int, seed: int = 5) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (captions with the trigger, the same captions without it)."""
    from lib_sdtrain.toy import world
    from lib_sdtrain.toy.quality import class_caption

    scenes = world.sample_scenes(n, seed, holdout="exclude")
    plain = [s.caption() for s in scenes]
    tok = world.STYLE_TOKEN
    hearts = [world.Scene(world.SUBJECT_SHAPE, s.colour, s.size, s.position, s.background) for s in scenes]
    subject = [h.caption() for h in hearts]           # the token in front: "zwx, a large red shape ..."
    generic = [class_caption(h) for h in hearts]      # the same caption with the class word, as the bench measures
    middle = [g.replace(f" {world.CLASS_WORD} ", f" {world.SUBJECT_TOKEN} {world.CLASS_WORD} ", 1) for g in generic]
    return {
        "style words at the end": ([f"{p} in {tok} style" for p in plain], plain),
        "style words in front": ([f"{tok} style, {p}" for p in plain], plain),
        "style words in front, no comma": ([f"{tok} style {p}" for p in plain], plain),
        "subject token in the middle": (middle, generic),
        "subject token in front": (subject, generic),
    }


def measure(parts, n: int) -> dict[str, dict[str, float]]:
    import torch

    def context(prompts: list[str]) -> torch.Tensor:
        return parts.encode_text(prompts).context.float()

    out = {}
    with torch.no_grad():
        for name, (with_words, without) in variants(n).items():
            a, b = context(with_words), context(without)
            per_position = (a - b).norm(dim=-1)          # [captions, positions]
            out[name] = {
                "energy_share": float((a - b).pow(2).sum() / b.pow(2).sum()),
                "per_position": float(per_position.mean()),
                "words": float(per_position[:, 1:20].mean()),       # where the caption's words stand
                "padding": float(per_position[:, 30:].mean()),      # after every caption's end token
                "context_norm": float(b.norm(dim=-1).mean()),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model file (default: the bundled toy model)")
    ap.add_argument("--n", type=int, default=48, help="captions")
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    import torch

    from lib_sdtrain.hosts.standalone import StandaloneHost, default_model

    torch.set_num_threads(1)
    parts = StandaloneHost(device="cpu", dtype="fp32").load(args.model or default_model())
    res = measure(parts, args.n)
    print(f"context change when the trigger words are added ({args.n} toy captions; context norm per position "
          f"{next(iter(res.values()))['context_norm']:.1f})")
    for name, r in res.items():
        print(f"  {name:32s} {100 * r['energy_share']:5.2f} % of the energy; per position {r['per_position']:.2f} "
              f"(words {r['words']:.2f}, padding {r['padding']:.2f})")
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "caption_position", "n": args.n,
                                              "model": args.model or "bundled toy model", "results": res},
                                             indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
