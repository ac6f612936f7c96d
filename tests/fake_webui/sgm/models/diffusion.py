"""sgm.models.diffusion: DiffusionEngine with OpenAIWrapper, conditioner, VAE and denoiser (inference parts)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ldm.modules.encoders.modules import disabled_train


class OpenAIWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)


class EpsScaling:
    pass


class VScaling:
    pass


class Denoiser(nn.Module):
    def __init__(self, sigmas, scaling):
        super().__init__()
        self.register_buffer("sigmas", sigmas.clone())
        self.scaling = scaling


class AutoencoderKLInferenceWrapper(nn.Module):
    """sgm's first stage: `encode` returns a sampled (unscaled) latent, `decode` the picture."""

    def __init__(self, autoencoder_kl):
        super().__init__()
        self.encoder, self.decoder = autoencoder_kl.encoder, autoencoder_kl.decoder
        self.quant_conv, self.post_quant_conv = autoencoder_kl.quant_conv, autoencoder_kl.post_quant_conv

    def encode(self, x):
        from ldm.models.autoencoder import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x))).sample()

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


class DiffusionEngine(nn.Module):
    def __init__(self, unet, conditioner, first_stage, sigmas, *, scale_factor=0.13025, parameterization="eps"):
        super().__init__()
        self.model = OpenAIWrapper(unet)
        self.denoiser = Denoiser(sigmas, VScaling() if parameterization == "v" else EpsScaling())
        self.conditioner = conditioner
        self.scale_factor = scale_factor
        self.input_key = "jpg"
        self.first_stage_model = first_stage.eval()
        self.first_stage_model.train = disabled_train
        for p in self.first_stage_model.parameters():
            p.requires_grad = False

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x)
