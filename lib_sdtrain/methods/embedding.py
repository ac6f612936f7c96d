"""Textual inversion: a new word whose N input vectors are trained, saved as an A1111 v1.10 embedding.

What A1111 does, and what this method reproduces (modules/textual_inversion/textual_inversion.py, v1.10.1):
  - Create: the init text is tokenized without start/end tokens and its token embeddings are read from the
    text encoder's table; vector i = embedded[i * len(embedded) // N] (so a short init text is repeated and a
    long one spread out). SD1's CLIP wrapper asks the tokenizer for at most N tokens (`max_length=nvpt`, which
    truncates); SD2's OpenCLIP wrapper does not truncate. SDXL concatenates both encoders' rows, which works
    only when both have the same count, i.e. with the truncated ids; we use those for both encoders. An empty
    init text gives zero vectors.
  - Train: only the vectors change. The text encoder is frozen but gradients flow through it: wherever the
    word appears in a prompt its N placeholder positions are overwritten with the vectors before the encoder
    runs (`sd_hijack.EmbeddingsWithFixes`). Here that is `PromptEncoder.add_embedding`, so the word also works
    in control-picture prompts while training; `detach` removes it. Batches whose prompts all lack the word
    get a zero gradient (see `_encode_text`), and a run whose captions never contain it is refused at the
    first save instead of writing untrained vectors.
  - Files (formats/a1111.py): `.safetensors` with `emb_params` [N, D] (SD1/SD2) or `clip_l` + `clip_g` (SDXL),
    or the `.pt` layout of `Embedding.save()` (SDXL: the bare `clip_l`/`clip_g` dict). A1111 names an
    embedding after its file, so the file name is the word: the run's output name and the token are one
    (`bind_output_name`). The `.safetensors` header carries the training metadata; A1111's `.pt` dict has no
    place for it (extra keys would break SDXL files), so a `.pt` keeps only A1111's own fields.
Resuming uses the loop's state folder (vectors + optimizer); A1111's `.optim` sidecar is not written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..config import ConfigBase, setting
from ..errors import UserError
from .base import MethodBase

if TYPE_CHECKING:
    import torch

    from ..hosts import ModelParts

SAVE_FORMATS = ("safetensors", "pt")
_PROMPT_SYNTAX = set("()[]{}<>:|,\\")  # would be read as prompt syntax, so the word could never be matched


@dataclass
class EmbeddingSettings(ConfigBase):
    """Settings of textual inversion (the `[embedding]` section of a training config)."""

    KIND = "embedding"
    VERSION = 1

    token: str = setting(
        "", "the new word to train, used in captions and prompts; A1111 names an embedding after its file, so "
        "the output name becomes the token (TOKEN.safetensors / TOKEN.pt). Empty = the run's output name",
        group="embedding")
    init_text: str = setting(
        "*", "words whose token embeddings are the starting vectors (A1111's 'Initialization text'), e.g. "
        "'woman' or 'painting'; empty = zero vectors", group="embedding")
    vectors: int = setting(
        1, "vectors per token (A1111's 'Number of vectors per token'): more learn more detail but use more of "
        "the prompt's 75 tokens", minimum=1, maximum=75, group="embedding")
    save_format: str = setting(
        "safetensors", "file format: safetensors (emb_params, or clip_l + clip_g for SDXL; carries the "
        "training metadata) or pt (A1111's own Embedding.save layout)", choices=list(SAVE_FORMATS),
        group="embedding")

    def validate(self) -> None:
        super().validate()
        check_token(self.token, allow_empty=True)


def check_token(token: str, *, allow_empty: bool = False) -> None:
    """Refuse words A1111 could not name a file after, or that prompt syntax would swallow."""
    if not token:
        if allow_empty:
            return
        raise UserError("embedding: no token given (set token, or the output name)")
    bad = sorted({c for c in token if c in _PROMPT_SYNTAX or c in '/*?"' or ord(c) < 32})
    if bad or token != token.strip() or token.startswith("."):
        raise UserError(f"embedding token {token!r} cannot be used: it must be a plain word for file names and "
                        f"prompts (no {' '.join(bad) or 'leading/trailing spaces or dot'})")


def bind_output_name(settings: EmbeddingSettings, run_name: str) -> str:
    """Make the output name and the token one word (A1111 uses the file name as the token); returns the name.

    token empty → token = run name; token set → the output name becomes the token (a file named otherwise
    would answer to a word the captions never used).
    """
    if not settings.token:
        check_token(run_name)
        settings.token = run_name
    return settings.token


def init_vectors(table: torch.Tensor, ids: list[int], n: int, *, truncate: bool) -> torch.Tensor:
    """A1111's `create_embedding`: N rows from the init text's token embeddings (see the module docstring).

    Args:
        table: [vocab, D] token-embedding weights. ids: init-text token ids (no start/end). n: vectors.
        truncate: take at most n ids first (SD1/SDXL CLIP wrapper) or all of them (SD2 OpenCLIP wrapper).
    Returns float32 [n, D] on the table's device; zeros when `ids` is empty.
    """
    import torch

    vec = torch.zeros(n, table.shape[1], dtype=torch.float32, device=table.device)
    if truncate:
        ids = ids[:n]
    if ids:
        embedded = table[torch.tensor(ids, device=table.device)].detach().float()   # [k, D]
        for i in range(n):
            vec[i] = embedded[i * embedded.shape[0] // n]
    return vec


def _prompt_hook(parts: Any, what: str):
    """The host's `add_embedding` / `remove_embedding` (on the parts, or on its PromptEncoder)."""
    for owner in (parts, getattr(parts, "prompt_encoder", None)):
        fn = getattr(owner, what, None) if owner is not None else None
        if callable(fn):
            return fn
    raise UserError("this model host cannot splice textual-inversion vectors into prompts "
                    f"(its parts have no {what})")


class EmbeddingMethod(MethodBase):
    """The TrainingMethod of textual inversion (see the module docstring)."""

    name = "embedding"
    output_kind = "embedding"
    same_name_suffixes = (".pt", ".safetensors", ".bin", ".png", ".webp")   # A1111: one word per file stem

    def __init__(self, settings: EmbeddingSettings | None = None) -> None:
        self.settings = settings if settings is not None else EmbeddingSettings()
        self.settings.validate()
        self._params: list[torch.nn.Parameter] = []
        self._frozen: list[tuple[Any, dict[str, bool]]] = []
        self._parts: Any = None
        self._token = ""
        self._registered = False
        self._wrapped_encode: tuple[bool, Any] | None = None   # (parts had its own attribute, that attribute)
        self._token_seen = False

    @property
    def file_suffix(self) -> str:   # type: ignore[override]
        return "." + self.settings.save_format

    @classmethod
    def check_run(cls, cfg: Any) -> None:
        """A1111 names an embedding after its file: the run's output name is the token."""
        cfg.name = bind_output_name(cfg.embedding, cfg.name)

    @classmethod
    def estimate_parameters(cls, settings: EmbeddingSettings, family: str, model_m: dict[str, float]) -> float:
        width = {"sd1": 768, "sd2": 1024, "sdxl": 768 + 1280}[family]   # one vector per text encoder
        return float((settings.vectors or 8) * width)

    # ---- attach / detach ------------------------------------------------------------------------------
    def attach(self, parts: ModelParts, unet_lr: float | None = None, text_encoder_lr: float | None = None
               ) -> list[dict[str, Any]]:
        """Create the vectors from the init text, freeze the model, register the word; one parameter group."""
        import torch

        if self._parts is not None:
            raise RuntimeError("EmbeddingMethod.attach called twice without detach")
        s = self.settings
        check_token(s.token)
        tables = [emb.weight for emb in parts.token_embeddings()]
        tokenizers = list(parts.tokenizers)
        if len(tokenizers) != len(tables) or not tables:
            raise UserError("embedding: the model must have a tokenizer for each text encoder")
        if not tokenizers[0].encode(s.token):
            raise UserError(f"embedding token {s.token!r} has no tokens")
        self._parts, self._token = parts, s.token
        try:
            vectors = []
            for table, tokenizer in zip(tables, tokenizers):
                ids = tokenizer.encode(s.init_text) if s.init_text else []
                if s.init_text and not ids:
                    raise UserError(f"embedding: the init text {s.init_text!r} has no tokens")
                vectors.append(init_vectors(table, ids, s.vectors, truncate=parts.family != "sd2"))
            self._params = [torch.nn.Parameter(v) for v in vectors]
            for root in [parts.unet, *parts.text_encoders]:
                self._frozen.append((root, {n: p.requires_grad for n, p in root.named_parameters()}))
                root.requires_grad_(False)
            _prompt_hook(parts, "add_embedding")(s.token, self._params)
            self._registered = True
            self._wrapped_encode = ("encode_text" in vars(parts), vars(parts).get("encode_text"))
            parts.encode_text = self._encode_text
        except BaseException:
            self.detach()
            raise
        group: dict[str, Any] = {"name": "text_encoder", "params": list(self._params)}
        if text_encoder_lr is not None:
            group["lr"] = text_encoder_lr
        return [group]

    def _encode_text(self, prompts: list[str]) -> Any:
        """The host's encode_text, seeing whether training batches use the word.

        A batch whose prompts all lack the word (caption dropout, regularization pictures) gives a context that
        does not depend on the vectors, so its loss would have no gradient at all and the backward pass would
        fail; it gets an exact zero that depends on them instead (x + 0·Σv == x), and a zero gradient.
        """
        import torch

        from ..hosts import TextConditioning

        cond = type(self._parts).encode_text(self._parts, prompts) if self._wrapped_encode is None \
            or not self._wrapped_encode[0] else self._wrapped_encode[1](prompts)
        if not torch.is_grad_enabled() or not self._params:
            return cond
        if cond.context.requires_grad:
            self._token_seen = True
            return cond
        zero = sum(p.sum() for p in self._params) * 0.0
        return TextConditioning(context=cond.context + zero.to(cond.context.dtype), pooled=cond.pooled)

    def trains_text_encoder(self) -> bool:
        return True   # the encoder is frozen, but the vectors' gradients pass through it

    def detach(self) -> None:
        """Remove the word from prompts and restore every requires_grad flag; the weights were never touched."""
        if self._wrapped_encode is not None and self._parts is not None:
            had_own, own = self._wrapped_encode
            if had_own:
                self._parts.encode_text = own
            else:
                vars(self._parts).pop("encode_text", None)
        self._wrapped_encode = None
        if self._registered and self._parts is not None:
            _prompt_hook(self._parts, "remove_embedding")(self._token)
        self._registered = False
        for root, flags in self._frozen:
            for n, p in root.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])
        self._frozen.clear()
        self._params = []
        self._parts = None

    # ---- tensors ------------------------------------------------------------------------------------
    def _require_attached(self) -> None:
        if not self._params:
            raise RuntimeError("EmbeddingMethod: attach() first")

    def vectors(self) -> list[torch.Tensor]:
        """The trained vectors, one float32 CPU [N, D] tensor per text encoder."""
        self._require_attached()
        return [p.detach().to("cpu").float().clone() for p in self._params]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The `.safetensors` layout: {"emb_params"} (SD1/SD2) or {"clip_l", "clip_g"} (SDXL)."""
        from ..formats.a1111 import embedding_safetensors_layout

        return embedding_safetensors_layout(self.vectors())

    def metadata(self, extra: dict[str, Any] | None = None) -> dict[str, str]:
        """Header metadata of a `.safetensors` embedding: the run's keys plus ours (all str)."""
        parts, s = self._parts, self.settings
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items() if v is not None}
        vec = self._params[0]
        meta.update({
            "lab.method": "embedding",
            "lab.embedding": json.dumps({"version": s.VERSION, **s.to_dict()}),
            "lab.token": self._token,
            "lab.vectors": str(int(vec.shape[0])),
            "lab.family": parts.family,
            "lab.implementation": f"training-lab/{__version__}",
        })
        info = getattr(parts, "info", None)
        if info is not None and info.name:
            meta["lab.sd_checkpoint_name"] = info.name
        if info is not None and info.sha256:
            meta["lab.sd_checkpoint"] = info.shorthash
        return meta

    def save(self, path: Path, metadata: dict[str, str], *, run_info: dict[str, Any] | None = None) -> Path:
        """Write the embedding atomically in the chosen format; its file stem is the name A1111 gives it."""
        from ..formats.a1111 import (
            embedding_pt_layout,
            embedding_sdxl_layout,
            write_torch_pt,
        )
        from ..formats.safetensors_io import write_safetensors

        self._require_attached()
        if not self._token_seen:
            raise UserError(f"embedding: no training caption contained the token {self._token!r}, so its vectors "
                            "never changed; put the token into the captions (e.g. 'a photo of "
                            f"{self._token}') and start again")
        path = Path(path)
        merged = {**(run_info or {}), **(metadata or {})}
        if self.settings.save_format == "safetensors":
            return write_safetensors(path, self.state_dict(), self.metadata(merged))
        vectors = self.vectors()
        if len(vectors) == 2:
            obj: dict[str, Any] = embedding_sdxl_layout(*vectors)
        else:
            info = getattr(self._parts, "info", None)
            obj = embedding_pt_layout(vectors[0], name=path.stem, step=_int(merged.get("ss_steps")),
                                      sd_checkpoint=info.shorthash if info is not None and info.sha256 else None,
                                      sd_checkpoint_name=info.name if info is not None else None)
        return write_torch_pt(path, obj)

    def load_weights(self, path: str | Path, *, strict: bool = True) -> list[str]:
        """Put an embedding file's vectors (ours or A1111's: `.pt`, `.bin` or `.safetensors`, any of the
        layouts A1111 reads) into the attached vectors; the vector count and widths must match."""
        import torch

        self._require_attached()
        path = Path(path)
        if path.suffix.lower() == ".safetensors":
            from ..formats.safetensors_io import read_header, read_safetensors

            names = set(read_header(path).tensors)   # a model checkpoint by mistake: refused before it is read
            if not ({"clip_l", "clip_g"} <= names or len(names) == 1):
                raise UserError(f"{path.name}: not an embedding A1111 reads (it holds {len(names)} tensors, not "
                                "one, nor clip_l and clip_g): a model checkpoint or a LoRA?")
            data: Any = read_safetensors(path, ["clip_l", "clip_g"] if len(names) > 1 else None)[0]
        else:
            from ..formats.safe_pickle import load_checkpoint

            data = load_checkpoint(path, expect=_embedding_layout_problem)   # refused before its tensors are read
        found = embedding_vectors(data, path.name)
        if len(found) != len(self._params) or any(tuple(v.shape) != tuple(p.shape)
                                                  for v, p in zip(found, self._params)):
            raise UserError(f"{path.name}: vectors {[tuple(v.shape) for v in found]} do not fit this embedding "
                            f"{[tuple(p.shape) for p in self._params]} (other vector count or model family?)")
        with torch.no_grad():
            for v, p in zip(found, self._params):
                p.copy_(v.to(p.device, p.dtype))
        return []   # a run that starts from these vectors still has to meet its token in a caption to save

    def training_state(self) -> dict[str, torch.Tensor]:
        self._require_attached()
        return {f"vectors.{i}": p.detach().to("cpu").clone() for i, p in enumerate(self._params)}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        self._require_attached()
        want = {f"vectors.{i}": p for i, p in enumerate(self._params)}
        if set(state) != set(want) or any(tuple(state[k].shape) != tuple(p.shape) for k, p in want.items()):
            raise UserError("the saved embedding state does not fit this run (were the vectors or the model "
                            f"changed?): saved {sorted((k, tuple(v.shape)) for k, v in state.items())}")
        with torch.no_grad():
            for k, p in want.items():
                p.copy_(state[k].to(p.device, p.dtype))
        self._token_seen = True   # a resumed run has trained the vectors already


def _embedding_layout_problem(root: dict) -> str | None:
    """Why a pickled file's top-level dict is none of the layouts `embedding_vectors` reads, or None."""
    if "string_to_param" in root or len(root) == 1 or {"clip_l", "clip_g"} <= set(root):
        return None
    return (f"not an embedding A1111 reads (a dict of {len(root)} entries without string_to_param, clip_l and "
            "clip_g: a model checkpoint or a hypernetwork?)")


def embedding_vectors(data: Any, name: str = "file") -> list[torch.Tensor]:
    """The vectors of an embedding file's content, per text encoder, the way A1111's
    `create_embedding_from_data` reads them: `string_to_param` (one term), {clip_l, clip_g} (SDXL), or a
    dict with exactly one tensor (`emb_params`, diffusers' `learned_embeds.bin`; 1-D becomes one vector)."""
    import torch

    if not isinstance(data, dict):
        raise UserError(f"{name}: not an embedding (expected a dict)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"{name}: the embedding must hold exactly one term")
        tensors = list(params.values())
    elif "clip_l" in data and "clip_g" in data:
        tensors = [data["clip_l"], data["clip_g"]]
    elif len(data) == 1:
        tensors = list(data.values())
    else:
        raise UserError(f"{name}: not an embedding A1111 reads (no string_to_param, clip_l/clip_g or single tensor)")
    out = []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() not in (1, 2):
            raise UserError(f"{name}: the embedding vectors are not a [vectors, width] float tensor")
        out.append((t.unsqueeze(0) if t.dim() == 1 else t).detach().float())
    if any(v.shape[0] == 0 for v in out):
        raise UserError(f"{name}: the embedding holds no vector")
    if len({v.shape[0] for v in out}) > 1:   # SDXL: one vector per token for each text encoder
        raise UserError(f"{name}: clip_l holds {out[0].shape[0]} vectors and clip_g {out[1].shape[0]}: an SDXL "
                        "embedding has as many for each text encoder")
    return out


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
