"""modules.sd_hijack: text-encoder wrappers, token-embedding fixes (`EmbeddingsWithFixes`, A1111 v1.10.1),
attention optimisation on/off."""

import torch
import torch.nn.functional as F

import ldm.modules.attention
from modules import devices, sd_hijack_clip, sd_hijack_open_clip, shared
from modules.hypernetworks import hypernetwork

# A1111 keeps the class's original forward under this name; `undo_optimizations` installs the hypernetwork-aware
# plain forward. The fake's tests compare against what undo installs, so the name points there.
attention_CrossAttention_forward = hypernetwork.attention_CrossAttention_forward
current_optimizer = None


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    """The "sdp" optimisation (what A1111 picks by default on torch 2); like every A1111 optimisation it runs
    the loaded hypernetworks on the context first (without recording them on the layer)."""
    h = self.heads
    context = x if context is None else context
    context_k, context_v = hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)
    q, k, v = self.to_q(x), self.to_k(context_k), self.to_v(context_v)
    b = q.shape[0]
    q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(b, -1, h * out.shape[-1]))


def apply_optimizations(option=None):
    global current_optimizer
    undo_optimizations()
    selection = option or shared.opts.cross_attention_optimization
    if selection == "None":
        current_optimizer = None
        return ""
    ldm.modules.attention.CrossAttention.forward = scaled_dot_product_attention_forward
    current_optimizer = "sdp"
    return current_optimizer


def undo_optimizations():
    ldm.modules.attention.CrossAttention.forward = hypernetwork.attention_CrossAttention_forward


class EmbeddingsWithFixes(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids):
        batch_fixes = self.embeddings.fixes
        self.embeddings.fixes = None
        inputs_embeds = self.wrapped(input_ids)
        if batch_fixes is None or len(batch_fixes) == 0 or max([len(x) for x in batch_fixes]) == 0:
            return inputs_embeds
        vecs = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds):
            for offset, embedding in fixes:
                vec = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
                emb = devices.cond_cast_unet(vec)
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0:offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len:]]).to(
                    dtype=inputs_embeds.dtype)
            vecs.append(tensor)
        return torch.stack(vecs)


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method = None

    def __init__(self):
        from modules.textual_inversion.textual_inversion import EmbeddingDatabase

        self.extra_generation_params = {}
        self.comments = []
        self.embedding_db = EmbeddingDatabase()
        self.embedding_db.add_embedding_dir(shared.cmd_opts.embeddings_dir)

    def apply_optimizations(self, option=None):
        self.optimization_method = apply_optimizations(option)

    def hijack(self, m):
        conditioner = getattr(m, "conditioner", None)
        if conditioner:
            text_cond_models = []
            for i in range(len(conditioner.embedders)):
                embedder = conditioner.embedders[i]
                typename = type(embedder).__name__
                if typename == "FrozenCLIPEmbedder":
                    emb = embedder.transformer.text_model.embeddings
                    emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, self)
                    conditioner.embedders[i] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(embedder, self)
                    text_cond_models.append(conditioner.embedders[i])
                if typename == "FrozenOpenCLIPEmbedder2":
                    embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding, self,
                                                                         textual_inversion_key="clip_g")
                    conditioner.embedders[i] = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(embedder,
                                                                                                          self)
                    text_cond_models.append(conditioner.embedders[i])
            m.cond_stage_model = text_cond_models[0] if len(text_cond_models) == 1 else conditioner
        elif type(m.cond_stage_model).__name__ == "FrozenCLIPEmbedder":
            emb = m.cond_stage_model.transformer.text_model.embeddings
            emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, self)
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        elif type(m.cond_stage_model).__name__ == "FrozenOpenCLIPEmbedder":
            m.cond_stage_model.model.token_embedding = EmbeddingsWithFixes(m.cond_stage_model.model.token_embedding,
                                                                           self)
            m.cond_stage_model = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        self.apply_optimizations()
        self.clip = m.cond_stage_model

    def undo_hijack(self, m):
        conditioner = getattr(m, "conditioner", None)
        if conditioner:
            for i in range(len(conditioner.embedders)):
                embedder = conditioner.embedders[i]
                if isinstance(embedder, sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords):
                    embedder.wrapped.model.token_embedding = embedder.wrapped.model.token_embedding.wrapped
                    conditioner.embedders[i] = embedder.wrapped
                if isinstance(embedder, sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords):
                    emb = embedder.wrapped.transformer.text_model.embeddings
                    emb.token_embedding = emb.token_embedding.wrapped
                    conditioner.embedders[i] = embedder.wrapped
            if hasattr(m, "cond_stage_model"):
                delattr(m, "cond_stage_model")
        elif type(m.cond_stage_model) == sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords:
            m.cond_stage_model = m.cond_stage_model.wrapped
            emb = m.cond_stage_model.transformer.text_model.embeddings
            if type(emb.token_embedding) == EmbeddingsWithFixes:
                emb.token_embedding = emb.token_embedding.wrapped
        elif type(m.cond_stage_model) == sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords:
            m.cond_stage_model.wrapped.model.token_embedding = m.cond_stage_model.wrapped.model.token_embedding.wrapped
            m.cond_stage_model = m.cond_stage_model.wrapped
        undo_optimizations()
        self.clip = None

    def redo_hijack(self, m):
        self.undo_hijack(m)
        self.hijack(m)

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()
