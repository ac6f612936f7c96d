"""Show what a model file is: family, prediction type, parameter counts, hashes and architecture."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="single-file checkpoint (.safetensors; .ckpt through the safe loader)")
    parser.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-hash", action="store_true", help="skip hashing the file (fast for big models)")


def describe(model: str, prediction: str | None = None, with_hash: bool = True) -> dict:
    from ..models.checkpoint import load_checkpoint
    from ..hosts import ModelInfo

    loaded = load_checkpoint(model, prediction=prediction, device="cpu")
    arch = loaded.arch

    def count(m) -> int:
        return sum(p.numel() for p in m.parameters())

    params = {"unet": count(loaded.unet), "vae": count(loaded.vae)}
    for i, enc in enumerate(loaded.text_encoders):
        params[f"text_encoder{'' if i == 0 else '_' + str(i + 1)}"] = count(enc)
    dtypes = sorted({str(d).replace("torch.", "") for d in loaded.dtypes.values() if d.is_floating_point})
    info = ModelInfo(name=str(loaded.path.stem), path=str(loaded.path))
    if with_hash:
        info.fill_hashes()
    return {
        "file": str(loaded.path),
        "family": arch.family,
        "prediction": arch.prediction,
        "latent_scale": arch.latent_scale,
        "parameters": params,
        "parameters_total": sum(params.values()),
        "dtypes": dtypes,
        "extra_tensors": len(loaded.extras),
        "unet_channels": arch.unet["block_out_channels"],
        "context_dim": arch.unet["cross_attention_dim"],
        "text_layers": [t["num_hidden_layers"] for t in arch.text],
        "sha256": info.sha256,
        "shorthash": info.shorthash,
        "legacy_hash": info.legacy_hash,
    }


def run(args: argparse.Namespace) -> int:
    d = describe(args.model, args.prediction, not args.no_hash)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    width = max(len(k) for k in d)
    for key, value in d.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in value.items())
        elif key == "parameters_total":
            value = f"{value / 1e6:.2f}M"
        print(f"{key:<{width}}  {value}")
    return 0
