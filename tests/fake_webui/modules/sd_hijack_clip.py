"""modules.sd_hijack_clip: the "*WithCustomWords" text wrappers (75-token chunks, emphasis, CLIP skip).

Chunking and emphasis reuse the project's A1111-exact helpers (`lib_sdtrain.models.prompt` / `conditioning`):
this is a fake, the point is the module structure, attribute names and call paths A1111 has.
"""

import torch

from modules import devices, shared


class TextConditionalModel(torch.nn.Module):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack
        self.is_trainable = getattr(wrapped, "is_trainable", False)
        self.input_key = getattr(wrapped, "input_key", "txt")
        self.return_pooled = getattr(self.wrapped, "return_pooled", False)
        self.legacy_ucg_val = None

    @property
    def tokenizer(self):
        return self.wrapped.tokenizer

    def encode_with_transformers(self, tokens):
        raise NotImplementedError

    def forward(self, texts):
        from lib_sdtrain.models.conditioning import apply_emphasis
        from lib_sdtrain.models.prompt import chunk_prompt, empty_chunk

        if not isinstance(texts, list):
            texts = [texts]
        batch_chunks = [chunk_prompt(t, self.tokenizer, emphasis=shared.opts.emphasis)[0] for t in texts]
        chunk_count = max(len(c) for c in batch_chunks)
        zs = []
        for i in range(chunk_count):
            batch = [c[i] if i < len(c) else empty_chunk(self.tokenizer) for c in batch_chunks]
            self.hijack.fixes = [c.fixes for c in batch]
            tokens = torch.asarray([c.ids for c in batch]).to(devices.device)
            z = self.encode_with_transformers(tokens)
            pooled = getattr(z, "pooled", None)
            z = apply_emphasis(z, torch.asarray([c.multipliers for c in batch]), shared.opts.emphasis)
            if pooled is not None:
                z.pooled = pooled
            zs.append(z)
        if self.return_pooled:
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)


class FrozenCLIPEmbedderWithCustomWords(TextConditionalModel):
    """SD1: hidden states of `wrapped.transformer` (HF CLIP), CLIP skip from opts."""

    def encode_with_transformers(self, tokens):
        skip = shared.opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=-skip)
        if skip > 1:
            z = outputs.hidden_states[-skip]
            return self.wrapped.transformer.text_model.final_layer_norm(z)
        return outputs.last_hidden_state


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden")
        if shared.opts.sdxl_clip_l_skip is True:
            return outputs.hidden_states[-shared.opts.CLIP_stop_at_last_layers]
        if self.wrapped.layer == "last":
            return outputs.last_hidden_state
        return outputs.hidden_states[self.wrapped.layer_idx]
