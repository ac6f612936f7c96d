"""A rough GPU-memory estimate for a training run, shown beside the settings before it starts.

    total ≈ frozen weights + trained weights × (4 master + 4 grad + optimizer state bytes)
            + max(UNet activations, VAE encode when latents are not cached) + text-encoder activations
            + 0.6 GB CUDA context, all × 1.1 for allocator fragmentation

Terms, per family (numbers are public model sizes and commonly reported training footprints, not
measurements of this code; expect ±30%):
- frozen weights: UNet + text encoder(s) + VAE parameters × bytes of the model dtype (A1111 and the
  standalone host keep the base model in fp16 on CUDA: 2 bytes; fp32 = 4).
  SD1: 860M + 123M + 84M; SD2: 866M + 340M + 84M; SDXL: 2567M + 817M (CLIP-L + bigG) + 84M.
- trained weights: each method's class estimates its own (`estimate_parameters`, found through the method
  registry). LoRA adds rank × (in + out) per adapted layer; summed over kohya's attn_mlp targets that is
  about 0.42M (SD1), 0.45M (SD2), 2.5M (SDXL) UNet parameters per rank unit and 0.166M / 0.44M / 0.90M in
  the text encoder(s); `attn` keeps ≈ 55% of it, `full` (LoCon) ≈ 160%, LoHa doubles it, LoKr ≈ 20%,
  DoRA as LoRA (+ one magnitude per input feature).
  Hypernetworks: ≈ 21M / 30M / 60M parameters; embeddings: a few vectors (negligible); DreamBooth and
  fine-tuning train the whole UNet (and the text encoder(s) when asked).
  Per trained parameter: fp32 weight 4 + gradient 4 + optimizer state: AdamW 8, AdamW8bit 2, Lion8bit 1,
  Adafactor ≈ 1 (factored moments), Prodigy 16, SGD 0 (no momentum).
- activations (saved for the backward pass) per picture at the family's native size, 16-bit compute with
  scaled-dot-product attention: SD1 2.5 GB at 512², SD2 3.5 GB at 768², SDXL 12 GB at 1024²; linear in batch
  and in pixels (memory-efficient attention is linear in tokens), ×2 in fp32, ×0.25 with gradient
  checkpointing. Text-encoder activations (LoRA on the text encoder, embeddings): 0.1 / 0.2 / 0.4 GB per picture.
- VAE encoding (only when latents are not cached; freed before the UNet runs, so it is a peak, not a sum):
  about 1.2 GB per picture at 512², linear in pixels.
A model file whose header can be read (`model_sizes`) replaces the family's public sizes with its own: the
parameters of each part counted from the tensor shapes, the UNet activations scaled from the family's figure by
its block layout against the stock one (`ldm_unet.activation_units`), and LoRA's per-rank size by its transformer
layers (`ldm_unet.attention_rank_units`). A distilled SDXL (SSD-1B: 1.3 B UNet parameters, about half the stock
transformer blocks) so gets its own figure, not stock SDXL's.
Pure arithmetic: imports no torch and touches no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1024 ** 3

# parameters in millions; activations in GB per picture at `native` px, 16-bit, no checkpointing
FAMILY: dict[str, dict[str, float]] = {
    "sd1": {"unet": 860, "text": 123, "vae": 84, "native": 512, "act": 2.5, "te_act": 0.1},
    "sd2": {"unet": 866, "text": 340, "vae": 84, "native": 768, "act": 3.5, "te_act": 0.2},
    "sdxl": {"unet": 2567, "text": 817, "vae": 84, "native": 1024, "act": 12.0, "te_act": 0.4},
}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "lion8bit": 1, "adafactor": 1, "prodigy": 16, "sgd": 0}
VAE_ENCODE_GB_AT_512 = 1.2
CHECKPOINTING_FACTOR = 0.25
CUDA_CONTEXT_GB = 0.6
FRAGMENTATION = 1.1
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass
class VramEstimate:
    family: str
    total_gb: float
    parts: dict[str, float] = field(default_factory=dict)   # GB per term, before fragmentation
    trained_params: float = 0.0                             # number of trained parameters
    notes: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        terms = ", ".join(f"{k} {v:.1f}" for k, v in self.parts.items() if v >= 0.05)
        line = f"≈ {self.total_gb:.1f} GB GPU memory ({self.family}; {terms} GB; rough, ±30%)"
        return "\n".join([line, *self.notes])


def trained_parameters(cfg: Any, family: str, sizes: dict[str, float] | None = None) -> float:
    """Number of parameters the method trains: its class's `estimate_parameters` (methods registry), on a model
    of the family's public sizes or of `sizes` (`model_sizes`)."""
    from ..methods import method_spec

    spec = method_spec(cfg.method)
    return spec.method_class().estimate_parameters(getattr(cfg, spec.name), family, sizes or FAMILY[family])


def model_sizes(path: str | Path, family: str | None = None) -> dict[str, float] | None:
    """The `FAMILY` entry of the model in `path`, from its header: the parameters (millions) of its UNet, text
    encoder(s) and VAE as the file holds them, UNet activations scaled by its layout against its family's stock
    one, `attn_scale` and `text_scale`: its transformer layers' LoRA size per rank and its text encoders' size
    against the stock model's. None when the header cannot be read, is not a checkpoint, or is of another family
    than `family`."""
    from ..errors import UserError
    from ..models import detect
    from ..models.native import read_model_header

    try:
        shapes, _ = read_model_header(Path(path))
        found = detect.detect_family(shapes)
    except (UserError, OSError, ValueError):
        return None
    return sizes_from_shapes(shapes, found) if family in (None, found) else None


def sizes_from_shapes(shapes: dict[str, tuple[int, ...]], family: str) -> dict[str, float] | None:
    """`model_sizes` of a checkpoint's {key: shape} table (a header); None when its UNet's layout cannot be read."""
    from ..errors import UserError
    from ..models import ldm_unet

    unet = {k[len(ldm_unet.PREFIX):]: v for k, v in shapes.items() if k.startswith(ldm_unet.PREFIX)}
    try:
        config = ldm_unet.unet_config_from_ldm(unet, family)
        layout = ldm_unet.unet_layout(config)
    except (UserError, KeyError, StopIteration, IndexError, ValueError):
        return None

    def millions(*prefixes: str) -> float:
        return sum(math.prod(shape) for key, shape in shapes.items() if key.startswith(prefixes)) / 1e6

    stock_layout, f = ldm_unet.STOCK_LAYOUTS[family], FAMILY[family]
    act = f["act"] * ldm_unet.activation_units(layout) / ldm_unet.activation_units(stock_layout)
    attn = ldm_unet.attention_rank_units(layout, config["cross_attention_dim"]) / ldm_unet.attention_rank_units(
        stock_layout, ldm_unet.STOCK_CONTEXT[family])
    text = millions("cond_stage_model.", "conditioner.")
    return {**f, "unet": millions(ldm_unet.PREFIX), "text": text, "vae": millions("first_stage_model."), "act": act,
            "te_act": f["te_act"] * text / f["text"], "attn_scale": attn, "text_scale": text / f["text"]}


def estimate_vram(cfg: Any, family: str = "sd1", model_dtype: str = "fp16",
                  sizes: dict[str, float] | None = None) -> VramEstimate:
    """Rough peak GPU memory of training `cfg` (a TrainSettings) on a model of `family`, of the family's public
    sizes or of `sizes` (`model_sizes` of the model file)."""
    if family not in FAMILY:
        raise ValueError(f"unknown family {family!r}")
    f = sizes or FAMILY[family]
    wbytes = DTYPE_BYTES.get(model_dtype, 2)
    trained = trained_parameters(cfg, family, f)
    from ..methods import create_method, method_spec

    full = method_spec(cfg.method).applied_as == "checkpoint"   # the model's own weights train
    frozen_params = (f["unet"] + f["text"] + f["vae"]) * 1e6 - (trained if full else 0.0)
    weights = frozen_params * wbytes / GB
    state_bytes = 4 + 4 + OPTIMIZER_STATE_BYTES.get(cfg.optimizer, 8)
    trainable = trained * state_bytes / GB

    resolution = cfg.resolution or f["native"]   # 0 = the model's native size
    pixels = (resolution / f["native"]) ** 2 * cfg.batch_size
    compute = 2.0 if (cfg.mixed_precision == "no" and wbytes == 4) else 1.0
    act = f["act"] * pixels * compute
    if cfg.gradient_checkpointing:
        act *= CHECKPOINTING_FACTOR
    te_trained = create_method(cfg).trains_text_encoder()   # embeddings: gradients pass through the encoder
    te_act = f["te_act"] * cfg.batch_size * compute if te_trained else 0.0
    vae = 0.0 if cfg.cache_latents else VAE_ENCODE_GB_AT_512 * (resolution / 512) ** 2 * cfg.batch_size
    parts = {"weights": weights, "trained+optimizer": trainable, "activations": max(act, vae),
             "text activations": te_act, "CUDA context": CUDA_CONTEXT_GB}
    total = sum(parts.values()) * FRAGMENTATION
    est = VramEstimate(family=family, total_gb=total, parts=parts, trained_params=trained)
    if not cfg.gradient_checkpointing and act > 2.0:
        saved = act * (1 - CHECKPOINTING_FACTOR) * FRAGMENTATION
        est.notes.append(f"gradient checkpointing would save about {saved:.1f} GB (≈30% slower)")
    if full and cfg.optimizer == "adamw":
        est.notes.append("an 8-bit optimizer (adamw8bit) keeps 6 bytes less per trained weight")
    if vae > act:
        est.notes.append("caching latents removes the VAE peak")
    return est


def family_of_file(path: str | Path) -> str | None:
    """'sd1' | 'sd2' | 'sdxl' from a .safetensors header (reads only the header), None if unknown."""
    from ..errors import UserError
    from ..models.detect import detect_family

    p = Path(path)
    if p.suffix.lower() != ".safetensors" or not p.is_file():
        return None
    from ..formats.safetensors_io import read_header

    try:
        return detect_family(set(read_header(p).tensors))
    except UserError:
        return None


def run_plan(cfg: Any, report: Any, world: int = 1) -> dict[str, Any]:
    """`plan.step_plan` for a scanned dataset, with the buckets the loop would build (same calls, no model).

    Args:
        cfg: TrainSettings.
        report: `data.scan.scan_dataset(cfg.data, reg_path=cfg.reg_data or None, caption_ext=cfg.caption_ext)`.
    Returns:
        step_plan's dict plus "buckets" (bucket → pictures) and "reg_images".
    """
    from .plan import plan_data
    from .validation import split_validation

    records = report.usable
    records, held = split_validation(records, cfg.validation_split, cfg.seed)   # as the loop trains them
    plan, _, out = plan_data(cfg, records, world)
    out["buckets"] = {f"{w}×{h}": n for (w, h), n in sorted(plan.counts().items())}
    out["reg_images"] = len([r for r in records if r.is_regularization])
    out["validation_images"] = len(held)
    return out
