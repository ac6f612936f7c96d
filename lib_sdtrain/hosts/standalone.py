"""The standalone host: loads a single-file checkpoint itself and lends it out as `ModelParts`.

Used by the CLI, the standalone app, the benchmarks and the tests. The networks are diffusers'
UNet2DConditionModel and AutoencoderKL and transformers' CLIP text models, built from the checkpoint's own
shapes (see `models.checkpoint`); tokenization and conditioning follow A1111 (see `models.conditioning`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import UserError
from ..models.checkpoint import LoadedCheckpoint, load_checkpoint
from . import ModelInfo, ModelParts, SampleRequest, SizeConditioning, TextConditioning
from . import OUTPUT_KINDS, default_model, standalone_output_root  # noqa: F401 - kept importable from here



def default_device() -> torch.device:
    """CUDA when there is one; under torchrun / accelerate each process takes the GPU of its local rank
    (`accelerate launch --cpu` keeps to the CPU)."""
    from ..launch import detect_launch

    launch = detect_launch()
    if not torch.cuda.is_available() or launch.cpu_only:
        return torch.device("cpu")
    return torch.device("cuda", launch.local_rank % torch.cuda.device_count())


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device `device` names ("cpu", "cuda", "cuda:1", "mps"; any case); None or "" = `default_device()`.

    A name torch does not know, or a device this computer lacks (no CUDA in this PyTorch, an index past the last
    GPU), is a UserError here, before any model is loaded: torch itself fails later with a traceback.
    """
    if device is None or (isinstance(device, str) and not device.strip()):
        return default_device()
    given = str(device).strip()
    try:
        dev = device if isinstance(device, torch.device) else torch.device(given.lower())
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {given!r}: give cpu, cuda or cuda:N (e.g. cuda:1)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {given}: this PyTorch sees no CUDA GPU (no driver, or a CPU-only build); "
                            "use cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UserError(f"device {given}: this computer has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        return dev
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not (callable(available) and available()):
        raise UserError(f"device {given}: this PyTorch has no {dev.type} device; use cpu or cuda")
    return dev


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """'fp32' | 'fp16' | 'bf16' | 'auto' (fp16 on CUDA, fp32 elsewhere) | None (keep the file's dtype)."""
    if name in (None, "keep"):
        return None
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise UserError(f"unknown dtype {name!r}; choose fp32, fp16, bf16 or auto")
    return table[name]


class StandaloneParts(ModelParts):
    """`ModelParts` over diffusers/transformers modules."""

    module_naming = "diffusers"

    def __init__(self, loaded: LoadedCheckpoint, info: ModelInfo, clip_skip: int = 1,
                 vocab_path: str | Path | None = None) -> None:
        from ..models.conditioning import PromptEncoder
        from ..models.tokenizer import make_tokenizers

        arch = loaded.arch
        self.loaded = loaded
        self.family, self.prediction = arch.family, arch.prediction
        self.unet, self.vae, self.text_encoders = loaded.unet, loaded.vae, loaded.text_encoders
        self.latent_scale = arch.latent_scale
        self.latent_channels = arch.unet["in_channels"]
        self.info = info
        self.clip_skip = clip_skip
        extra = loaded.extras.get("alphas_cumprod")
        from ..models.schedule import alphas_cumprod

        self.alphas_cumprod = extra.float() if extra is not None and extra.numel() == 1000 else alphas_cumprod()
        self.tokenizers = make_tokenizers(self.family, vocab_path)
        self.prompt_encoder = PromptEncoder(self.family, self.tokenizers, self.text_encoders, clip_skip=clip_skip)

    def encode_text(self, prompts: list[str]) -> TextConditioning:
        return self.prompt_encoder(prompts)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                sizes: list[SizeConditioning] | None = None) -> torch.Tensor:
        dtype = self.dtype
        kwargs: dict[str, Any] = {}
        if self.family == "sdxl":
            if cond.pooled is None:
                raise ValueError("SDXL conditioning needs the pooled text embedding")
            if sizes is None:
                h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
                sizes = [SizeConditioning((h, w))] * latents.shape[0]
            time_ids = torch.tensor([s.as_list() for s in sizes], device=latents.device, dtype=dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids}
        out = self.unet(latents.to(dtype), timesteps.to(latents.device),
                        encoder_hidden_states=cond.context.to(dtype), **kwargs).sample
        return out

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
                      mode: str = "sample") -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = dist.mean if mode == "mean" else dist.sample(generator)
        return latents * self.latent_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.latent_scale).sample

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in the backward pass (UNet and text encoders): less memory, ~30% slower."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        for enc in self.text_encoders:
            if enabled:
                # non-reentrant: with the reentrant variant, adapters inside a checkpointed layer get no
                # gradient when the layer's input (frozen token embeddings) does not require one
                try:
                    enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                except TypeError:
                    # transformers < 4.35 (A1111 pins 4.30.2) checkpoints reentrantly only: make the token
                    # embeddings' output require a gradient, so the adapters inside still get theirs
                    enc.gradient_checkpointing_enable()
                    if not getattr(enc, "_lab_input_grads", False):
                        enc.enable_input_require_grads()
                        enc._lab_input_grads = True
            else:
                enc.gradient_checkpointing_disable()
                if getattr(enc, "_lab_input_grads", False):     # only the hook this method added
                    enc.disable_input_require_grads()
                    enc._lab_input_grads = False

    def token_embeddings(self) -> list[torch.nn.Embedding]:
        return [enc.get_input_embeddings() for enc in self.text_encoders]

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        from ..models.checkpoint import ldm_state_dict

        # the base file's extras (schedule buffers, ...) travel along; its EMA copies describe the old weights
        extras = {k: v for k, v in self.loaded.extras.items() if not k.startswith("model_ema.")}
        return ldm_state_dict(self.loaded.arch, self.unet, self.vae, self.text_encoders, extras)


class StandaloneHost:
    """Loads models from files; writes outputs under `output_root/<kind>`."""

    name = "standalone"

    def __init__(self, *, device: str | torch.device | None = None, dtype: str | None = "auto",
                 output_root: str | Path | None = None, clip_skip: int = 1, prediction: str | None = None) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.output_root = standalone_output_root(output_root)
        self.clip_skip = clip_skip
        self.prediction = prediction

    def load(self, model: str | Path | None = None) -> StandaloneParts:
        if model is None:
            model = default_model()
        path = Path(model)
        loaded = load_checkpoint(path, dtype=self.dtype, device=self.device, prediction=self.prediction)
        info = ModelInfo(name=path.stem, path=str(path))
        vocab = path.parent / (path.stem + ".tokenizer")
        return StandaloneParts(loaded, info, clip_skip=self.clip_skip,
                               vocab_path=vocab if vocab.is_dir() else None)

    def native_resolution(self, model: str | Path | None = None) -> tuple[int, str]:
        """(native size in pixels, where it came from) of `model` (default: the toy model), from its header
        only; UserError when the file is missing or not a checkpoint."""
        from ..models.native import probe_model

        probe = probe_model(model or default_model())
        return probe.native, f"{probe.path.name}: {probe.source}"

    def model_file(self, model: str | Path | None = None) -> Path | None:
        """The file `model` names (default: the toy model)."""
        return Path(model).expanduser() if model else default_model()

    def prompt_template_dir(self) -> Path | None:
        """No folder of prompt template files standalone (the built-in templates and any file path work)."""
        return None

    def release(self, parts: ModelParts) -> None:
        """Nothing to restore: the standalone host owns its copy. Frees cached GPU memory."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def sample(self, parts: ModelParts, requests: list[SampleRequest], stop: Any = None) -> list:
        from ..sampling import render

        return render(parts, requests, stop=stop)

    def output_dir(self, kind: str) -> Path:
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"unknown output kind {kind!r}")
        return self.output_root / OUTPUT_KINDS[kind]

    def refresh(self, kind: str) -> None:
        return None

    @contextlib.contextmanager
    def job_context(self, job: Any) -> Iterator[None]:
        """Nothing to take or show: this host's model is its own copy (no shared lock), and its only progress
        display and stop control are the job's own `events` and `stop`, which the caller already holds."""
        yield
