"""sgm.modules.encoders.modules: GeneralConditioner and the SDXL embedders."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder as _LdmOpenCLIP
from ldm.modules.encoders.modules import disabled_train


class AbstractEmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.is_trainable = False
        self.ucg_rate = 0.0
        self.input_key = None


class GeneralConditioner(nn.Module):
    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, embedders):
        super().__init__()
        for frozen in [e for e in embedders if not e.is_trainable]:      # sgm freezes the rest for good
            frozen.train = disabled_train
            frozen.requires_grad_(False)
            frozen.eval()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch, force_zero_embeddings=None):
        output = {}
        force_zero_embeddings = force_zero_embeddings or []
        for embedder in self.embedders:
            ctx = nullcontext if embedder.is_trainable else torch.no_grad
            with ctx():
                emb_out = embedder(batch[embedder.input_key])
            if isinstance(emb_out, torch.Tensor):
                emb_out = [emb_out]
            for emb in emb_out:
                key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                output[key] = torch.cat((output[key], emb), self.KEY2CATDIM[key]) if key in output else emb
        return output


class FrozenCLIPEmbedder(AbstractEmbModel):
    """SDXL encoder 1 (CLIP-L), layer "hidden" at `layer_idx`."""

    def __init__(self, transformer, tokenizer, max_length=77, freeze=True, layer="hidden", layer_idx=11,
                 always_return_pooled=False):
        super().__init__()
        self.tokenizer, self.transformer, self.max_length = tokenizer, transformer, max_length
        self.layer, self.layer_idx, self.return_pooled = layer, layer_idx, always_return_pooled
        if freeze:
            self.transformer = self.transformer.eval()
            for p in self.parameters():
                p.requires_grad = False

    def forward(self, tokens):
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        return outputs.hidden_states[self.layer_idx]


class FrozenOpenCLIPEmbedder2(AbstractEmbModel):
    """SDXL encoder 2 (OpenCLIP bigG): penultimate block output (no ln_final) + projected pooled output."""

    def __init__(self, model, tokenizer=None, max_length=77, freeze=True, layer="penultimate",
                 always_return_pooled=True, legacy=False):
        super().__init__()
        self.model, self.max_length = model, max_length
        if tokenizer is not None:          # SGM's has none (it calls open_clip.tokenize); kept for old callers
            self.tokenizer = tokenizer
        self.layer, self.return_pooled, self.legacy = layer, always_return_pooled, legacy
        self.layer_idx = 0 if layer == "last" else 1
        if freeze:
            self.model = self.model.eval()
            for p in self.parameters():
                p.requires_grad = False

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text)
        x = x + self.model.positional_embedding
        x = x.permute(1, 0, 2)
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        o = self.model.ln_final(x["last"])
        x["pooled"] = self.pool(o, text)
        return x

    def pool(self, x, text):
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection

    def text_transformer_forward(self, x, attn_mask=None):
        outputs = {}
        blocks = self.model.transformer.resblocks
        for i, r in enumerate(blocks):
            if i == len(blocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = r(x, attn_mask=attn_mask)
        outputs["last"] = x.permute(1, 0, 2)
        return outputs

    def forward(self, tokens):
        z = self.encode_with_transformer(tokens)
        if self.return_pooled:
            return z[self.layer], z["pooled"]
        return z[self.layer]


class ConcatTimestepEmbedderND(AbstractEmbModel):
    """Embeds each dimension independently (sinusoidal, `outdim` each) and concatenates them."""

    def __init__(self, outdim):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        values = x if x.ndim > 1 else x.unsqueeze(1)
        return timestep_embedding(values.flatten(), self.outdim).view(values.shape[0], -1)


FrozenOpenCLIPEmbedder = _LdmOpenCLIP
