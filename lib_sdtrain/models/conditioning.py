"""Text conditioning as A1111 feeds it to the UNet, computed with Hugging Face CLIP text models.

What A1111 v1.10.1 (commit 82a973c0) does, and what `PromptEncoder` reproduces:
- Each prompt becomes 77-id chunks (`prompt.chunk_prompt`); a batch is padded to its longest prompt with all-padding
  chunks; every chunk index is one encoder call over the batch (`sd_hijack_clip.TextConditionalModel.forward`).
- The layer taken per family (`encode_with_transformers` of the hijack wrappers, plus the LDM/SGM embedders):
  - sd1: CLIP skip 1 → `last_hidden_state` (after `final_layer_norm`); CLIP skip n → `hidden_states[-n]` →
    `final_layer_norm` (`FrozenCLIPEmbedderWithCustomWords`, `opts.CLIP_stop_at_last_layers`).
  - sd2: the penultimate block's output → final layer norm (ldm `FrozenOpenCLIPEmbedder(layer="penultimate")`:
    stops before the last resblock, then `ln_final`). A1111 ignores CLIP skip here.
  - sdxl: encoder 1 (CLIP-L) `hidden_states[11]` of 13 = `hidden_states[-2]`, no final norm (sgm
    `FrozenCLIPEmbedder(layer="hidden", layer_idx=11)`; with A1111's `sdxl_clip_l_skip` option:
    `hidden_states[-clip_skip]`); encoder 2 (bigG) the penultimate block's output, no `ln_final` (sgm
    `FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False)`); contexts concatenated on the feature axis
    (sgm `GeneralConditioner`, crossattn cat dim 2) → 768 + 1280 = 2048. Pooled = encoder 2's projected pooled
    output (`ln_final` of the last block at the end token, times `text_projection`) of the FIRST chunk only
    (`forward` returns `zs[0].pooled`).
- Emphasis ("Original", the default `opts.emphasis`; `sd_emphasis.EmphasisOriginal`): z·multipliers, then rescaled
  so that the mean over the whole [B, 77, D] chunk batch equals the mean before weighting. Each SDXL encoder does
  this on its own output, before the concatenation.

Where A1111 and diffusers differ (diffusers: no chunks, no emphasis, SD2 drops the last block and uses
`last_hidden_state`, SDXL pads encoder 2 with 49407), this follows A1111.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UserError
from ..hosts import FAMILIES, TextConditioning
from .prompt import (
    CHUNK_LENGTH, DEFAULT_COMMA_BACKTRACK, EMPHASIS_MODES, PromptChunk, chunk_prompt, empty_chunk,
    strip_extra_networks, target_token_count,
)
from .tokenizer import ClipTokenizer

_N_ENCODERS = {"sd1": 1, "sd2": 1, "sdxl": 2}


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, mode: str = "Original") -> torch.Tensor:
    """Weight encoder outputs by the prompt's attention multipliers (A1111 `sd_emphasis`).

    Args:
        z: [B, 77, D] output of one encoder for one chunk index.
        multipliers: [B, 77] per-token weights.
        mode: "Original" (weight, then restore the mean of the whole batch tensor), "No norm" (weight only),
            "Ignore" / "None" (unchanged).
    Returns [B, 77, D] in z's dtype. The arithmetic runs in float32 like A1111's (its multipliers are float32).
    """
    if mode not in EMPHASIS_MODES:
        raise UserError(f"unknown emphasis mode {mode!r}; choose one of {', '.join(EMPHASIS_MODES)}")
    if mode in ("Ignore", "None"):
        return z
    weights = multipliers.to(device=z.device, dtype=torch.float32)[..., None]   # [B, 77, 1]
    weighted = z * weights
    if mode == "Original" and not bool((weights == 1).all()):
        # A1111: "restoring original mean is likely not correct, but it seems to work well to prevent artifacts".
        # The mean is over the whole batch tensor, so one prompt's weights slightly scale its batch neighbours.
        # With all weights 1 A1111 multiplies by mean/mean = 1.0 exactly, so skipping is bit-identical, and a
        # ratio that is not finite (a zero mean, e.g. a freshly initialised encoder) is skipped where A1111 gives NaN.
        ratio = z.mean() / weighted.mean()
        if bool(torch.isfinite(ratio)):
            weighted = weighted * ratio
    return weighted.to(z.dtype)


class _EmbeddingTable:
    """Textual-inversion embeddings by name, found in token streams the way A1111's EmbeddingDatabase does."""

    def __init__(self) -> None:
        self.vectors: dict[str, list[torch.Tensor]] = {}
        self._ids: dict[str, list[int]] = {}
        self._by_first_id: dict[int, list[str]] = {}

    def add(self, name: str, ids: list[int], vectors: list[torch.Tensor]) -> None:
        self.remove(name)
        self.vectors[name], self._ids[name] = vectors, ids
        # Longest name first, then registration order (A1111 `register_embedding_by_name`, a stable sort).
        names = [*self._by_first_id.get(ids[0], []), name]
        self._by_first_id[ids[0]] = sorted(names, key=lambda n: len(self._ids[n]), reverse=True)

    def remove(self, name: str) -> None:
        ids = self._ids.pop(name, None)
        if ids is None:
            return
        del self.vectors[name]
        rest = [n for n in self._by_first_id[ids[0]] if n != name]
        if rest:
            self._by_first_id[ids[0]] = rest
        else:
            del self._by_first_id[ids[0]]

    def match(self, ids: list[int], position: int) -> tuple[str, int, int] | None:
        for name in self._by_first_id.get(ids[position], ()):
            want = self._ids[name]
            if ids[position:position + len(want)] == want:
                return name, int(self.vectors[name][0].shape[0]), len(want)
        return None


class PromptEncoder:
    """Prompts → `TextConditioning`, A1111-exact, with gradients when the caller enables them.

    Args:
        family: "sd1", "sd2" or "sdxl".
        tokenizers: one per text encoder; use `tokenizer.make_tokenizers(family)` (pad ids and flavors differ).
        text_encoders: sd1: `transformers.CLIPTextModel` (CLIP ViT-L/14 layout, quick_gelu); sd2: `CLIPTextModel`
            or `CLIPTextModelWithProjection` holding OpenCLIP ViT-H with ALL 24 blocks, gelu (the penultimate
            block's output is read, so diffusers' 23-block conversion would give the wrong layer); sdxl:
            `CLIPTextModel` (ViT-L) and `CLIPTextModelWithProjection` (bigG, 32 blocks). Any model with the same
            call signature and outputs works.
        clip_skip: A1111's "Clip skip" (1 = last layer). Used by sd1, and by sdxl's encoder 1 only with
            `sdxl_clip_l_skip` (A1111's "Clip skip SDXL" option); otherwise ignored by sd2/sdxl, as in A1111.
        emphasis: A1111's emphasis mode, default "Original".
        comma_backtrack: A1111's "Prompt word wrap length limit" (default 20).
        strip_networks: remove `<lora:...>`-style tags first, as A1111's generation does.

    Textual inversion: `add_embedding(name, vectors)` makes `name` in a prompt stand for `len(vectors[0])` trained
    vectors. Chunking reserves that many placeholder ids (0), and a forward hook on each encoder's input-embedding
    module (`get_input_embeddings()`) overwrites the placeholders' rows with the vectors, out of place, so
    gradients reach them (A1111: `EmbeddingDatabase.find_embedding_at_position` + `sd_hijack.EmbeddingsWithFixes`).
    The hook exists only during the encoder call; the token-embedding table is never changed.
    """

    def __init__(
        self,
        family: str,
        tokenizers: Sequence[ClipTokenizer],
        text_encoders: Sequence[torch.nn.Module],
        clip_skip: int = 1,
        *,
        emphasis: str = "Original",
        comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
        strip_networks: bool = True,
        sdxl_clip_l_skip: bool = False,
    ):
        if family not in FAMILIES:
            raise UserError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
        n = _N_ENCODERS[family]
        if len(tokenizers) != n or len(text_encoders) != n:
            raise UserError(f"{family} needs {n} tokenizer(s) and text encoder(s), "
                            f"got {len(tokenizers)} and {len(text_encoders)}")
        if emphasis not in EMPHASIS_MODES:
            raise UserError(f"unknown emphasis mode {emphasis!r}; choose one of {', '.join(EMPHASIS_MODES)}")
        if isinstance(comma_backtrack, bool) or not isinstance(comma_backtrack, int) \
                or not 0 <= comma_backtrack < CHUNK_LENGTH:
            raise UserError(f"comma back-track must be 0..{CHUNK_LENGTH - 1}, not {comma_backtrack}")
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
            raise UserError(f"clip skip must be a whole number >= 1, not {clip_skip!r}")
        self.family = family
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.clip_skip = clip_skip
        self.emphasis = emphasis
        self.comma_backtrack = comma_backtrack
        self.strip_networks = strip_networks
        self.sdxl_clip_l_skip = sdxl_clip_l_skip
        # (hidden_states index or None for last_hidden_state, apply the final layer norm) per encoder
        if family == "sd1":
            self._layers = [(None, False)] if clip_skip == 1 else [(-clip_skip, True)]
        elif family == "sd2":
            self._layers = [(-2, True)]
        else:
            self._layers = [(-clip_skip if sdxl_clip_l_skip else -2, False), (-2, False)]
        for (index, _), model in zip(self._layers, self.text_encoders):
            layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
            if index is not None and layers is not None and -index > layers:
                raise UserError(f"clip skip {-index} is more than the text encoder's {layers} layers")
        self._embeddings = _EmbeddingTable()

    # ---- textual inversion ----------------------------------------------------------------------------
    @property
    def embeddings(self) -> dict[str, list[torch.Tensor]]:
        """Registered textual-inversion vectors: name → one [n, D_i] tensor per text encoder (read-only view)."""
        return dict(self._embeddings.vectors)

    def add_embedding(self, name: str, vectors: Sequence[torch.Tensor]) -> None:
        """Make `name` in prompts stand for trained vectors, one [n, D_i] tensor per text encoder.

        The tensors are used as given (no copy), so a `torch.nn.Parameter` receives gradients. The name is
        matched by its token ids from the first tokenizer in every encoder's token stream, as A1111 does
        (SDXL: `clip_l` vectors go to encoder 1, `clip_g` to encoder 2). Re-adding a name replaces it.
        """
        if not isinstance(name, str) or not name.strip():
            raise UserError("an embedding needs a non-empty name")
        vectors = list(vectors)
        if len(vectors) != len(self.text_encoders):
            raise UserError(f"embedding {name!r}: {_family_name(self.family)} needs {len(self.text_encoders)} "
                            f"vector tensor(s), got {len(vectors)}")
        counts = {int(v.shape[0]) if v.ndim == 2 else -1 for v in vectors}
        if len(counts) != 1 or not 1 <= next(iter(counts)) <= CHUNK_LENGTH:
            raise UserError(f"embedding {name!r}: vectors must be [n, dim] with the same n (1..{CHUNK_LENGTH}) "
                            f"for every encoder, got shapes {[tuple(v.shape) for v in vectors]}")
        for i, (vec, model) in enumerate(zip(vectors, self.text_encoders)):
            width = model.get_input_embeddings().weight.shape[1]
            if vec.shape[1] != width:
                raise UserError(f"embedding {name!r}: encoder {i + 1} expects width {width}, got {vec.shape[1]}")
        ids = self.tokenizers[0].encode(name)
        if not ids:
            raise UserError(f"embedding name {name!r} has no tokens")
        self._embeddings.add(name, ids, vectors)

    def remove_embedding(self, name: str) -> None:
        self._embeddings.remove(name)

    # ---- tokens ---------------------------------------------------------------------------------------
    def prepare(self, prompt: str) -> str:
        """The text that gets tokenized (extra-network tags removed when `strip_networks`)."""
        if not isinstance(prompt, str):
            raise UserError(f"a prompt must be text, not {type(prompt).__name__}")
        return strip_extra_networks(prompt)[0] if self.strip_networks else prompt

    def chunks(self, prompt: str, encoder: int = 0) -> tuple[list[PromptChunk], int]:
        """The 77-id chunks one encoder sees for a prompt, and A1111's token count."""
        return self._chunk_prepared(self.prepare(prompt), encoder)

    def _chunk_prepared(self, text: str, encoder: int) -> tuple[list[PromptChunk], int]:
        return chunk_prompt(text, self.tokenizers[encoder], emphasis=self.emphasis,
                            comma_backtrack=self.comma_backtrack,
                            embeddings=self._embeddings if self._embeddings.vectors else None)

    def token_count(self, prompt: str) -> tuple[int, int]:
        """(tokens, limit) for the UI's "N/75", as A1111's token counter computes them (first encoder)."""
        count = self.chunks(prompt)[1]
        return count, target_token_count(count)

    # ---- encoding -------------------------------------------------------------------------------------
    def __call__(self, prompts: list[str]) -> TextConditioning:
        """Context [B, 77·chunks, D] (and SDXL's pooled [B, P]) for a batch of prompts."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise UserError("prompts must be a non-empty list of strings")
        texts = [self.prepare(p) for p in prompts]
        unique = list(dict.fromkeys(texts))
        per_encoder: list[list[list[PromptChunk]]] = []
        for i in range(len(self.text_encoders)):
            by_text = {t: self._chunk_prepared(t, i)[0] for t in unique}   # duplicates tokenized once
            per_encoder.append([by_text[t] for t in texts])
        # A batch is as long as its longest prompt. SDXL's two tokenizers can disagree only on literal special
        # tokens or HTML entities; A1111 would then fail to concatenate, here the shorter side is padded.
        n_chunks = max(len(c) for prompt_chunks in per_encoder for c in prompt_chunks)

        contexts: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        for i, (model, tokenizer) in enumerate(zip(self.text_encoders, self.tokenizers)):
            device = _device_of(model)
            pad = empty_chunk(tokenizer)
            zs = []
            for k in range(n_chunks):
                batch = [c[k] if k < len(c) else pad for c in per_encoder[i]]
                ids = torch.tensor([c.ids for c in batch], dtype=torch.long, device=device)   # [B, 77]
                mults = torch.tensor([c.multipliers for c in batch], dtype=torch.float32)     # [B, 77]
                z, chunk_pooled = self._encode(i, ids, [c.fixes for c in batch])
                zs.append(apply_emphasis(z, mults, self.emphasis))
                if k == 0:
                    pooled = chunk_pooled if chunk_pooled is not None else pooled
            contexts.append(torch.cat(zs, dim=1))                                              # [B, 77k, D_i]
        context = contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=2)            # SDXL: [B, 77k, 2048]
        return TextConditioning(context=context, pooled=pooled)

    def _encode(self, index: int, ids: torch.Tensor, fixes: list[list[tuple[int, str]]]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One encoder call for one chunk index: (the family's hidden state [B, 77, D], pooled [B, P] or None)."""
        model = self.text_encoders[index]
        hook = None
        if any(fixes):
            hook = model.get_input_embeddings().register_forward_hook(
                lambda _module, _inputs, output: self._splice(output, fixes, index))
        try:
            out = model(input_ids=ids, output_hidden_states=True)
        finally:
            if hook is not None:
                hook.remove()
        layer, final_norm = self._layers[index]
        z = out.last_hidden_state if layer is None else out.hidden_states[layer]
        if final_norm:
            z = _final_layer_norm(model)(z)
        pooled = None
        if self.family == "sdxl" and index == 1:
            pooled = getattr(out, "text_embeds", None)
            if pooled is None:
                raise UserError("SDXL's second text encoder must be a CLIPTextModelWithProjection "
                                "(its pooled output feeds the UNet)")
        return z, pooled

    def _splice(self, embeds: torch.Tensor, fixes: list[list[tuple[int, str]]], index: int) -> torch.Tensor:
        """Put textual-inversion vectors over their placeholder rows; [B, 77, D] in, [B, 77, D] out.

        Like A1111's `EmbeddingsWithFixes.forward`: at most as many vectors as fit before the end of the chunk.
        """
        rows = []
        for row, row_fixes in zip(embeds, fixes):
            for position, name in row_fixes:
                vec = self._embeddings.vectors[name][index].to(device=row.device, dtype=row.dtype)
                n = min(row.shape[0] - position, vec.shape[0])
                row = torch.cat([row[:position], vec[:n], row[position + n:]])
            rows.append(row)
        return torch.stack(rows)


def _family_name(family: str) -> str:
    return {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}.get(family, family)


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _final_layer_norm(model: Any) -> torch.nn.Module:
    text_model = getattr(model, "text_model", model)
    norm = getattr(text_model, "final_layer_norm", None)
    if norm is None:
        raise UserError(f"{type(model).__name__} has no final_layer_norm; expected a transformers CLIP text model")
    return norm
