"""The toy model through the model code AUTOMATIC1111 v1.10 runs: Stability-AI's `ldm` package.

    python bench/ldm_render.py --ldm DIR [--model FILE] [--n 48] [--out bench/results/ldm_render.json]

A1111 builds an SD1 model from the checkpoint's `.yaml` with `ldm.util.instantiate_from_config` (a
`ldm.models.diffusion.ddpm.LatentDiffusion`), loads the state dict non-strictly and samples it. This script does
the same with a checkout of github.com/Stability-AI/stablediffusion given as `--ldm` (A1111 v1.10 pins commit
cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf), after installing the model as a user would (`toy install` into a
scratch WebUI folder: the `.safetensors`, its `.yaml` and the `.tokenizer` folder). It reports:

- the checkpoint keys the LatentDiffusion does not take (unexpected) and the ones it misses: both must be empty
  under A1111's transformers 4.30.2 (newer transformers no longer keep CLIP's `position_ids` as a persistent
  buffer, so with them that one key shows as unexpected; A1111's non-strict load ignores it);
- ldm's DDIM (20 steps, eta 0, CFG 7, empty-prompt unconditional) against the project's own sampler on the same
  held-out prompts and the same starting noise: colour and shape accuracy by the toy detector (95 % Wilson
  intervals), the largest difference of the text conditioning, the pixel difference;
- a labelled grid (first row ldm, second row ours).

Needs omegaconf, pytorch_lightning (1.9.x), einops and kornia beside the project's packages; without them (or
without `--ldm`) it says what is missing and exits 0. ldm imports torchvision and open_clip at module level but
never uses them for sampling an SD1 model; when they cannot be imported, empty stand-ins are put in place only
while ldm is imported. The text encoder's folder holds a config and no weights (they are in the checkpoint): as
A1111 does while building the model, `CLIPTextModel.from_pretrained(folder)` is made to build from the config
alone.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _missing_packages() -> list[str]:
    return [m for m in ("omegaconf", "pytorch_lightning", "einops", "kornia") if importlib.util.find_spec(m) is None]


def _import_ldm(ldm_dir: Path):
    """ldm's modules, with stand-ins for torchvision / open_clip only if those cannot be imported."""
    sys.path.insert(0, str(ldm_dir))
    # before any stand-in: these probe torchvision themselves (find_spec) and must see the real state
    import pytorch_lightning  # noqa: F401
    import transformers  # noqa: F401

    stand_ins = []
    for name in ("torchvision", "open_clip"):
        try:
            __import__(name)
        except Exception:   # noqa: BLE001 - a CUDA-only torchvision fails with OSError/RuntimeError too
            for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[k]
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
            if name == "torchvision":
                utils = types.ModuleType("torchvision.utils")
                utils.make_grid = lambda *a, **k: (_ for _ in ()).throw(NotImplementedError("stand-in"))
                mod.utils = utils
                sys.modules["torchvision.utils"] = utils
                stand_ins.append("torchvision.utils")
            sys.modules[name] = mod
            stand_ins.append(name)
    import ldm.models.diffusion.ddpm  # noqa: F401
    import ldm.modules.encoders.modules as encoders
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.util import instantiate_from_config

    for k in stand_ins:
        del sys.modules[k]
    return encoders, DDIMSampler, instantiate_from_config, [s for s in stand_ins if "." not in s]


def _git_commit(folder: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ldm", default=os.environ.get("LDM_DIR", ""),
                   help="a checkout of Stability-AI/stablediffusion (the folder holding ldm/); env LDM_DIR")
    p.add_argument("--ldm-commit", default="", help="the checkout's commit, when it is not a git work tree")
    p.add_argument("--model", default="", help="a Training Lab toy checkpoint (default: the bundled one)")
    p.add_argument("--n", type=int, default=48, help="held-out prompts (default 48)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ldm_render.json"))
    p.add_argument("--grid", default=str(ROOT / "bench" / "results" / "ldm_render.png"))
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    ldm_dir = Path(args.ldm).expanduser() if args.ldm else None
    if ldm_dir is None or not (ldm_dir / "ldm" / "models" / "diffusion" / "ddpm.py").is_file():
        print("ldm_render: give --ldm, a checkout of github.com/Stability-AI/stablediffusion (no ldm/ found); "
              "nothing measured")
        return 0
    missing = _missing_packages()
    if missing:
        print(f"ldm_render: missing packages {', '.join(missing)} (pip install omegaconf 'pytorch_lightning==1.9.*' "
              "einops kornia into a scratch folder and put it on PYTHONPATH); nothing measured")
        return 0

    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    t_start = time.monotonic()
    from lib_sdtrain.hosts.standalone import StandaloneHost, default_model
    from lib_sdtrain.sampling import initial_noise
    from lib_sdtrain.toy import world
    from lib_sdtrain.toy.detector import default_detector
    from lib_sdtrain.toy.evaluate import sample_batch, wilson_interval
    from lib_sdtrain.toy.install import install_toy_model

    model_file = Path(args.model) if args.model else default_model()
    encoders, DDIMSampler, instantiate_from_config, stand_ins = _import_ldm(ldm_dir)
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig

    with tempfile.TemporaryDirectory() as tmp:
        webui = Path(tmp) / "webui"
        (webui / "models" / "Stable-diffusion").mkdir(parents=True)
        installed = Path(install_toy_model(webui, model=model_file))
        yaml = installed.with_suffix(".yaml")
        config = OmegaConf.load(yaml)
        original = encoders.CLIPTextModel.from_pretrained
        encoders.CLIPTextModel.from_pretrained = lambda folder, *a, **k: encoders.CLIPTextModel(
            CLIPTextConfig.from_pretrained(folder))
        try:
            model = instantiate_from_config(config.model)
        finally:
            encoders.CLIPTextModel.from_pretrained = original
        state = load_file(str(installed))
        missing_keys, unexpected_keys = model.load_state_dict(state, strict=False)
        model.eval()
        model.cond_stage_model.device = "cpu"     # FrozenCLIPEmbedder puts token ids on "cuda" by default
        t_load = time.monotonic() - t_start

        scenes = world.sample_scenes(args.n, 2024, holdout="only")
        prompts = [s.caption() for s in scenes]
        seeds = [2024 * 1000 + i for i in range(args.n)]
        shape = (model.channels, model.image_size, model.image_size)
        t0 = time.monotonic()
        with torch.no_grad():
            cond = model.get_learned_conditioning(prompts)
            uncond = model.get_learned_conditioning([""] * args.n)
            x_t = torch.cat([initial_noise(s, (1, *shape)) for s in seeds])
            z, _ = DDIMSampler(model, device=torch.device("cpu")).sample(
                S=20, batch_size=args.n, shape=shape, conditioning=cond, eta=0.0, verbose=False,
                unconditional_guidance_scale=7.0, unconditional_conditioning=uncond, x_T=x_t)
            pixels = model.decode_first_stage(z).clamp(-1, 1)
        from PIL import Image

        arr = ((pixels.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        ldm_images = [Image.fromarray(a) for a in arr]
        t_ldm = time.monotonic() - t0

        parts = StandaloneHost(device="cpu", dtype="fp32").load(str(installed))
        t0 = time.monotonic()
        our_images = sample_batch(parts, prompts, seeds, steps=20, cfg_scale=7.0, size=64, sampler="ddim",
                                  batch_size=args.n)
        t_ours = time.monotonic() - t0
        with torch.no_grad():
            ours_cond = parts.encode_text(prompts[:8]).context.float()
        cond_diff = (cond[:8].float() - ours_cond).abs().max().item()

    a = np.stack([np.asarray(i, dtype=np.float32) for i in ldm_images])
    b = np.stack([np.asarray(i, dtype=np.float32) for i in our_images])
    det = default_detector()
    scores = {}
    for name, images in (("ldm", ldm_images), ("ours", our_images)):
        found = det.detect(images)
        scores[name] = {}
        for attr in ("colour", "shape"):
            hits = sum(getattr(f, attr) == getattr(s, attr) for f, s in zip(found, scenes))
            lo, hi = wilson_interval(hits, args.n)
            scores[name][attr] = {"value": round(hits / args.n, 4), "lo": round(lo, 4), "hi": round(hi, 4),
                                  "n": args.n, "method": "wilson"}
    result = {
        "benchmark": "ldm_render",
        "model": model_file.name,
        "ldm": {"folder": str(ldm_dir), "commit": args.ldm_commit or _git_commit(ldm_dir),
                "class": f"{type(model).__module__}.{type(model).__name__}",
                "cond_stage": type(model.cond_stage_model).__name__,
                "cond_stage_layer": getattr(model.cond_stage_model, "layer", "")},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "stand_ins": stand_ins,
        "keys": {"checkpoint": len(state), "missing": sorted(missing_keys), "unexpected": sorted(unexpected_keys)},
        "sampling": {"prompts": args.n, "held_out": True, "steps": 20, "cfg": 7.0, "sampler": "ddim, eta 0",
                     "same_initial_noise": True},
        "accuracy": scores,
        "text_condition_max_abs_diff": cond_diff,
        "pixel_abs_diff": {"mean": round(float(np.abs(a - b).mean()), 3), "max": float(np.abs(a - b).max())},
        "seconds": {"build_and_load": round(t_load, 1), "ldm_sampling": round(t_ldm, 1),
                    "ours_sampling": round(t_ours, 1)},
    }
    if args.grid:
        from lib_sdtrain.toy.quality import labelled_grid

        k = min(8, args.n)
        grid = labelled_grid([("ldm (A1111's model code), DDIM 20", ldm_images[:k]),
                              ("Training Lab sampler, DDIM 20", our_images[:k])], prompts[:k],
                             f"{model_file.name} built from its .yaml by ldm: same prompts, same starting noise")
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.grid)
        result["grid"] = args.grid
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("keys", "accuracy", "text_condition_max_abs_diff", "pixel_abs_diff")},
                     indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
