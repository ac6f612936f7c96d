"""Stand-in for `modules.sd_hijack_clip`: the "*WithCustomWords" wrappers around the CLIP text encoders.

Behaviour of A1111 v1.10.1 (a1111-host.md §3) that the host relies on:
* `tokenize(texts)` gives ids without start/end tokens; `id_start`, `id_end`, `id_pad`, `comma_token` are the
  wrapper's special ids; `encode_embedding_init_text(text, n)` looks the words up in the original token table.
* Calling the wrapper with a list of prompts splits each into 75-token chunks (emphasis, BREAK, comma
  back-tracking — done by the project's A1111-exact `chunk_prompt`, fed with this wrapper's tokenizer), finds
  textual-inversion words through `hijack.embedding_db.find_embedding_at_position` (reserving their vectors'
  worth of placeholder ids), and encodes chunk by chunk: before each chunk batch it leaves the batch's
  (offset, Embedding) lists in `hijack.fixes` for `EmbeddingsWithFixes`; offsets do not count the start token.
* The chunk outputs are concatenated along the token axis, with the emphasis weights applied (project helper).
"""

from collections import namedtuple

import torch

from modules import devices, shared

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])


class PromptChunk:
    """One 77-id chunk: ids, per-id emphasis weights, textual-inversion words in it."""

    def __init__(self, tokens=None, multipliers=None, fixes=None):
        self.tokens, self.multipliers, self.fixes = tokens or [], multipliers or [], fixes or []


class _Vocabulary:
    """The wrapper seen as the tokenizer interface `chunk_prompt` expects."""

    def __init__(self, wrapper):
        self.wrapper = wrapper
        self.start_id, self.end_id = wrapper.id_start, wrapper.id_end
        self.pad_id, self.comma_id = wrapper.id_end, wrapper.comma_token

    def encode(self, text):
        return list(self.wrapper.tokenize([text])[0])


class _WordFinder:
    """The embedding DB's lookup in `chunk_prompt`'s terms; remembers the Embedding objects it handed out."""

    def __init__(self, db):
        self.db, self.by_key = db, {}

    def match(self, ids, position):
        embedding, length = self.db.find_embedding_at_position(ids, position)
        if embedding is None:
            return None
        key = "emb%d" % id(embedding)
        self.by_key[key] = embedding
        return key, int(embedding.vectors), length


class TextConditionalModel(torch.nn.Module):
    """Shared machinery of the CLIP and OpenCLIP wrappers; subclasses supply the tokenizer and the encoder."""

    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped, self.hijack = wrapped, hijack
        self.chunk_length = 75
        self.is_trainable = getattr(wrapped, "is_trainable", False)
        self.input_key = getattr(wrapped, "input_key", "txt")
        self.return_pooled = getattr(wrapped, "return_pooled", False)
        self.legacy_ucg_val = None
        self.comma_token = self.id_start = self.id_end = self.id_pad = None

    # subclasses
    def tokenize(self, texts):
        raise NotImplementedError

    def encode_with_transformers(self, tokens):
        raise NotImplementedError

    def encode_embedding_init_text(self, init_text, nvpt):
        raise NotImplementedError

    # chunks
    def empty_chunk(self):
        size = self.chunk_length + 2
        return PromptChunk([self.id_start] + [self.id_end] * (size - 1), [1.0] * size)

    def tokenize_line(self, line):
        from lib_sdtrain.models.prompt import chunk_prompt

        finder = _WordFinder(self.hijack.embedding_db)
        pieces, count = chunk_prompt(line, _Vocabulary(self), emphasis=shared.opts.emphasis,
                                     comma_backtrack=int(shared.opts.data.get("comma_padding_backtrack", 20)),
                                     embeddings=finder)
        chunks = [PromptChunk(list(p.ids), list(p.multipliers),
                              [PromptChunkFix(at - 1, finder.by_key[key]) for at, key in p.fixes])
                  for p in pieces]
        return chunks, count

    def process_texts(self, texts):
        seen, per_prompt, longest = {}, [], 0
        for text in texts:
            if text not in seen:
                chunks, count = self.tokenize_line(text)
                seen[text] = chunks
                longest = max(longest, count)
            per_prompt.append(seen[text])
        return per_prompt, longest

    def forward(self, texts):
        texts = texts if isinstance(texts, list) else [texts]
        per_prompt, _ = self.process_texts(texts)
        outputs = []
        for k in range(max(len(chunks) for chunks in per_prompt)):
            column = [chunks[k] if k < len(chunks) else self.empty_chunk() for chunks in per_prompt]
            self.hijack.fixes = [c.fixes for c in column]
            outputs.append(self.process_tokens([c.tokens for c in column], [c.multipliers for c in column]))
        joined = torch.hstack(outputs)
        return (joined, outputs[0].pooled) if self.return_pooled else joined

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        from lib_sdtrain.models.conditioning import apply_emphasis

        ids = torch.asarray(remade_batch_tokens).to(devices.device)
        if self.id_pad != self.id_end:            # OpenCLIP pads after the first end token
            for row, seq in enumerate(remade_batch_tokens):
                ids[row, seq.index(self.id_end) + 1:] = self.id_pad
        hidden = self.encode_with_transformers(ids)
        pooled = getattr(hidden, "pooled", None)
        hidden = apply_emphasis(hidden, torch.asarray(batch_multipliers), shared.opts.emphasis)
        if pooled is not None:
            hidden.pooled = pooled
        return hidden


FrozenCLIPEmbedderWithCustomWordsBase = TextConditionalModel


class FrozenCLIPEmbedderWithCustomWords(TextConditionalModel):
    """SD1 (and SDXL's first encoder): transformers' CLIP; CLIP skip from `CLIP_stop_at_last_layers`."""

    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.tokenizer = wrapped.tokenizer
        self.comma_token = self.tokenizer.get_vocab().get(",</w>")
        self.id_start, self.id_end = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        skip = shared.opts.CLIP_stop_at_last_layers
        text_model = self.wrapped.transformer
        result = text_model(input_ids=tokens, output_hidden_states=-skip)
        if skip <= 1:
            return result.last_hidden_state
        return text_model.text_model.final_layer_norm(result.hidden_states[-skip])

    def encode_embedding_init_text(self, init_text, nvpt):
        table = self.wrapped.transformer.text_model.embeddings.token_embedding.wrapped
        ids = self.tokenizer(init_text, max_length=nvpt, truncation=True, return_tensors="pt",
                             add_special_tokens=False)["input_ids"]
        return table(ids.to(table.weight.device)).squeeze(0)


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    """SDXL's CLIP-L: the layer the embedder is configured for; CLIP skip only with `sdxl_clip_l_skip`."""

    def encode_with_transformers(self, tokens):
        inner = self.wrapped
        result = inner.transformer(input_ids=tokens, output_hidden_states=inner.layer == "hidden")
        if shared.opts.sdxl_clip_l_skip is True:
            return result.hidden_states[-shared.opts.CLIP_stop_at_last_layers]
        return result.last_hidden_state if inner.layer == "last" else result.hidden_states[inner.layer_idx]
