"""Full-size SD1.5 and SDXL architectures (the stock configurations, diffusers / transformers names) and random-weight
modules built straight on the device, for the GPU benchmark (bench/gpu.py, whose RandomHost lends them).

Random weights train at the speed and memory of the real ones (the same shapes and kernels); the loss is
meaningless. Nothing is read from disk, so a 2.6 B-parameter SDXL UNet is ready in seconds instead of being
written to and read from a 7 GB file.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.checkpoint import Architecture, LoadedCheckpoint, build_modules

CLIP_L = {"vocab_size": 49408, "max_position_embeddings": 77, "hidden_size": 768, "intermediate_size": 3072,
          "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768,
          "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, "layer_norm_eps": 1e-5}
CLIP_BIGG = {**CLIP_L, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
             "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280, "pad_token_id": 0}
VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
       "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
       "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512,
       "scaling_factor": 0.18215}
UNET_COMMON = {"in_channels": 4, "out_channels": 4, "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
               "upcast_attention": False, "layers_per_block": 2}

# parameter counts of the stock models (what `count_parameters` must find; public figures)
PARAMETERS = {"sd1": {"unet": 859_520_964, "vae": 83_653_863, "text": [123_060_480]},
              "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text": [123_060_480, 694_659_840]}}


def sd15_architecture() -> Architecture:
    unet = {**UNET_COMMON, "sample_size": 64,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
            "use_linear_projection": False, "transformer_layers_per_block": 1}
    return Architecture(family="sd1", prediction="eps", unet=unet, vae=dict(VAE), text=[dict(CLIP_L)],
                        latent_scale=0.18215)


def sdxl_architecture() -> Architecture:
    unet = {**UNET_COMMON, "sample_size": 128,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
            "use_linear_projection": True, "transformer_layers_per_block": [1, 2, 10],
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816}
    vae = {**VAE, "sample_size": 1024, "scaling_factor": 0.13025}
    return Architecture(family="sdxl", prediction="eps", unet=unet, vae=vae, text=[dict(CLIP_L), dict(CLIP_BIGG)],
                        latent_scale=0.13025)


ARCHITECTURES = {"sd15": sd15_architecture, "sdxl": sdxl_architecture}


def architecture(name: str) -> Architecture:
    """'sd15' | 'sdxl' (full size) | 'tiny-sd1' | 'tiny-sdxl' (the test models' shapes)."""
    if name.startswith("tiny-"):
        from .tiny import tiny_architecture

        return tiny_architecture(name[5:])
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}, tiny-sd1, "
                         "tiny-sdxl")
    return ARCHITECTURES[name]()


def count_parameters(arch: Architecture) -> dict[str, Any]:
    """Parameter counts of the modules `arch` describes, built on the meta device (no memory used)."""
    unet, vae, encoders = build_modules(arch, empty=True)
    n = lambda m: sum(p.numel() for p in m.parameters())
    return {"unet": n(unet), "vae": n(vae), "text": [n(e) for e in encoders]}


def build_random(arch: Architecture, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> LoadedCheckpoint:
    """Modules of `arch` with their default random initialisation, allocated and initialised on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet, vae, encoders = build_modules(arch, empty=False)
    for m in (unet, vae, *encoders):
        m.requires_grad_(False).eval().to(dtype)
    return LoadedCheckpoint(arch, unet, vae, encoders)
