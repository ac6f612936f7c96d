"""Speed and memory techniques, each one setting (group "speed" of TrainSettings), applied around a run.

`Speed(cfg, parts, method, events).apply()` changes the lent model for the run and `restore()` puts back
exactly what it changed (processors, memory layout, dtypes, devices, compiled call), whether the run finished,
failed or was stopped. None of them changes what is trained; each has a CPU test that the trained weights are
the same (within float tolerance) with and without it (tests/test_train_speed.py).

- attention: "sdpa" (torch's scaled_dot_product_attention; flash / memory-efficient kernels on CUDA) in the UNet,
  the VAE and, on CUDA, the text encoders; "xformers" (when installed); "math" (plain softmax(QKᵀ)V, the
  reference). Under the WebUI the WebUI's own attention optimisation (Settings → Optimizations) stays in charge.
- channels_last: the UNet's convolution weights and the latents in NHWC layout (faster convolutions with tensor
  cores; no effect on the values).
- torch_compile: `torch.compile` on the UNet after the adapters are in (the first steps of each bucket size are
  slow while it compiles). Needs torch >= 2.2 and, for the default inductor backend, a C compiler.
- text-encoder output cache (`cache_text_encoder_outputs`): when the text encoders are frozen, each caption is
  encoded once and reused; when captions are fixed (no shuffling, dropout or wildcards) and no control pictures
  are drawn, the standalone host moves the text encoders off the GPU for the run (SDXL: ≈ 1.6 GB in fp16).
  Captions with emphasis brackets, and batches whose captions differ in length (75-token chunks), are encoded
  as a batch, as without the cache, because A1111's emphasis and padding depend on the whole batch.
- vae_precision: "auto" runs the VAE in fp32 for SDXL when the model is half precision (SDXL's VAE overflows in
  fp16: NaN latents, black pictures); "fp32" always; "model" as loaded. Under the WebUI, A1111's own VAE
  precision (--no-half-vae) stays in charge, with a warning when it is half.
- VRAM overflow warning: before the run (the estimate of `train.estimate`) and after the first steps (the measured
  peak), a warning when the figure is above 90 % of the GPU's memory: on Windows the driver then spills to shared
  system memory, which runs 10–100× slower instead of failing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ..errors import UserError

VRAM_WARN_SHARE = 0.9


def vram_warning(need_gb: float, total_gb: float, what: str) -> str | None:
    """A warning text when `need_gb` (estimated or measured) is above 90 % of the GPU's `total_gb`, else None."""
    if total_gb <= 0 or need_gb < VRAM_WARN_SHARE * total_gb:
        return None
    return (f"{what} GPU memory {need_gb:.1f} GB is {100 * need_gb / total_gb:.0f}% of the GPU's {total_gb:.1f} GB: "
            "close to the limit. On Windows the driver then spills into shared system memory and training runs "
            "10-100x slower instead of failing (NVIDIA Control Panel → CUDA Sysmem Fallback Policy: 'Prefer No "
            "Sysmem Fallback' makes it fail fast instead). Lower the batch size or resolution, cache latents, "
            "turn on gradient checkpointing or choose an 8-bit optimizer.")


def cuda_memory(device: torch.device) -> tuple[float, float]:
    """(peak reserved GB so far, total GB) of a CUDA device."""
    gb = 1024 ** 3
    return (torch.cuda.max_memory_reserved(device) / gb,
            torch.cuda.get_device_properties(device).total_memory / gb)


def fixed_captions(cfg: Any) -> bool:
    """Whether every sample's caption is the same in every epoch (no shuffling, dropout or wildcards)."""
    return not (cfg.shuffle_tags or cfg.caption_dropout or cfg.tag_dropout or cfg.caption_wildcards
                or cfg.caption_dropout_every_n_epochs)


def _cacheable(caption: str) -> bool:
    # emphasis "(word:1.2)" / "[word]" rescales by the mean over the whole batch: such captions are encoded in
    # their batch, as without the cache
    return not any(c in caption for c in "()[]")


class TextCache:
    """Per-caption text conditioning of frozen text encoders (see the module docstring)."""

    def __init__(self, encode: Callable[[list[str]], Any]) -> None:
        self.encode = encode
        self.entries: dict[str, Any] = {}
        self.hits = self.misses = 0
        self.on_miss: Callable[[], None] | None = None   # called before encoding anything (brings encoders back)

    def _one(self, caption: str):
        cond = self.entries.get(caption)
        if cond is None:
            if self.on_miss:
                self.on_miss()
            with torch.no_grad():
                cond = self.encode([caption])
            cond.context = cond.context.detach()
            if cond.pooled is not None:
                cond.pooled = cond.pooled.detach()
            self.entries[caption] = cond
            self.misses += 1
        else:
            self.hits += 1
        return cond

    def __call__(self, captions: list[str]):
        from ..hosts import TextConditioning

        if not all(_cacheable(c) for c in captions):
            if self.on_miss:
                self.on_miss()
            with torch.no_grad():
                return self.encode(captions)
        conds = [self._one(c) for c in captions]
        if len({c.context.shape for c in conds}) != 1:
            if self.on_miss:
                self.on_miss()
            with torch.no_grad():
                return self.encode(captions)   # different chunk counts: A1111 pads within the batch
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        return TextConditioning(context=torch.cat([c.context for c in conds]), pooled=pooled)


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


class Speed:
    """Applies the speed settings of `cfg` to `parts` for one run and restores them afterwards."""

    def __init__(self, cfg: Any, parts: Any, method: Any, events: Any) -> None:
        self.cfg, self.parts, self.method, self.events = cfg, parts, method, events
        self._undo: list[Callable[[], None]] = []
        self.text_cache: TextCache | None = None
        self.channels_last = False
        self._offloaded: list[tuple[torch.nn.Module, torch.device]] = []
        self._warned_peak = False

    # ---- apply / restore --------------------------------------------------------------------------------
    def apply(self) -> Speed:
        try:
            self._attention()
            self._vae_precision()
            if self.cfg.channels_last:
                self._channels_last()
            if self.cfg.torch_compile:
                self._compile()
            self._text_cache()
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        self._bring_text_encoders_back()
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as e:  # noqa: BLE001 - restore everything else, then report
                self.events.warning(f"could not undo a speed setting: {e}")
        self.text_cache = None

    @property
    def diffusers(self) -> bool:
        return getattr(self.parts, "module_naming", "diffusers") == "diffusers"

    def _attention(self) -> None:
        choice = self.cfg.attention
        if not self.diffusers:
            if choice != "sdpa":
                self.events.warning(f"attention {choice!r}: under the WebUI its own attention optimisation "
                                    "(Settings → Optimizations) is used")
            return
        nets = [m for m in (self.parts.unet, self.parts.vae) if hasattr(m, "set_attn_processor")]
        if choice == "xformers":
            try:
                import xformers
                import xformers.ops  # noqa: F401
            except ImportError:
                raise UserError("attention 'xformers' needs the xformers package (pip install xformers, matching "
                                "your torch); 'sdpa' is as fast on torch >= 2.0") from None
            if self.parts.device.type != "cuda":
                raise UserError("attention 'xformers' runs only on CUDA GPUs; choose 'sdpa'")
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        for net in nets:
            before = dict(net.attn_processors)
            if choice == "xformers":
                net.enable_xformers_memory_efficient_attention()
            else:
                net.set_attn_processor(AttnProcessor2_0() if choice == "sdpa" else AttnProcessor())
            self._undo.append(lambda net=net, before=before: net.set_attn_processor(before))
        # text encoders: transformers picks the implementation from the config at each call. The standalone
        # host builds them "eager" because torch's CPU SDPA returns NaN for some batch sizes with CLIP's causal
        # mask; on CUDA the SDPA kernels are exact and faster.
        want = "sdpa" if choice in ("sdpa", "xformers") and self.parts.device.type == "cuda" else "eager"
        for enc in self.parts.text_encoders:
            config = getattr(enc, "config", None)
            if config is None or not hasattr(config, "_attn_implementation"):
                continue
            old = config._attn_implementation
            if old != want:
                config._attn_implementation = want
                self._undo.append(lambda c=config, old=old: setattr(c, "_attn_implementation", old))

    def _vae_precision(self) -> None:
        choice = self.cfg.vae_precision
        vae = self.parts.vae
        try:
            dtype = next(vae.parameters()).dtype
        except StopIteration:
            return
        fp32 = choice == "fp32" or (choice == "auto" and self.parts.family == "sdxl")
        if fp32 and _half(dtype) and not self.diffusers:
            # A1111 casts inputs to its own VAE dtype when it samples (control pictures): its --no-half-vae /
            # "revert VAE to 32-bit" settings decide there
            self.events.warning("the WebUI's VAE is half precision: start the WebUI with --no-half-vae for SDXL "
                                "(its fp16 VAE can give NaN latents)")
            return
        if fp32 and _half(dtype):
            vae.to(torch.float32)   # half → float32 → half is exact, so restoring gives the same weights
            self._undo.append(lambda: vae.to(dtype))

    def _channels_last(self) -> None:
        unet = self.parts.unet
        unet.to(memory_format=torch.channels_last)
        self.channels_last = True
        self._undo.append(lambda: unet.to(memory_format=torch.contiguous_format))

    def _compile(self) -> None:
        unet = self.parts.unet
        if not hasattr(unet, "compile") or not hasattr(torch, "compile"):
            raise UserError(f"torch_compile needs torch >= 2.2 (this is {torch.__version__})")
        backend = self.cfg.compile_backend
        if backend == "inductor" and self.parts.device.type == "cpu":
            import shutil

            if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
                raise UserError("torch_compile with the inductor backend needs a C compiler (cc) on the CPU; "
                                "install one or turn torch_compile off")
        if backend == "inductor" and self.parts.device.type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:
                raise UserError("torch_compile with the inductor backend needs triton on CUDA "
                                "(on Windows: pip install triton-windows), or turn torch_compile off") from None
        unet.compile(backend=backend)
        self.events.status(f"torch.compile ({backend}): the first steps of each bucket size compile and are slow")

        def undo() -> None:
            unet._compiled_call_impl = None
            import torch._dynamo

            torch._dynamo.reset()

        self._undo.append(undo)

    def _text_cache(self) -> None:
        choice = self.cfg.cache_text_encoder_outputs
        wanted = choice == "on" or (choice == "auto" and self.parts.family == "sdxl")
        if not wanted:
            return
        if self.method.trains_text_encoder():
            if choice == "on":
                self.events.warning("cache_text_encoder_outputs is off: this run trains the text encoder")
            return
        self.text_cache = TextCache(self.parts.encode_text)
        self.text_cache.on_miss = self._bring_text_encoders_back

    # ---- text encoders off the GPU when every caption is cached -------------------------------------------
    def precompute_text(self, captions: list[str], amp_dtype: torch.dtype | None, offload: bool) -> int:
        """Encode every distinct caption now (in the run's autocast); then, with `offload`, move the text
        encoders to the CPU until the run ends or an unseen caption comes. Returns the number encoded."""
        if self.text_cache is None:
            return 0
        device = self.parts.device
        done = 0
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for caption in dict.fromkeys(captions):
                if _cacheable(caption) and caption not in self.text_cache.entries:
                    self.text_cache._one(caption)
                    done += 1
        if offload and self.diffusers and device.type != "cpu" and all(map(_cacheable, captions)):
            for enc in self.parts.text_encoders:
                try:
                    where = next(enc.parameters()).device
                except StopIteration:
                    continue
                enc.to("cpu")
                self._offloaded.append((enc, where))
            if self._offloaded and device.type == "cuda":
                torch.cuda.empty_cache()
        return done

    def _bring_text_encoders_back(self) -> None:
        while self._offloaded:
            enc, where = self._offloaded.pop()
            enc.to(where)

    # ---- per step -----------------------------------------------------------------------------------------
    def encode_text(self, captions: list[str]):
        if self.text_cache is not None:
            return self.text_cache(captions)
        return self.parts.encode_text(captions)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def check_estimate(self, measure: Callable[[torch.device], tuple[float, float]] | None = None) -> str | None:
        """The warning before the run, from `train.estimate.estimate_vram` of these settings (CUDA only)."""
        if measure is None and self.parts.device.type != "cuda":
            return None
        from .estimate import estimate_vram

        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.parts.dtype, "fp32")
        family = self.parts.family if self.parts.family in ("sd1", "sd2", "sdxl") else "sd1"
        return self.check_memory(estimate_gb=estimate_vram(self.cfg, family, name).total_gb, measure=measure)

    def check_memory(self, estimate_gb: float | None = None,
                     measure: Callable[[torch.device], tuple[float, float]] | None = None) -> str | None:
        """The VRAM overflow warning: from the estimate (before the run) or the measured peak (after steps).

        Only on CUDA unless `measure` is given (tests). Warns at most once per kind; returns the text.
        """
        device = self.parts.device
        if measure is None:
            if device.type != "cuda":
                return None
            measure = cuda_memory
        peak, total = measure(device)
        if estimate_gb is not None:
            text = vram_warning(estimate_gb, total, "estimated")
        else:
            if self._warned_peak:
                return None
            text = vram_warning(peak, total, "measured peak")
            self._warned_peak = text is not None
        if text:
            self.events.warning(text)
        return text


@contextlib.contextmanager
def applied(cfg: Any, parts: Any, method: Any, events: Any):
    """`with applied(...) as speed:` apply for the block, restore after it."""
    speed = Speed(cfg, parts, method, events).apply()
    try:
        yield speed
    finally:
        speed.restore()
