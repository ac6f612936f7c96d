"""ldm.models.autoencoder: AutoencoderKL and the diagonal Gaussian posterior."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..modules.diffusionmodules.model import Decoder, Encoder


class DiagonalGaussianDistribution:
    def __init__(self, parameters):
        self.parameters = parameters
        mean, logvar = parameters.chunk(2, dim=1)
        self.mean, self.logvar = mean, logvar.clamp(min=-30.0, max=20.0)
        self.std = (self.logvar / 2).exp()

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device="cpu")
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self):
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig, embed_dim):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))
