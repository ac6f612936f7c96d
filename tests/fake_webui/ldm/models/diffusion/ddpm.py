"""ldm.models.diffusion.ddpm: LatentDiffusion and DiffusionWrapper (inference parts)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...modules.encoders.modules import disabled_train


class DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model, conditioning_key="crossattn"):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        if self.conditioning_key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if self.conditioning_key == "hybrid":
            xc = torch.cat([x] + c_concat, dim=1)
            return self.diffusion_model(xc, t, context=torch.cat(c_crossattn, 1))
        raise NotImplementedError(self.conditioning_key)


class LatentDiffusion(nn.Module):
    def __init__(self, unet, first_stage, cond_stage, *, scale_factor=0.18215, parameterization="eps",
                 schedule_buffers=None, conditioning_key="crossattn", cond_stage_key="txt"):
        super().__init__()
        self.model = DiffusionWrapper(unet, conditioning_key)
        self.parameterization = parameterization
        self.scale_factor = scale_factor
        self.cond_stage_key = cond_stage_key
        self.num_timesteps = 1000
        for name, value in (schedule_buffers or {}).items():
            self.register_buffer(name, value.clone())
        self.logvar = torch.zeros(self.num_timesteps)
        # instantiate_first_stage / instantiate_cond_stage: frozen, train() disabled
        self.first_stage_model = first_stage.eval()
        self.first_stage_model.train = disabled_train
        for p in self.first_stage_model.parameters():
            p.requires_grad = False
        self.cond_stage_model = cond_stage.eval()
        self.cond_stage_model.train = disabled_train
        for p in self.cond_stage_model.parameters():
            p.requires_grad = False

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior):
        return self.scale_factor * encoder_posterior.sample()

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(1.0 / self.scale_factor * z)

    def get_learned_conditioning(self, c):
        return self.cond_stage_model(c)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        """`cond`: a dict of conditioning lists, or one tensor (list) for the model's own conditioning key."""
        if isinstance(cond, dict):
            return self.model(x_noisy, t, **cond)
        key = {"concat": "c_concat"}.get(self.model.conditioning_key, "c_crossattn")
        return self.model(x_noisy, t, **{key: cond if isinstance(cond, list) else [cond]})
