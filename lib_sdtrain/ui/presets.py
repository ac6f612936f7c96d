"""Starting points for the Train tab: each preset is a partial settings dict (the same keys as a TOML config).

Applying a preset sets only the keys it names; the dataset and output name the user typed stay. "@toy" stands
for the bundled toy model (`toy.bundled_model()`).
Values follow common community guides for kohya-style LoRA training (rank/alpha, 1e-4 learning rates,
min-SNR 5, cosine schedules); they are starting points, not tuned results.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "Quick test on the toy model": {
        "method": "lora", "model": "@toy", "resolution": 64, "min_bucket": 64, "max_bucket": 128,
        "batch_size": 8, "grad_accum": 1, "epochs": 4, "max_steps": 0, "learning_rate": 6e-3,
        "unet_lr": None, "text_encoder_lr": None, "lr_scheduler": "cosine", "lr_warmup_steps": 0,
        "min_snr_gamma": 5.0, "optimizer": "adamw", "mixed_precision": "no", "gradient_checkpointing": False,
        "save_every_n_epochs": 1, "sample_every_n_epochs": 1, "sample_steps": 10, "sample_size": 64,
        "sample_cfg": 3.0, "tensorboard": True,     # the toy model's LoRAs draw best at CFG 3 (toy.quality.TOY_CFG)
        # set A names the toy subject concept (`toy dataset subject`: "zwx shape", a heart); set B is the same
        # scenes without the trigger, so the Monitor's bleeding check has a reference from the first run
        "sample_prompts": ["zwx, a large red shape in the centre of a white background",
                           "zwx, a small blue shape on the left of a black background"],
        "control_prompts": ["a large red shape in the centre of a white background",
                            "a small blue shape on the left of a black background"],
        # batch, learning rate, schedule, min-SNR, rank and UNet-only as the toy bench measured them for the subject
        # (toy.quality.METHOD_CONCEPT_DEFAULTS[("lora", "subject")]; a text-encoder LoRA cost retention there).
        # The token binds on the toy model only with many pictures: `toy dataset subject --n 96 --repeats 2` plus
        # `toy dataset class` as regularization (bench/README.md)
        "lora": {"network_type": "lora", "network_dim": 8, "network_alpha": 8.0, "targets": "attn_mlp",
                 "train_text_encoder": False},
    },
    "SD1.5 LoRA character": {
        "method": "lora", "resolution": 512, "min_bucket": 256, "max_bucket": 1024, "batch_size": 2,
        "grad_accum": 1, "epochs": 10, "max_steps": 0, "learning_rate": 1e-4, "unet_lr": 1e-4,
        "text_encoder_lr": 5e-5, "lr_scheduler": "cosine", "lr_warmup_steps": 0, "optimizer": "adamw",
        "min_snr_gamma": 5.0, "noise_offset": 0.0, "mixed_precision": "fp16", "gradient_checkpointing": False,
        "shuffle_tags": True, "keep_tokens": 1, "caption_dropout": 0.0, "save_every_n_epochs": 1,
        "lora": {"network_type": "lora", "network_dim": 32, "network_alpha": 16.0, "targets": "attn_mlp",
                 "train_text_encoder": True},
    },
    "SD1.5 LoRA style": {
        "method": "lora", "resolution": 512, "min_bucket": 256, "max_bucket": 1024, "batch_size": 4,
        "grad_accum": 1, "epochs": 8, "max_steps": 0, "learning_rate": 1e-4, "unet_lr": 1e-4,
        "text_encoder_lr": None, "lr_scheduler": "cosine", "optimizer": "adamw", "min_snr_gamma": 5.0,
        "mixed_precision": "fp16", "shuffle_tags": True, "keep_tokens": 0, "caption_dropout": 0.05,
        "save_every_n_epochs": 1,
        "lora": {"network_type": "lora", "network_dim": 16, "network_alpha": 8.0, "targets": "attn_mlp",
                 "train_text_encoder": False},
    },
    "SDXL LoRA character": {
        "method": "lora", "resolution": 1024, "min_bucket": 512, "max_bucket": 2048, "batch_size": 1,
        "grad_accum": 2, "epochs": 10, "max_steps": 0, "learning_rate": 1e-4, "unet_lr": 1e-4,
        "text_encoder_lr": None, "lr_scheduler": "cosine", "optimizer": "adamw8bit", "min_snr_gamma": 5.0,
        "mixed_precision": "bf16", "gradient_checkpointing": True, "shuffle_tags": True, "keep_tokens": 1,
        "save_every_n_epochs": 1,
        "lora": {"network_type": "lora", "network_dim": 32, "network_alpha": 16.0, "targets": "attn_mlp",
                 "train_text_encoder": False},
    },
    "SDXL LoRA style": {
        "method": "lora", "resolution": 1024, "min_bucket": 512, "max_bucket": 2048, "batch_size": 2,
        "grad_accum": 1, "epochs": 8, "max_steps": 0, "learning_rate": 1e-4, "unet_lr": 1e-4,
        "text_encoder_lr": None, "lr_scheduler": "cosine", "optimizer": "adamw8bit", "min_snr_gamma": 5.0,
        "mixed_precision": "bf16", "gradient_checkpointing": True, "shuffle_tags": True,
        "caption_dropout": 0.05, "save_every_n_epochs": 1,
        "lora": {"network_type": "lora", "network_dim": 16, "network_alpha": 8.0, "targets": "attn_mlp",
                 "train_text_encoder": False},
    },
}


def preset_names() -> list[str]:
    return list(PRESETS)
