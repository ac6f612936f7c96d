"""ldm.modules.encoders.modules: FrozenCLIPEmbedder (SD1, HF CLIP) and FrozenOpenCLIPEmbedder (SD2, OpenCLIP).

The OpenCLIP text tower is rebuilt here with open_clip 2.20's module names (`transformer.resblocks.N.attn` is an
`nn.MultiheadAttention`, `mlp.c_fc`/`c_proj`, `ln_final`, `text_projection`, sequence-first), vision tower
deleted as the LDM wrapper does. FrozenCLIPEmbedder holds transformers' CLIPTokenizer (built by
`modules.sd_models.hf_clip_tokenizer` from the CLIP vocabulary); the OpenCLIP embedders hold no tokenizer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn


def disabled_train(self, mode=True):
    """Overwrite model.train with this function to make sure train/eval mode does not change anymore."""
    return self


class LayerNorm(nn.LayerNorm):
    """open_clip.transformer.LayerNorm: computes in the input's dtype after a float32 norm."""

    def forward(self, x):
        orig = x.dtype
        x = nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.to(orig)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head, mlp_ratio=4.0, act_layer=nn.GELU):
        super().__init__()
        self.ln_1 = LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ls_1 = nn.Identity()
        self.ln_2 = LayerNorm(d_model)
        width = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, width)), ("gelu", act_layer()),
                                              ("c_proj", nn.Linear(width, d_model))]))
        self.ls_2 = nn.Identity()

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.ls_1(self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio=4.0):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])


class CLIP(nn.Module):
    """open_clip.model.CLIP with only the text tower (LDM/SGM delete `visual`)."""

    def __init__(self, embed_dim, width, layers, heads, context_length=77, vocab_size=49408, mlp_ratio=4.0):
        super().__init__()
        self.context_length = context_length
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * 4.6052)
        mask = torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)


class AbstractEncoder(nn.Module):
    pass


class FrozenCLIPEmbedder(AbstractEncoder):
    """SD1: HF CLIPTextModel at `.transformer`, tokenizer at `.tokenizer`."""

    LAYERS = ["last", "pooled", "hidden"]

    def __init__(self, transformer, tokenizer, max_length=77, freeze=True, layer="last", layer_idx=None):
        super().__init__()
        self.tokenizer, self.transformer, self.max_length = tokenizer, transformer, max_length
        self.layer, self.layer_idx = layer, layer_idx
        if freeze:
            self.freeze()

    def freeze(self):
        """Frozen as ldm builds it: eval mode, no parameter requires grad."""
        self.transformer = self.transformer.eval()
        self.requires_grad_(False)

    def forward(self, tokens):
        hidden = self.layer == "hidden"
        result = self.transformer(input_ids=tokens, output_hidden_states=hidden)
        return result.hidden_states[self.layer_idx] if hidden else result.last_hidden_state


class FrozenOpenCLIPEmbedder(AbstractEncoder):
    """SD2: OpenCLIP ViT-H text tower at `.model`; layer "penultimate" stops before the last block, then ln_final."""

    LAYERS = ["last", "penultimate"]

    def __init__(self, model, tokenizer=None, max_length=77, freeze=True, layer="last"):
        super().__init__()
        self.model = model
        if tokenizer is not None:          # LDM's has none (it calls open_clip.tokenize); kept for old callers
            self.tokenizer = tokenizer
        self.max_length, self.layer = max_length, layer
        self.layer_idx = {"last": 0}.get(layer, 1)          # penultimate: skip the last resblock
        if freeze:
            self.freeze()

    def freeze(self):
        self.model = self.model.eval()
        self.requires_grad_(False)

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = x.transpose(0, 1)  # open_clip's resblocks take [tokens, batch, width]
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        return self.model.ln_final(x.transpose(0, 1))

    def text_transformer_forward(self, x, attn_mask=None):
        blocks = list(self.model.transformer.resblocks)
        for block in blocks[:len(blocks) - self.layer_idx]:
            x = block(x, attn_mask=attn_mask)
        return x

    def forward(self, tokens):
        return self.encode_with_transformer(tokens)
