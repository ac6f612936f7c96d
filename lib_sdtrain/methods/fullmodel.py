"""Training the model's own weights in place (Dreambooth, full fine-tune): shared by both methods.

The host lends its model (in A1111: the user's loaded checkpoint), so everything `attach` changes is undone
exactly by `detach`, after a finished, failed or stopped run alike (the recipe of a1111-host.md §3):
  - the weights that will be trained are copied to CPU memory first (not a second GPU copy) and copied back;
  - trained modules (the UNet, and the text encoders when asked) are cast to float32 as a whole, because
    fp16 AdamW updates underflow and a model with mixed dtypes only runs under autocast. Frozen weights of
    those modules go back by a cast (fp16/bf16 → fp32 → fp16/bf16 is exact), so they need no backup;
  - every `requires_grad` and train/eval flag of those modules is recorded and put back.
Only the selected UNet parameters (`train_blocks`) and, optionally, all text-encoder parameters train.

An optional EMA (exponential moving average) of the trained weights follows each optimizer step with the
usual warm-up, decay_n = min(decay, (1 + n) / (10 + n)) (diffusers `EMAModel`); when it is on, the EMA
weights are what every save writes. It lives beside the weights (GPU) or, with `ema_on_cpu`, in CPU memory.

Saving is host-agnostic: `parts.checkpoint_state_dict()` gives the whole model under A1111's single-file LDM
keys; it is written as one `.safetensors` (fp16 or fp32, no EMA copies, no optimizer state) with metadata
saying what it was trained from, next to (never over) the base model. A diffusers folder can be exported too.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import UserError
from .base import MethodBase, component_groups

if TYPE_CHECKING:
    import torch

    from ..hosts import ModelParts

SAVE_PRECISIONS = ("fp16", "fp32")
FULL_LR_HINT = 2e-5   # above this a full fine-tune usually burns in a few hundred steps (guides: 1e-6 .. 5e-6)

# UNet regions by module naming: standalone diffusers modules, A1111's CompVis/SGM modules.
UNET_REGIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "diffusers": {"down": ("down_blocks.",), "mid": ("mid_block.",), "up": ("up_blocks.",)},
    "ldm": {"down": ("input_blocks.",), "mid": ("middle_block.",), "up": ("output_blocks.",)},
}
# Kinds restrict the chosen regions: attention projections only, or whole transformer blocks.
TRANSFORMER_CLASSES = ("Transformer2DModel", "SpatialTransformer")
BLOCK_WORDS = ("all", "down", "mid", "up", "attn", "transformer")
TRAIN_BLOCKS_HELP = (
    "which UNet weights train: all, or regions down / mid / up (comma-separated, e.g. \"mid,up\"), optionally "
    "narrowed by attn (attention projections only) or transformer (whole transformer blocks), e.g. \"attn\" "
    "or \"up,transformer\"")


def parse_train_blocks(spec: str) -> tuple[set[str], str]:
    """("regions", "kind") of a `train_blocks` value; regions empty = everywhere. UserError if malformed."""
    words = [w.strip().lower() for w in str(spec).split(",") if w.strip()]
    if not words:
        raise UserError("train_blocks is empty; use e.g. all, up, mid,up or attn")
    bad = [w for w in words if w not in BLOCK_WORDS]
    if bad:
        raise UserError(f"train_blocks: unknown part {bad[0]!r}; use {', '.join(BLOCK_WORDS)}")
    kinds = [w for w in words if w in ("attn", "transformer")]
    if len(kinds) > 1:
        raise UserError("train_blocks: choose attn or transformer, not both")
    regions = {w for w in words if w in ("down", "mid", "up")}
    if "all" in words:
        regions = set()
    return regions, kinds[0] if kinds else ""


def select_unet_parameters(unet: Any, naming: str, spec: str) -> list[str]:
    """Names of the UNet parameters `spec` trains (see TRAIN_BLOCKS_HELP), in the module's order.

    Regions are the down / middle / up block lists (diffusers `down_blocks` / `mid_block` / `up_blocks`,
    LDM `input_blocks` / `middle_block` / `output_blocks`); "all" also includes the input/output
    convolutions and time (and SDXL size) embeddings. `attn` keeps the self/cross-attention projections
    (`attn1`/`attn2`, the same names in both namings); `transformer` keeps whole transformer blocks.
    """
    regions, kind = parse_train_blocks(spec)
    if naming not in UNET_REGIONS:
        raise ValueError(f"unknown module naming {naming!r}")
    prefixes = tuple(p for r in sorted(regions) for p in UNET_REGIONS[naming][r])
    transformer_roots = tuple(f"{n}." for n, m in unet.named_modules()
                              if type(m).__name__ in TRANSFORMER_CLASSES) if kind == "transformer" else ()
    out = []
    for name, _ in unet.named_parameters():
        if prefixes and not name.startswith(prefixes):
            continue
        if kind == "attn" and ".attn1." not in name and ".attn2." not in name:
            continue
        if kind == "transformer" and not name.startswith(transformer_roots):
            continue
        out.append(name)
    return out


def refuse_base_output(out_dir: Path, name: str, suffix: str, base: Path | None) -> None:
    """UserError when outputs named `name` in `out_dir` (final, epoch or step saves) would land on the base model
    file `base`. Overwriting never allows it: the submission check (preflight) and the method both ask this."""
    if base is None or not Path(base).name:
        return
    base = Path(base)
    same_dir = base.parent.resolve() == Path(out_dir).resolve()
    pattern = rf"{re.escape(name)}(-\d{{6,}}|-step\d{{8,}})?{re.escape(suffix)}"
    if same_dir and re.fullmatch(pattern, base.name, flags=re.IGNORECASE):
        raise UserError(f"the output name '{name}' would write over the base model {base}; "
                        "choose another name (the base model is never replaced)")


@dataclass
class _Root:
    """One module the method trains in, and what `detach` needs to put it back."""

    key: str                                  # "unet", "text_encoder0", ...
    module: Any
    trained: list[str]                        # parameter names that train
    grads: dict[str, bool] = field(default_factory=dict)
    modes: dict[str, bool] = field(default_factory=dict)
    dtypes: dict[str, Any] = field(default_factory=dict)          # param/buffer name -> dtype before attach
    backups: dict[str, Any] = field(default_factory=dict)         # trained param name -> CPU copy
    devices: dict[str, Any] = field(default_factory=dict)


class FullModelMethod(MethodBase):
    """TrainingMethod base for Dreambooth and full fine-tuning (see the module docstring).

    Subclasses set `name` and give a settings object with: train_text_encoder, train_blocks, save_precision,
    export_diffusers and optionally ema, ema_decay, ema_on_cpu.
    """

    name = "full"
    file_suffix = ".safetensors"
    output_kind = "checkpoint"
    side_suffixes = (".yaml", ".yml")   # A1111 loads NAME.yaml with NAME.safetensors: see _copy_base_yaml
    supports_fsdp = True   # under FSDP the trained weights are sharded tensors: see the `*_like` helpers used below

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.settings.validate()
        self._parts: ModelParts | None = None
        self._roots: list[_Root] = []
        self._ema: dict[tuple[str, str], torch.Tensor] = {}
        self._ema_updates = 0
        self._out_dir: Path | None = None       # where the loop will write, known after prepare_data
        self._out_name = ""
        self._overwrite = False                 # the run may replace files of its output name
        self._diffusers_dir: Path | None = None

    # ---- settings shortcuts -----------------------------------------------------------------------
    @property
    def ema_enabled(self) -> bool:
        return bool(getattr(self.settings, "ema", False))

    def trains_text_encoder(self) -> bool:
        return bool(self.settings.train_text_encoder)

    @classmethod
    def estimate_parameters(cls, settings: Any, family: str, model_m: dict[str, float]) -> float:
        """The whole UNet (whatever `train_blocks` says: a rough upper bound), and the text encoder(s) when asked."""
        return (model_m["unet"] + (model_m["text"] if settings.train_text_encoder else 0.0)) * 1e6

    # ---- before the data scan (a loop hook) ----------------------------------------------------------
    def prepare_data(self, cfg: Any, host: Any, events: Any, stop: Any) -> Any:
        """Remember where outputs go (to refuse writing over the base model) and warn about LoRA-size rates."""
        self._out_dir = Path(cfg.output) if cfg.output else Path(host.output_dir(self.output_kind))
        self._out_name = cfg.name
        self._overwrite = bool(cfg.overwrite)
        self._diffusers_dir = Path(host.output_dir("runs")) / cfg.name / "diffusers"
        if cfg.model:
            self._refuse_base_output(Path(cfg.model))
        lr = max(cfg.unet_lr or cfg.learning_rate, (cfg.text_encoder_lr or cfg.learning_rate)
                 if self.trains_text_encoder() else 0.0)
        if lr > FULL_LR_HINT:
            events.warning(f"learning rate {lr:g} is a LoRA-size rate; training the model's own weights usually "
                           "takes 1e-6 to 5e-6 (more burns the model in a few hundred steps)")
        return cfg

    def _refuse_base_output(self, base: Path) -> None:
        """UserError when this run's outputs (final, epoch or step saves) would land on the base model file."""
        if self._out_dir is not None:
            refuse_base_output(self._out_dir, self._out_name, self.file_suffix, base)

    # ---- attach / detach -----------------------------------------------------------------------------
    def attach(self, parts: ModelParts, unet_lr: float | None = None,
               text_encoder_lr: float | None = None) -> list[dict[str, Any]]:
        """Back up, cast to float32 and unfreeze the trained weights; return the optimizer groups."""
        import torch

        if self._parts is not None:
            raise RuntimeError(f"{type(self).__name__}.attach called twice without detach")
        if getattr(parts, "info", None) is not None and parts.info.path:
            self._refuse_base_output(Path(parts.info.path))
        unet_names = select_unet_parameters(parts.unet, parts.module_naming, self.settings.train_blocks)
        if not unet_names:
            raise UserError(f"train_blocks {self.settings.train_blocks!r} selects no UNet weights of this model")
        roots = [_Root("unet", parts.unet, unet_names)]
        if self.trains_text_encoder():
            roots += [_Root(f"text_encoder{i}", enc, [n for n, _ in enc.named_parameters()])
                      for i, enc in enumerate(parts.text_encoders)]
        self._parts = parts
        try:
            for root in roots:
                self._roots.append(root)
                self._take_over(root, torch)
            if self.ema_enabled:
                where = "cpu" if getattr(self.settings, "ema_on_cpu", False) else None
                self._ema = {(r.key, n): p.detach().to(where or p.device, torch.float32, copy=True)
                             for r in self._roots for n, p in self._trained_params(r)}
                self._ema_updates = 0
        except BaseException:
            self.detach()
            raise
        return component_groups({c: [p for r in self._roots if r.key.startswith(c) for _, p in self._trained_params(r)]
                                 for c in ("unet", "text_encoder")}, unet_lr, text_encoder_lr)

    @staticmethod
    def _trained_params(root: _Root):
        params = dict(root.module.named_parameters())
        return [(n, params[n]) for n in root.trained]

    def _take_over(self, root: _Root, torch: Any) -> None:
        """Record flags, dtypes and CPU backups of `root`, then cast it to float32 and unfreeze its trained part."""
        module = root.module
        root.grads = {n: p.requires_grad for n, p in module.named_parameters()}
        root.modes = {n: m.training for n, m in module.named_modules()}
        trained = set(root.trained)
        for n, p in module.named_parameters():
            root.dtypes[n] = p.dtype
            if n in trained:
                root.backups[n] = p.detach().to("cpu", copy=True)
                root.devices[n] = p.device
        for n, b in module.named_buffers():
            root.dtypes["buffer:" + n] = b.dtype
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.requires_grad_(False)
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
            for n, b in list(module.named_buffers()):
                if b.is_floating_point() and b.dtype != torch.float32:
                    owner, _, leaf = n.rpartition(".")
                    (module.get_submodule(owner) if owner else module)._buffers[leaf] = b.float()
        for _, p in self._trained_params(root):
            p.requires_grad_(True)
        module.train()

    def detach(self) -> None:
        """Put every weight, dtype and flag back exactly; safe to call twice and after a failed attach."""
        import torch

        with torch.no_grad():
            for root in reversed(self._roots):
                module = root.module
                for n, p in module.named_parameters():
                    p.grad = None
                    if n in root.backups:
                        p.data = root.backups[n].to(root.devices[n])
                    elif n in root.dtypes and p.dtype != root.dtypes[n]:
                        p.data = p.data.to(root.dtypes[n])
                    if n in root.grads:
                        p.requires_grad_(root.grads[n])
                for n, b in list(module.named_buffers()):
                    want = root.dtypes.get("buffer:" + n)
                    if want is not None and b.dtype != want:
                        owner, _, leaf = n.rpartition(".")
                        (module.get_submodule(owner) if owner else module)._buffers[leaf] = b.to(want)
                for n, m in module.named_modules():
                    if n in root.modes:
                        m.training = root.modes[n]
        self._roots.clear()
        self._ema.clear()
        self._parts = None

    # ---- FSDP (a loop hook) ------------------------------------------------------------------------------
    def after_shard(self) -> None:
        """The trained weights are now sharded across the processes: the EMA keeps this process's part only."""
        from ..models.sharding import shard_like

        for root in self._roots:
            for n, p in self._trained_params(root):
                ema = self._ema.get((root.key, n))
                if ema is not None:
                    self._ema[(root.key, n)] = shard_like(ema, p.detach()).to(ema.device, ema.dtype, copy=True)

    # ---- after every optimizer step (a loop hook) ------------------------------------------------------
    def after_step(self, step: int) -> None:
        """Move the EMA towards the current weights (no-op without EMA)."""
        import torch

        from ..models.sharding import local_tensor

        if not self._ema:
            return
        decay = min(float(self.settings.ema_decay), (1 + self._ema_updates) / (10 + self._ema_updates))
        with torch.no_grad():
            for root in self._roots:
                for n, p in self._trained_params(root):
                    ema = self._ema[(root.key, n)]
                    ema.lerp_(local_tensor(p.detach()).to(ema.device, torch.float32), 1.0 - decay)
        self._ema_updates += 1

    def ema_weights(self) -> dict[str, torch.Tensor]:
        """The EMA weights keyed `<root>.<param name>` (empty without EMA); for tests and inspection (under FSDP:
        this process's part of each)."""
        return {f"{k}.{n}": v for (k, n), v in self._ema.items()}

    # ---- tensors ---------------------------------------------------------------------------------------
    def _require_attached(self) -> ModelParts:
        if self._parts is None:
            raise RuntimeError(f"{type(self).__name__}: attach() first")
        return self._parts

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model as it will be saved: A1111 LDM keys, CPU tensors in `save_precision`.

        With EMA on, the trained weights are the EMA weights. Non-float tensors (position ids) keep their dtype.
        Under FSDP every process must call this (the sharded weights are gathered, in the same order).
        """
        import torch

        from ..models.sharding import full_tensor, is_sharded, local_tensor

        parts = self._require_attached()
        dtype = {"fp16": torch.float16, "fp32": torch.float32}[self.settings.save_precision]
        swapped, copied = [], []
        try:
            if self._ema:   # put the EMA weights in place, so the host's layout mapping sees them
                for root in self._roots:
                    for n, p in self._trained_params(root):
                        if not is_sharded(p):
                            swapped.append((p, p.data))
                            p.data = self._ema[(root.key, n)]
                        else:      # sharded: this process's part of the weight holds the EMA for a moment
                            own = local_tensor(p.data)
                            copied.append((own, own.clone()))
                            own.copy_(self._ema[(root.key, n)].to(own.device))
            out = {}
            with torch.no_grad():
                for k, v in parts.checkpoint_state_dict().items():
                    v = full_tensor(v.detach())
                    out[k] = v.to("cpu", dtype if v.is_floating_point() else v.dtype, copy=True)
        finally:
            for p, data in swapped:
                p.data = data
            with torch.no_grad():
                for own, saved in copied:
                    own.copy_(saved)
        return out

    def metadata(self, extra: dict[str, Any] | None = None) -> dict[str, str]:
        """The checkpoint's metadata: the run's `ss_*` keys, what it was trained from, ModelSpec, architecture."""
        from ..formats.kohya import IMPL_DIFFUSERS, IMPL_SGM, MODELSPEC_ARCH, MODELSPEC_VERSION, as_metadata_value
        from ..models.detect import ARCH_KEY

        parts = self._require_attached()
        info = parts.info
        s = self.settings
        meta: dict[str, str] = {k: as_metadata_value(v) for k, v in (extra or {}).items() if v is not None}
        trained = {r.key: (s.train_blocks if r.key == "unet" else "all") for r in self._roots}
        meta.update({
            "lab.method": self.name,
            "lab.method_config": json.dumps({"version": s.VERSION, **s.to_dict()}),
            "lab.base_model": info.name,
            "lab.base_sha256": info.sha256,
            "lab.base_legacy_hash": info.legacy_hash,
            "lab.trained": json.dumps(trained),
            "lab.trained_parameters": str(sum(len(r.trained) for r in self._roots)),
            "lab.weights": "ema" if self._ema else "raw",
            "lab.version": __version__,
        })
        if self._ema:
            meta["lab.ema_decay"] = str(s.ema_decay)
            meta["lab.ema_updates"] = str(self._ema_updates)
        if "ss_steps" in meta:
            meta["lab.steps"] = meta["ss_steps"]
        family, prediction = parts.family, parts.prediction
        meta.setdefault("modelspec.sai_model_spec", MODELSPEC_VERSION)
        meta["modelspec.architecture"] = MODELSPEC_ARCH[(family, prediction)]
        meta["modelspec.implementation"] = IMPL_SGM if family == "sdxl" else IMPL_DIFFUSERS
        meta["modelspec.prediction_type"] = "v" if prediction == "v" else "epsilon"
        meta.setdefault("modelspec.title", meta.get("ss_output_name") or self._out_name or info.name)
        meta.setdefault("modelspec.date", datetime.datetime.now().replace(microsecond=0).isoformat())
        arch = self._architecture_json(parts)
        if arch:
            meta[ARCH_KEY] = arch
        return meta

    @staticmethod
    def _architecture_json(parts: Any) -> str:
        """The base's architecture facts (`lab.architecture`), so the output loads like the base did."""
        loaded = getattr(parts, "loaded", None)
        if loaded is not None and hasattr(loaded, "arch"):
            return loaded.arch.to_json()
        path = Path(parts.info.path) if parts.info.path else None
        if path is not None and path.suffix.lower() == ".safetensors" and path.is_file():
            from ..formats.safetensors_io import read_metadata
            from ..models.detect import ARCH_KEY

            return read_metadata(path).get(ARCH_KEY, "")
        return ""

    def save(self, path: Path, metadata: dict[str, str], *, run_info: dict[str, Any] | None = None) -> Path:
        """Write the single-file checkpoint atomically (never over the base model); maybe export diffusers."""
        from safetensors.torch import save_file

        from ..formats.files import atomic_write
        from ..formats.safetensors_io import prepare_tensors

        parts = self._require_attached()
        path = Path(path)
        base = Path(parts.info.path) if parts.info.path else None
        if base is not None and base.is_file() and path.exists() and os.path.samefile(base, path):
            raise UserError(f"refusing to write over the base model {base}")
        if base is not None and path.resolve() == base.resolve():
            raise UserError(f"refusing to write over the base model {base}")
        parts.info.fill_hashes()
        meta = self.metadata({**(run_info or {}), **(metadata or {})})
        tensors = prepare_tensors(self.state_dict())
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))
        self._copy_base_yaml(base, path)
        final = meta.get("ss_output_name") == path.stem
        if self.settings.export_diffusers and final and self._diffusers_dir is not None:
            from .diffusers_export import export_diffusers

            export_diffusers(tensors, meta, self._diffusers_dir, parts)
        return path

    def _copy_base_yaml(self, base: Path | None, path: Path) -> None:
        """A1111 reads `<checkpoint>.yaml` beside a file (SD2-v configs): the output gets the base's copy.

        A NAME.yaml / NAME.yml already there was either written by this run (an earlier save of the same name,
        a resumed run) or is someone else's. Without overwriting it is never touched: the name check refused a
        run whose name had one before it started, so only this run's own copies can be met here. With
        overwriting the user has given up the files of that name, and a stale yaml left beside the new weights
        would make A1111 load them with a config the base was not trained with (the worse outcome). So the
        yaml is made to match the base: replaced (atomically) when its bytes differ from the base's, left alone
        when they are the same, and removed when the base has none (A1111 then derives the config from the
        weights, as it did for the base)."""
        from ..formats.files import atomic_write_bytes

        if base is None:
            return
        src = next((base.with_suffix(x) for x in self.side_suffixes if base.with_suffix(x).is_file()), None)
        want = src.read_bytes() if src is not None else None
        for x in self.side_suffixes:
            dst = path.with_suffix(x)
            ours = src is not None and x == src.suffix
            if ours and not dst.exists():
                atomic_write_bytes(dst, want, overwrite=False)
            elif ours and self._overwrite and dst.is_file() and dst.read_bytes() != want:
                atomic_write_bytes(dst, want, overwrite=True)
            elif not ours and self._overwrite and dst.is_file():
                dst.unlink()   # a yaml the base does not have would be paired with the new weights

    # ---- resume ----------------------------------------------------------------------------------------
    def training_state(self) -> dict[str, torch.Tensor]:
        """The trained weights (float32) and, with EMA, the EMA weights and its update count; whole tensors also
        under FSDP (every process must call it then: the parts are gathered)."""
        import torch

        from ..models.sharding import full_tensor, gather_like

        self._require_attached()
        params = {(r.key, n): p.detach() for r in self._roots for n, p in self._trained_params(r)}
        out = {f"weights.{k}.{n}": full_tensor(p).to("cpu", copy=True) for (k, n), p in params.items()}
        if self._ema:
            out.update({f"ema.{k}.{n}": gather_like(v.detach(), params[(k, n)]).to("cpu", copy=True)
                        for (k, n), v in self._ema.items()})
            out["ema_updates"] = torch.tensor([self._ema_updates], dtype=torch.int64)
        return out

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        self._require_attached()
        own = [f"weights.{r.key}.{n}" for r in self._roots for n in r.trained]
        if self._ema:
            own += [f"ema.{k}.{n}" for k, n in self._ema] + ["ema_updates"]
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise UserError(f"the saved {self.name} state does not fit this run (were train_blocks, "
                            f"train_text_encoder or ema changed?): {len(missing)} missing, {len(unexpected)} "
                            f"unexpected (e.g. {(missing + unexpected)[:2]})")
        from ..models.sharding import local_tensor, shard_like

        with torch.no_grad():
            params = {(r.key, n): p for r in self._roots for n, p in self._trained_params(r)}
            for (k, n), p in params.items():   # sharded (FSDP): this process's part of the whole saved tensor
                local_tensor(p.data).copy_(shard_like(state[f"weights.{k}.{n}"], p.detach()))
            for (k, n), v in self._ema.items():
                v.copy_(shard_like(state[f"ema.{k}.{n}"], params[(k, n)].detach()).to(v.device, v.dtype))
        if self._ema:
            self._ema_updates = int(state["ema_updates"].item())
