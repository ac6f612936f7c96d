"""Stand-in for `modules.sd_hijack`, written for these tests from a1111-host.md §3.

What it reproduces of A1111 v1.10.1:
* `model_hijack.hijack(model)` swaps each text encoder for its "*WithCustomWords" wrapper (original kept at
  `.wrapped`) and its token embedding for an `EmbeddingsWithFixes` (original at `.wrapped`); `undo_hijack`
  takes both out again. SDXL's two encoders live in `conditioner.embedders`; their wrappers replace them there.
* `EmbeddingsWithFixes.forward(ids)`: the wrapper's forward leaves, in `model_hijack.fixes`, one list per
  prompt of (offset, Embedding) for the textual-inversion words it found; the token embedding takes that list
  (once), looks the ids up as usual and writes each word's vectors over the placeholder positions after
  `offset` (clipped at the end of the chunk), keeping autograd intact so training reaches the vectors.
* `apply_optimizations()` / `undo_optimizations()` switch `CrossAttention.forward` between an SDP forward
  (the default on torch 2) and the plain, hypernetwork-recording one that training uses.
"""

import torch
import torch.nn.functional as F

import ldm.modules.attention
from modules import devices, sd_hijack_clip, sd_hijack_open_clip, shared
from modules.hypernetworks import hypernetwork

attention_CrossAttention_forward = hypernetwork.attention_CrossAttention_forward    # the plain forward
current_optimizer = None


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    """The "sdp" optimisation: runs the loaded hypernetworks too, but records nothing on the layer."""
    ctx_k, ctx_v = hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, x if context is None else context)
    heads, batch = self.heads, x.shape[0]

    def split(t):
        return t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(ctx_k)), split(self.to_v(ctx_v)))
    return self.to_out(out.transpose(1, 2).reshape(batch, x.shape[1], -1))


def apply_optimizations(option=None):
    global current_optimizer
    undo_optimizations()
    if (option or shared.opts.cross_attention_optimization) == "None":
        current_optimizer = None
        return ""
    ldm.modules.attention.CrossAttention.forward = scaled_dot_product_attention_forward
    current_optimizer = "sdp"
    return current_optimizer


def undo_optimizations():
    ldm.modules.attention.CrossAttention.forward = hypernetwork.attention_CrossAttention_forward


class EmbeddingsWithFixes(torch.nn.Module):
    """Token embedding that overwrites textual-inversion placeholder positions with the words' vectors."""

    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped                    # the original nn.Embedding
        self.embeddings = embeddings              # the hijack object carrying `fixes`
        self.textual_inversion_key = textual_inversion_key

    def _vectors(self, embedding):
        vec = embedding.vec
        return devices.cond_cast_unet(vec[self.textual_inversion_key] if isinstance(vec, dict) else vec)

    def forward(self, input_ids):
        pending, self.embeddings.fixes = self.embeddings.fixes, None       # consumed by this call only
        looked_up = self.wrapped(input_ids)
        if not pending or not any(pending):
            return looked_up
        rows = []
        for row, row_fixes in zip(looked_up, pending):
            for offset, embedding in row_fixes:
                words = self._vectors(embedding)
                start = offset + 1                                          # after the start token
                count = min(words.shape[0], row.shape[0] - start)
                row = torch.cat([row[:start], words[:count], row[start + count:]]).to(looked_up.dtype)
            rows.append(row)
        return torch.stack(rows)


_WRAPPERS = {   # encoder class name → (token-embedding owner getter, wrapper class, textual-inversion key)
    "FrozenCLIPEmbedder": (lambda e: e.transformer.text_model.embeddings,
                           sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords, "clip_l"),
    "FrozenOpenCLIPEmbedder": (lambda e: e.model, sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords,
                               "clip_l"),
}
_SDXL_WRAPPERS = {
    "FrozenCLIPEmbedder": (lambda e: e.transformer.text_model.embeddings,
                           sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords, "clip_l"),
    "FrozenOpenCLIPEmbedder2": (lambda e: e.model, sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords,
                                "clip_g"),
}


class StableDiffusionModelHijack:
    fixes = None
    clip = None
    optimization_method = None

    def __init__(self):
        from modules.textual_inversion.textual_inversion import EmbeddingDatabase

        self.comments = []
        self.extra_generation_params = {}
        self.embedding_db = EmbeddingDatabase()
        self.embedding_db.add_embedding_dir(shared.cmd_opts.embeddings_dir)

    def apply_optimizations(self, option=None):
        self.optimization_method = apply_optimizations(option)

    def _wrap(self, encoder, table):
        spec = table.get(type(encoder).__name__)
        if spec is None:
            return None
        owner_of, wrapper_cls, key = spec
        owner = owner_of(encoder)
        owner.token_embedding = EmbeddingsWithFixes(owner.token_embedding, self, textual_inversion_key=key)
        return wrapper_cls(encoder, self)

    @staticmethod
    def _unwrap(wrapper):
        encoder = wrapper.wrapped
        owner = encoder.model if hasattr(encoder, "model") else encoder.transformer.text_model.embeddings
        if isinstance(owner.token_embedding, EmbeddingsWithFixes):
            owner.token_embedding = owner.token_embedding.wrapped
        return encoder

    def hijack(self, m):
        conditioner = getattr(m, "conditioner", None)
        if conditioner:
            wrapped = []
            for i, embedder in enumerate(conditioner.embedders):
                replacement = self._wrap(embedder, _SDXL_WRAPPERS)
                if replacement is not None:
                    conditioner.embedders[i] = replacement
                    wrapped.append(replacement)
            m.cond_stage_model = wrapped[0] if len(wrapped) == 1 else conditioner
        else:
            replacement = self._wrap(m.cond_stage_model, _WRAPPERS)
            if replacement is not None:
                m.cond_stage_model = replacement
        self.apply_optimizations()
        self.clip = m.cond_stage_model

    def undo_hijack(self, m):
        wrappers = (sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords,
                    sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords,
                    sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords)
        conditioner = getattr(m, "conditioner", None)
        if conditioner:
            for i, embedder in enumerate(conditioner.embedders):
                if isinstance(embedder, wrappers):
                    conditioner.embedders[i] = self._unwrap(embedder)
            if hasattr(m, "cond_stage_model"):
                delattr(m, "cond_stage_model")
        elif isinstance(m.cond_stage_model, wrappers):
            m.cond_stage_model = self._unwrap(m.cond_stage_model)
        undo_optimizations()
        self.clip = None

    def redo_hijack(self, m):
        self.undo_hijack(m)
        self.hijack(m)

    def clear_comments(self):
        self.comments, self.extra_generation_params = [], {}


model_hijack = StableDiffusionModelHijack()
