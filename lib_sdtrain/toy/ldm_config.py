"""The LDM `.yaml` A1111 needs beside the toy checkpoint: the toy widths in CompVis' config layout.

A1111 builds a model from the yaml beside a checkpoint when there is one (`sd_models_config.find_checkpoint_config`
looks for `<checkpoint>.yaml` first), so the toy model's file names its own network sizes: `unet_config`,
`first_stage_config` and `cond_stage_config` params follow v1-inference.yaml with the toy values. The
text encoder is `FrozenCLIPEmbedder(version=FOLDER)`; the folder holds a CLIP text config and tokenizer
(see `toy.install`). Our own loader reads the same yaml for hints (`models.detect.read_yaml_hints`).
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..models.checkpoint import Architecture


def ldm_config(arch: Architecture, text_version: str) -> dict[str, Any]:
    """The LDM config tree (model.target + params) for an SD1-topology `arch`."""
    if arch.family != "sd1":
        raise UserError(f"the toy config writer handles sd1 models only, not {arch.family}")
    unet, vae, text = arch.unet, arch.vae, arch.text[0]
    widths = list(unet["block_out_channels"])
    base = widths[0]
    if any(w % base for w in widths):
        raise UserError(f"UNet widths {widths} are not multiples of the first width")
    heads = unet["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    attn_levels = [i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")]
    # LDM takes either one head count (num_heads) or one head width (num_head_channels) for every level
    head_counts = {heads[i] for i in attn_levels} | {heads[-1]}                # the middle block uses the last
    head_channels = {widths[i] // heads[i] for i in attn_levels} | {widths[-1] // heads[-1]}
    if len(head_counts) == 1:
        num_heads, num_head_channels = head_counts.pop(), -1
    elif len(head_channels) == 1:
        num_heads, num_head_channels = -1, head_channels.pop()
    else:
        raise UserError(f"attention heads {heads} for widths {widths}: LDM needs one head count or one head width")
    if text["hidden_size"] != unet["cross_attention_dim"]:
        raise UserError("the text encoder's width must equal the UNet's cross-attention width")
    vwidths = list(vae["block_out_channels"])
    image_size = int(unet.get("sample_size", 8))
    unet_params = {
        "use_checkpoint": False,
        "image_size": image_size,
        "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"],
        "model_channels": base,
        "attention_resolutions": [2 ** i for i in attn_levels],
        "num_res_blocks": unet["layers_per_block"],
        "channel_mult": [w // base for w in widths],
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": unet["cross_attention_dim"],
        "legacy": False,
    }
    vae_params = {
        "embed_dim": vae["latent_channels"],
        "monitor": "val/rec_loss",
        "ddconfig": {
            "double_z": True,
            "z_channels": vae["latent_channels"],
            "resolution": image_size * 8,
            "in_channels": vae["in_channels"],
            "out_ch": vae["out_channels"],
            "ch": vwidths[0],
            "ch_mult": [w // vwidths[0] for w in vwidths],
            "num_res_blocks": vae["layers_per_block"],
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }
    return {
        "model": {
            "base_learning_rate": 1.0e-04,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085,
                "linear_end": 0.0120,
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": 1000,
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": image_size,
                "channels": unet["in_channels"],
                "cond_stage_trainable": False,
                "conditioning_key": "crossattn",
                "monitor": "val/loss_simple_ema",
                "scale_factor": float(arch.latent_scale),
                "use_ema": False,
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                "params": unet_params},
                "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae_params},
                "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                      "params": {"version": str(text_version)}},
            },
        }
    }


def ldm_yaml(arch: Architecture, text_version: str) -> str:
    """`ldm_config` as yaml text, with a comment line saying what it is."""
    import yaml

    head = "# LDM config of the Training Lab toy model (SD1 topology, toy widths); A1111 builds the model from it\n"
    return head + yaml.safe_dump(ldm_config(arch, text_version), sort_keys=False, default_flow_style=None)
