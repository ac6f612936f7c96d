"""What a checkpoint is: family from its keys, architecture hints from a `.yaml` beside it or our metadata.

A1111 decides the family from the state dict (`sd_models_config.guess_model_config_from_state_dict`) unless a
`<checkpoint>.yaml` sits beside the file; we do the same, and read the yaml for the facts shapes cannot tell
(attention heads, v-prediction, latent scale). Files we write carry the same facts as JSON in the
`lab.architecture` metadata key, so they describe themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError

ARCH_KEY = "lab.architecture"

SDXL_TE2 = "conditioner.embedders.1.model.token_embedding.weight"
SDXL_TE1 = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SD2_TE = "cond_stage_model.model.token_embedding.weight"
SD1_TE = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def detect_family(keys: set[str] | dict) -> str:
    """'sd1' | 'sd2' | 'sdxl' from checkpoint keys, or UserError naming what the file looks like instead."""
    keys = set(keys)
    if UNET_IN not in keys:
        if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
            raise UserError("this is a LoRA file, not a model checkpoint")
        if "emb_params" in keys or {"clip_l", "clip_g"} <= keys or "string_to_param" in keys:
            raise UserError("this is a textual-inversion embedding, not a model checkpoint")
        if any(k.startswith(("unet.", "down_blocks.", "conv_in.")) for k in keys):
            raise UserError("this looks like a diffusers-layout file; give a single-file LDM checkpoint "
                            "(convert the diffusers folder first)")
        raise UserError("not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)")
    if SDXL_TE2 in keys and SDXL_TE1 in keys:
        return "sdxl"
    if SDXL_TE2.replace("embedders.1", "embedders.0") in keys:
        raise UserError("SDXL refiner checkpoints are not supported (only the base model layout)")
    if SD2_TE in keys:
        return "sd2"
    if SD1_TE in keys:
        return "sd1"
    if any(k.startswith("conditioner.") for k in keys):
        raise UserError("unsupported SGM model layout (neither SDXL base nor refiner)")
    raise UserError("checkpoint has a UNet but no text encoder this tool recognises")


def read_yaml_hints(path: Path) -> dict[str, Any]:
    """Architecture facts from an A1111-style `<checkpoint>.yaml` next to the file (empty if none)."""
    yaml_path = next((p for p in (path.with_suffix(".yaml"), path.with_suffix(".yml")) if p.is_file()), None)
    if yaml_path is None:
        return {}
    try:
        import yaml

        doc = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - any parse problem is the user's file
        raise UserError(f"cannot read {yaml_path.name}: {e}") from None
    params = ((doc or {}).get("model") or {}).get("params") or {}
    hints: dict[str, Any] = {"source": str(yaml_path)}
    if params.get("parameterization") == "v":
        hints["prediction"] = "v"
    scaling = str(((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config", {}).get("target", ""))
    if "VScaling" in scaling:
        hints["prediction"] = "v"
    if "scale_factor" in params:
        hints["scale_factor"] = float(params["scale_factor"])
    unet = ((params.get("unet_config") or params.get("network_config") or {}).get("params")) or {}
    for key in ("num_heads", "num_head_channels", "upcast_attention"):
        if key in unet:
            hints[key] = unet[key]
    cond = (params.get("cond_stage_config") or {}).get("params") or {}
    version = cond.get("version")
    if isinstance(version, str):
        folder = Path(version) if Path(version).is_absolute() else yaml_path.parent / version
        config_json = folder / "config.json"
        if config_json.is_file():
            te = json.loads(config_json.read_text(encoding="utf-8"))
            hints["text"] = [{k: te[k] for k in ("num_attention_heads", "hidden_act") if k in te}]
    return hints


def unet_hints(hints: dict[str, Any]) -> dict[str, Any]:
    """The hints the UNet's config is read with: the top-level ones (a yaml's) under our metadata's `unet` table."""
    return {**{k: v for k, v in hints.items() if k != "unet"}, **(hints.get("unet") or {})}


def read_metadata_hints(metadata: dict[str, str]) -> dict[str, Any]:
    """Architecture facts from safetensors metadata (ours, or kohya/modelspec keys)."""
    hints: dict[str, Any] = {}
    from ..formats.safetensors_io import json_table

    hints.update(json_table(metadata.get(ARCH_KEY)) or {})
    pred = metadata.get("modelspec.prediction_type", "")
    if pred in ("v", "v_prediction"):
        hints.setdefault("prediction", "v")
    elif pred in ("epsilon", "eps"):
        hints.setdefault("prediction", "eps")
    return hints
