"""modules.sd_hijack_clip: the "*WithCustomWords" text wrappers (75-token chunks, emphasis, CLIP skip, TI).

As A1111 v1.10.1: each wrapper has `tokenize(texts)` (ids without start/end), `id_start`/`id_end`/`id_pad`,
`comma_token`, `encode_embedding_init_text`; `tokenize_line` finds textual-inversion names through
`hijack.embedding_db.find_embedding_at_position`, reserves `embedding.vectors` placeholder ids and records a
`PromptChunkFix(offset, embedding)` (offset without the start token); `forward` puts each chunk batch's fixes
into `hijack.fixes`, which `sd_hijack.EmbeddingsWithFixes` consumes inside the transformer call.
The chunking itself (emphasis runs, BREAK, comma back-track) reuses the project's A1111-exact helper
(`lib_sdtrain.models.prompt.chunk_prompt`) fed with this wrapper's own `tokenize`; the rest is A1111's.
SD1/SDXL's `wrapped.tokenizer` is transformers' CLIPTokenizer, as in A1111.
"""

from collections import namedtuple

import torch

from modules import devices, shared

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


class _ChunkTokenizer:
    """What `chunk_prompt` needs, from the wrapper's own tokenize and ids."""

    def __init__(self, wrapper):
        self.wrapper = wrapper
        self.start_id, self.end_id, self.pad_id = wrapper.id_start, wrapper.id_end, wrapper.id_end
        self.comma_id = wrapper.comma_token

    def encode(self, text):
        return list(self.wrapper.tokenize([text])[0])


class _EmbeddingLookup:
    """`hijack.embedding_db.find_embedding_at_position` in `chunk_prompt`'s terms, remembering the objects."""

    def __init__(self, db):
        self.db, self.found = db, {}

    def match(self, ids, position):
        embedding, length = self.db.find_embedding_at_position(ids, position)
        if embedding is None:
            return None
        key = f"#{id(embedding)}"
        self.found[key] = embedding
        return key, int(embedding.vectors), length


class TextConditionalModel(torch.nn.Module):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.hijack = hijack
        self.chunk_length = 75
        self.wrapped = wrapped
        self.is_trainable = getattr(wrapped, "is_trainable", False)
        self.input_key = getattr(wrapped, "input_key", "txt")
        self.return_pooled = getattr(self.wrapped, "return_pooled", False)
        self.legacy_ucg_val = None
        self.comma_token = None
        self.id_start = None
        self.id_end = None
        self.id_pad = None

    def empty_chunk(self):
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def tokenize(self, texts):
        raise NotImplementedError

    def encode_with_transformers(self, tokens):
        raise NotImplementedError

    def encode_embedding_init_text(self, init_text, nvpt):
        raise NotImplementedError

    def tokenize_line(self, line):
        from lib_sdtrain.models.prompt import chunk_prompt

        lookup = _EmbeddingLookup(self.hijack.embedding_db)
        ours, token_count = chunk_prompt(line, _ChunkTokenizer(self), emphasis=shared.opts.emphasis,
                                         comma_backtrack=int(shared.opts.data.get("comma_padding_backtrack", 20)),
                                         embeddings=lookup)
        chunks = []
        for c in ours:
            chunk = PromptChunk()
            chunk.tokens, chunk.multipliers = list(c.ids), list(c.multipliers)
            # chunk_prompt counts the start id in its offsets; A1111's PromptChunkFix does not
            chunk.fixes = [PromptChunkFix(pos - 1, lookup.found[key]) for pos, key in c.fixes]
            chunks.append(chunk)
        return chunks, token_count

    def process_texts(self, texts):
        token_count = 0
        cache = {}
        batch_chunks = []
        for line in texts:
            if line in cache:
                chunks = cache[line]
            else:
                chunks, current_token_count = self.tokenize_line(line)
                token_count = max(current_token_count, token_count)
                cache[line] = chunks
            batch_chunks.append(chunks)
        return batch_chunks, token_count

    def forward(self, texts):
        if not isinstance(texts, list):
            texts = [texts]
        batch_chunks, token_count = self.process_texts(texts)
        chunk_count = max([len(x) for x in batch_chunks])
        zs = []
        for i in range(chunk_count):
            batch_chunk = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            tokens = [x.tokens for x in batch_chunk]
            multipliers = [x.multipliers for x in batch_chunk]
            self.hijack.fixes = [x.fixes for x in batch_chunk]
            zs.append(self.process_tokens(tokens, multipliers))
        if self.return_pooled:
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        from lib_sdtrain.models.conditioning import apply_emphasis

        tokens = torch.asarray(remade_batch_tokens).to(devices.device)
        if self.id_end != self.id_pad:
            for batch_pos in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[batch_pos].index(self.id_end)
                tokens[batch_pos, index + 1:tokens.shape[1]] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        z = apply_emphasis(z, torch.asarray(batch_multipliers), shared.opts.emphasis)
        if pooled is not None:
            z.pooled = pooled
        return z


FrozenCLIPEmbedderWithCustomWordsBase = TextConditionalModel


class FrozenCLIPEmbedderWithCustomWords(TextConditionalModel):
    """SD1: hidden states of `wrapped.transformer` (HF CLIP), CLIP skip from opts."""

    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.tokenizer = wrapped.tokenizer
        vocab = self.tokenizer.get_vocab()
        self.comma_token = vocab.get(",</w>", None)
        self.id_start = self.wrapped.tokenizer.bos_token_id
        self.id_end = self.wrapped.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        skip = shared.opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=-skip)
        if skip > 1:
            z = outputs.hidden_states[-skip]
            return self.wrapped.transformer.text_model.final_layer_norm(z)
        return outputs.last_hidden_state

    def encode_embedding_init_text(self, init_text, nvpt):
        embedding_layer = self.wrapped.transformer.text_model.embeddings
        ids = self.wrapped.tokenizer(init_text, max_length=nvpt, truncation=True, return_tensors="pt",
                                     add_special_tokens=False)["input_ids"]
        return embedding_layer.token_embedding.wrapped(
            ids.to(embedding_layer.token_embedding.wrapped.weight.device)).squeeze(0)


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden")
        if shared.opts.sdxl_clip_l_skip is True:
            return outputs.hidden_states[-shared.opts.CLIP_stop_at_last_layers]
        if self.wrapped.layer == "last":
            return outputs.last_hidden_state
        return outputs.hidden_states[self.wrapped.layer_idx]
