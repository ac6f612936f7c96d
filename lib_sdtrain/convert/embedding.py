"""Textual-inversion embeddings (`.pt` / `.bin`) -> `.safetensors` that A1111 v1.10 reads.

A1111's `create_embedding_from_data` (a1111-host.md §4) accepts three dict shapes; we read all three from
pickles and write the form it reads back from `.safetensors`:

- `string_to_param = {"*": tensor[n, 768|1024]}` (SD1/SD2, what `Embedding.save()` writes; older files hold a
  `ParameterDict` there) -> `{"emb_params": tensor[n, width]}` (kohya's name; A1111 takes any single-tensor
  file as an embedding);
- `{"clip_l": tensor[n, 768], "clip_g": tensor[n, 1280]}` (SDXL, all values tensors) -> the same two tensors;
- in a `.pt`/`.bin`, a dict of one floating-point tensor of 1 or 2 dimensions (kohya's `{"emb_params": …}` saved with
  torch.save, diffusers' `learned_embeds.bin` `{"<token>": tensor[768]}`) -> `{"emb_params": tensor[n, width]}`;
  a key other than `emb_params` is kept as `embedding_key` metadata.

`name`, `step`, `sd_checkpoint` and `sd_checkpoint_name` become `embedding_<field>` metadata strings (A1111
ignores them; they keep the file self-describing). The output's stem is the input's stem, which is the name
A1111 gives the embedding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..formats.archive import TorchArchive
from .output import ConvertConfig, ConvertResult, conversion_metadata, prepare_tensors, scalar_text, write_verified
from ..formats.safe_pickle import load_tensor
from ..formats.unpickler import LazyTensor, ModuleStub

SDXL_WIDTHS = {"clip_l": 768, "clip_g": 1280}
_INFO_FIELDS = ("name", "step", "sd_checkpoint", "sd_checkpoint_name")
A1111_SUFFIXES = (".pt", ".bin")   # the pickles A1111's embedding loader reads (textual_inversion.load_from_file)


def looks_like(root: Any, path: Path | None = None) -> bool:
    """One of A1111's three shapes; the single-tensor one only in a `.pt`/`.bin` file (or when `path` is not
    known), the only pickles A1111 loads as embeddings: a one-tensor `.ckpt` stays a checkpoint."""
    if not isinstance(root, dict):
        return False
    single = (path is None or path.suffix.lower() in A1111_SUFFIXES) and _single_vector_key(root) is not None
    return "string_to_param" in root or _is_sdxl_pair(root) or single


def _single_vector_key(d: dict) -> Any:
    """The key of A1111's third shape, a dict holding one [vectors, width] (or single-vector) float tensor, or
    None. Checked before the checkpoint kind, which would take such a file as a one-tensor state dict."""
    if len(d) != 1:
        return None
    ((key, t),) = d.items()
    ok = isinstance(t, LazyTensor) and len(t.shape) in (1, 2) and t.dtype.is_floating_point
    return key if ok else None


def _is_sdxl_pair(d: Any) -> bool:
    return isinstance(d, dict) and {"clip_l", "clip_g"} <= set(d) and all(isinstance(v, LazyTensor) for v in d.values())


def vectors(root: dict, name: str) -> dict[str, LazyTensor]:
    """The tensors to write: {"emb_params": t} (SD1/SD2) or {"clip_l": t, "clip_g": t} (SDXL).

    Raises UserError for layouts A1111 would not load (several terms, non-tensor vectors, mismatched sizes).
    """
    if "string_to_param" in root:
        params = root["string_to_param"]
        if isinstance(params, ModuleStub):
            params = params.to_plain()
        if not isinstance(params, dict):
            raise UserError(f"{name}: string_to_param is a {type(params).__name__}, not a table of vectors")
        if len(params) != 1:
            raise UserError(f"{name}: the embedding has {len(params)} terms; A1111 reads exactly one")
        (vec,) = params.values()
        if _is_sdxl_pair(vec):
            return _sdxl(vec, name)
        if not isinstance(vec, LazyTensor) or len(vec.shape) not in (1, 2) or not vec.dtype.is_floating_point:
            raise UserError(f"{name}: the embedding vector is not a floating-point [vectors, width] tensor")
        return {"emb_params": vec}
    key = _single_vector_key(root)
    if key is not None:
        return {"emb_params": root[key]}
    return _sdxl(root, name)


def _sdxl(d: dict, name: str) -> dict[str, LazyTensor]:
    extra = sorted(str(k) for k in d if k not in SDXL_WIDTHS)
    if extra:  # A1111 would turn every value into a vector; anything besides the pair breaks its splicing
        raise UserError(f"{name}: SDXL embedding with unexpected entries {', '.join(extra)}")
    out = {k: d[k] for k in ("clip_l", "clip_g")}
    for key, t in out.items():
        if len(t.shape) != 2 or t.shape[1] != SDXL_WIDTHS[key] or not t.dtype.is_floating_point:
            raise UserError(f"{name}: {key} has shape {list(t.shape)}, expected [vectors, {SDXL_WIDTHS[key]}]")
    if out["clip_l"].shape[0] != out["clip_g"].shape[0]:
        raise UserError(f"{name}: clip_l and clip_g hold different numbers of vectors")
    return out


def convert(archive: TorchArchive, out_path: Path, cfg: ConvertConfig, source_sha256: str,
            events: Any = None) -> ConvertResult:
    source = archive.path
    root = archive.root
    lazy = vectors(root, source.name)
    info = {f"embedding_{k}": text for k in _INFO_FIELDS if (text := scalar_text(root.get(k))) is not None}
    if isinstance(root.get("string_to_token"), dict):
        info["embedding_string_to_token"] = json.dumps({str(k): scalar_text(v) for k, v in root["string_to_token"].items()})
    single = _single_vector_key(root)
    if single is not None and single != "emb_params":
        info["embedding_key"] = str(single)[:200]   # diffusers names the tensor by its token ("<cat-toy>")
    dropped = sorted(str(k)[:80] for k in root if k not in ("string_to_param", "clip_l", "clip_g", *_INFO_FIELDS,
                                                              "string_to_token", single))
    ready, _ = prepare_tensors(((k, load_tensor(source, t)) for k, t in lazy.items()), cfg.dtype)
    if "emb_params" in ready and ready["emb_params"].dim() == 1:  # diffusers-style single vector: A1111 unsqueezes
        ready["emb_params"] = ready["emb_params"].unsqueeze(0).contiguous()
    import torch

    if any(t.numel() == 0 for t in ready.values()):
        raise UserError(f"{source.name}: the embedding holds 0 vectors; there is nothing to convert (the file is "
                        "damaged, or was saved before any vector was made)")
    warnings = [] if all(bool(torch.isfinite(t).all()) for t in ready.values()) else [
        "its vectors hold NaN or infinite values: the file is damaged or its training diverged, and A1111 will "
        "draw black or noise where its word is used"]
    token = str(single).strip("<> ") if single is not None and single != "emb_params" else ""
    if token and token != out_path.stem:
        # A1111 names an embedding after its file, never after the key inside it
        warnings.append(f"the file names its word {str(single)!r}, but A1111 calls an embedding by its file name: "
                        f"in prompts it is {out_path.stem!r} (rename the file to use another word)")
    layout = "sdxl" if "clip_g" in ready else "sd1/sd2"
    if layout == "sdxl":   # widths checked when read (clip_l 768, clip_g 1280)
        fits = "SDXL"
    else:
        wide = int(next(iter(ready.values())).shape[-1])
        fits = {768: "SD1.x", 1024: "SD2.x"}.get(wide, "")
        if not fits:
            warnings.append(f"its vectors are {wide} wide, and Stable Diffusion's text encoders take 768 (SD1.x), "
                            "1024 (SD2.x) or 768 + 1280 (SDXL): no model can use it, and A1111 will skip it")
    metadata = {**info, "embedding_layout": layout,
                **conversion_metadata("embedding", source, source_sha256, archive.layout, cfg,
                                      {"entries": dropped} if dropped else {})}
    write_verified(out_path, ready, metadata, overwrite=cfg.overwrite)
    first = next(iter(ready.values()))
    width = sum(t.shape[-1] for t in ready.values())
    return ConvertResult(source, "converted", "embedding", out_path,
                         message=f"{layout} embedding, {first.shape[0]} vector{'s' if first.shape[0] != 1 else ''} "
                                 f"of width {width}"
                                 + (f" (for {fits} models)" if fits else ""),
                         dropped={"entries": dropped} if dropped else {}, warnings=warnings)
