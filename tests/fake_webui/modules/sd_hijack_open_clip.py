"""modules.sd_hijack_open_clip: OpenCLIP text wrappers (SD2; SDXL's second encoder with the pooled output)."""

from modules import sd_hijack_clip


class FrozenOpenCLIPEmbedderWithCustomWords(sd_hijack_clip.TextConditionalModel):
    def encode_with_transformers(self, tokens):
        return self.wrapped.encode_with_transformer(tokens)


class FrozenOpenCLIPEmbedder2WithCustomWords(sd_hijack_clip.TextConditionalModel):
    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]
        pooled = d.get("pooled")
        if pooled is not None:
            z.pooled = pooled
        return z
