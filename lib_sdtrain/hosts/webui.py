"""The A1111 host: trains A1111 v1.10's live model in place and gives it back exactly as it was.

The only module of the package that imports A1111's `modules` (style.md §3); only `scripts/` imports it.
What it does (a1111-host.md §2, §3, §5, §7, §8 and the pitfall checklist):

- `load()` lends `shared.sd_model` itself (no copy: memory is not doubled) as `WebUIParts`, the LDM/SGM
  modules with their own names (module_naming "ldm"). It refuses, with the reason and what to do, when training
  there cannot work: no model loaded, --lowvram/--medvram (modules hop between CPU and GPU), fp8 weight storage,
  an active UNet replacement (sd_unet) or a UNet that is not the LDM/SGM `UNetModel`, SD3, inpainting UNets.
- Before training it records every parameter's `requires_grad`, every module's train/eval flag and the UNet's
  block checkpoint flags, freezes the whole model, turns the LDM/SGM reentrant checkpoint flags off (their
  backward asks for gradients of frozen weights), undoes the attention optimisation as A1111's own trainers do
  (unless `training_xattention_optimizations`), and removes the builtin Lora's merges (restores the weights
  from its backups and drops the backups, so a stale backup can never overwrite anything later).
- Text goes through A1111's hijacked wrappers. `parts.tokenizers` are `HostTokenizer`s: our ClipTokenizer interface
  (ids without start/end, start/end/pad ids) over each wrapper's own `tokenize` (transformers' CLIPTokenizer for
  SD1/SDXL-L, open_clip's SimpleTokenizer for SD2/SDXL-G), so ids are A1111's by construction.
- Textual inversion (`add_embedding` / `remove_embedding`, the PromptEncoder hook the embedding method uses)
  registers an A1111 `Embedding` whose `vec` is the trained tensor ({clip_l, clip_g} for SDXL) in
  `sd_hijack.model_hijack.embedding_db`, as A1111's own trainer does, so its prompt chunking and
  `EmbeddingsWithFixes` splice the vectors into training batches and control pictures. A user's embedding of the
  same name is shadowed meanwhile and restored exactly; a reload of the DB during the run (A1111's Refresh)
  is followed by registering the word again at the next encode.
- Hypernetworks the user generated with last (`shared.loaded_hypernetworks`, applied inside every A1111 attention
  forward) and the modules A1111's plain attention forward leaves on layers (`hyper_k` / `hyper_v`) are taken
  out for the run, so no method trains on top of them, and put back by `release()`; a control picture's own
  `<hypernet:...>` tag works for that picture only (so does a `<lora:...>` tag: its merge is undone after it).
- `release()` restores all of that, re-applies the attention optimisation, clears the class-level conditioning
  caches of `processing` (their key ignores weights), and, when `load(model)` switched checkpoints, switches
  back. It runs after finished, failed and interrupted runs alike (train() calls it in `finally`).
- GPU work happens under `call_queue.queue_lock`; `job_context(job)` (the Host protocol's; JobManager's
  `around_job` for training, `run_compare` for comparisons, the Dataset tab's class pictures) takes it for a
  whole job (while another job holds it, the job's status reads "waiting for A1111's queue (another job is
  running)" and A1111's progress API lists its task as queued), calls `shared.state.begin/end` (job "training-lab" / "training-lab-compare" /
  "training-lab-class-pictures"; begin() also clears an Interrupt left from an earlier job), mirrors progress
  into `shared.state` (job_no/job_count/textinfo, so A1111's progress API shows the job; put back, and the
  console's total progress bar closed, when the job ends, also after an error) and turns
  `shared.state.interrupted` (the Interrupt buttons, POST /sdapi/v1/interrupt) into the job's StopToken.
- `sample()` renders with A1111's own `StableDiffusionProcessingTxt2Img` + `process_images` (eval mode,
  adapters active, checkpoint pinned so a changed dropdown cannot swap the model mid-run); our sampler names
  go to A1111's ("euler" → "Euler", "ddim" → "DDIM"). Given a stop token, it leaves out a picture that
  A1111's Interrupt cut short and requests the stop, and a picture its Skip cut short (None in its place;
  the next picture is drawn). A Skip or Interrupt after a picture's last sampling step (during its decode)
  cut nothing short: that picture is kept (the steps are counted on A1111's console progress bar); after an
  Interrupt it is the last one.
- A job's own stop (its StopToken: the tab's Stop button) also ends its wait for the queue lock: it never
  starts (`StoppedBeforeStart`), `shared.state` is not touched, and the lock, once it comes, is passed on.
  A1111's Interrupt does not end the wait: pressed meanwhile, it is meant for the generation that runs (and
  `state.begin()` of this job would clear it anyway).
- `output_dir()` is A1111's folder of each kind; `refresh()` rescans A1111's lists so new files show up.
- `kept(key, make)` holds what must outlive Settings → Reload UI: A1111 then executes scripts/ again (a new
  module object for scripts/training_lab.py, its callbacks registered anew, a new gradio app) but keeps
  `lib_sdtrain.*` in sys.modules, so the one host and the one job manager are kept here, not in the script:
  a job running through the reload goes on, and the reloaded tab and API show it and can stop it.
  A1111's Reload UI button also interrupts what runs (State.request_restart); `reload_keeps_training()` makes
  it skip that interrupt while a Training Lab training run holds A1111's state (its Interrupt button, the
  Monitor's Stop and the API still stop the run).
- The WebUI's exits (Extensions → "Apply and restart UI", the API's restart and kill: os._exit; the API's
  server-stop: a plain exit, atexit) first stop a running training job after its step, which saves a resumable
  state (`exit_keeps_training_state`). Ctrl-C is left as A1111 makes it: an immediate os._exit from its SIGINT
  handler, by design ("exit at ctrl+c without waiting for anything").
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from modules import call_queue, devices, paths, sd_hijack, sd_models, shared

from ..errors import UserError
from ..models.prompt import strip_extra_networks
from . import ModelInfo, ModelParts, SampleRequest, SizeConditioning, TextConditioning

OPTION_OUTPUTS = "training_lab_outputs_dir"        # Settings → Training Lab: folder of runs, pictures
OPTION_KEEP_OPTIMIZATION = "training_xattention_optimizations"   # A1111's own training option
JOB_NAME = "training-lab"                           # shared.state.job of a training run
ZERO_TERMINAL_SNR = "Zero Terminal SNR"             # A1111's sd_noise_schedule value (1.8+) for that schedule
JOB_NAMES = {"train": JOB_NAME, "compare": "training-lab-compare",   # ... and of each kind of HostJob
             "classgen": "training-lab-class-pictures"}
WAITING_TEXT = "waiting for A1111's queue (another job is running)"   # a job's status until it has the lock
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def _unwrap(module: Any) -> Any:
    """The module inside one of A1111's hijack wrappers (`.wrapped`), or the module itself."""
    return getattr(module, "wrapped", module)


def task_id(job_id: str) -> str:
    """The A1111 progress-API task id of a Training Lab job (for `requestProgress` / /internal/progress)."""
    return f"task(training-lab-{job_id})"


def job_name(job: Any) -> str:
    """`shared.state.job` while `job` runs: "training-lab" for a training run, "training-lab-compare" ..."""
    kind = str(getattr(job, "kind", "train") or "train")
    return JOB_NAMES.get(kind, f"{JOB_NAME}-{kind}")


class HostTokenizer:
    """Our ClipTokenizer interface (models/tokenizer.py) over one of A1111's hijacked text wrappers.

    `encode` is the wrapper's own `tokenize` (ids without start/end tokens, exactly what A1111's prompt chunking
    sees: transformers' CLIPTokenizer for SD1 and SDXL's CLIP-L, open_clip's SimpleTokenizer for SD2 and SDXL's
    bigG), and the special ids are the wrapper's `id_start` / `id_end` / `id_pad`.
    """

    def __init__(self, wrapper: Any) -> None:
        self._wrapper = wrapper

    def _need(self, attr: str) -> Any:
        value = getattr(self._wrapper, attr, None)
        if value is None:
            raise UserError(f"the WebUI's text encoder wrapper ({type(self._wrapper).__name__}) has no {attr}; "
                            "this WebUI version is not supported for training the text side")
        return value

    @property
    def start_id(self) -> int:
        return int(self._need("id_start"))

    @property
    def end_id(self) -> int:
        return int(self._need("id_end"))

    @property
    def pad_id(self) -> int:
        return int(self._need("id_pad"))

    @property
    def comma_id(self) -> int | None:
        value = getattr(self._wrapper, "comma_token", None)
        return None if value is None else int(value)

    @property
    def flavor(self) -> str:
        return "hf" if getattr(self._wrapper, "tokenizer", None) is not None else "open_clip"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise UserError(f"a prompt must be text, not {type(text).__name__}")
        return [int(i) for i in self._need("tokenize")([text])[0]]

    def _backend(self) -> Any:
        # SD1/SDXL-L: the wrapper's transformers tokenizer; OpenCLIP wrappers use their module's `tokenizer`
        tok = getattr(self._wrapper, "tokenizer", None)
        return tok if tok is not None else getattr(sys.modules.get(type(self._wrapper).__module__), "tokenizer", None)

    def token_id(self, token: str) -> int | None:
        """Id of a vocabulary entry such as ",</w>" (None if absent)."""
        tok = self._backend()
        vocab = getattr(tok, "encoder", None)
        if not isinstance(vocab, dict):
            vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        value = vocab.get(token)
        return None if value is None else int(value)

    def decode(self, ids: list[int]) -> str:
        tok = self._backend()
        return str(tok.decode([int(i) for i in ids])).strip() if hasattr(tok, "decode") else ""


class _TrainingEmbedding:
    """One training word in A1111's embedding DB and what registering it replaced, to put back exactly."""

    def __init__(self, name: str, embedding: Any) -> None:
        self.name, self.embedding = name, embedding
        self.db: Any = None
        self.first_id: int = -1
        self.had_name = False
        self.previous: Any = None
        self.saved_list: list | None = None         # the ids_lookup list object of first_id (None: no such key)
        self.saved_entries: list = []

    def remember(self, db: Any, first_id: int) -> None:
        self.db, self.first_id = db, first_id
        self.had_name = self.name in db.word_embeddings
        self.previous = db.word_embeddings.get(self.name)
        self.saved_list = db.ids_lookup.get(first_id)
        self.saved_entries = list(self.saved_list) if self.saved_list is not None else []

    def registered(self) -> bool:
        db = self.db
        return db is sd_hijack.model_hijack.embedding_db and db.word_embeddings.get(self.name) is self.embedding \
            and any(e is self.embedding for _, e in db.ids_lookup.get(self.first_id, ()))

    def restore(self) -> None:
        """Take this word out. When nothing else changed the DB meanwhile, its dict entry and the ids_lookup list
        (same object, same order) are exactly as before; after a reload of the DB, only its own traces go."""
        db, mine = self.db, self.embedding
        if db is None:
            return
        owned = db.word_embeddings.get(self.name) is mine
        if owned:
            if self.had_name:
                db.word_embeddings[self.name] = self.previous       # same key: the dict order is kept
            else:
                del db.word_embeddings[self.name]
        current = db.ids_lookup.get(self.first_id)
        if current is None or not any(e is mine for _, e in current):
            return
        rest = [x for x in current if x[1] is not mine]
        # registering dropped the entries of the same name from this list, and added ours
        expected = [x for x in self.saved_entries if getattr(x[1], "name", None) != self.name]
        if owned and len(rest) == len(expected) and all(a[1] is b[1] and list(a[0]) == list(b[0])
                                                        for a, b in zip(rest, expected)):
            if self.saved_list is None:
                del db.ids_lookup[self.first_id]
            else:
                self.saved_list[:] = self.saved_entries
                db.ids_lookup[self.first_id] = self.saved_list
            return
        back = [x for x in self.saved_entries if self.previous is not None and x[1] is self.previous
                and db.word_embeddings.get(self.name) is self.previous]
        merged = sorted(rest + back, key=lambda x: len(x[0]), reverse=True)
        if merged:
            db.ids_lookup[self.first_id] = merged
        else:
            del db.ids_lookup[self.first_id]


class WebUIParts(ModelParts):
    """`ModelParts` over A1111's live LDM (SD1/SD2) or SGM (SDXL) model; text through A1111's hijack."""

    module_naming = "ldm"

    def __init__(self, sd_model: Any, family: str, info: ModelInfo) -> None:
        self.sd_model = sd_model
        self.family = family
        self.prediction = "v" if getattr(sd_model, "parameterization", "eps") == "v" else "eps"
        self.unet = sd_model.model.diffusion_model
        self.vae = sd_model.first_stage_model
        if family == "sdxl":
            self.text_wrappers = [e for e in sd_model.conditioner.embedders if getattr(e, "input_key", "") == "txt"]
            self.size_embedders = {e.input_key: e for e in sd_model.conditioner.embedders
                                   if getattr(e, "input_key", "") in _SIZE_KEYS}
            if "aesthetic_score" in {getattr(e, "input_key", "") for e in sd_model.conditioner.embedders}:
                raise UserError("this is an SDXL refiner (aesthetic-score conditioning): train the base model")
        else:
            self.text_wrappers = [sd_model.cond_stage_model]
            self.size_embedders = {}
        self.text_encoders = [self._inner_text_model(w) for w in self.text_wrappers]
        self.tokenizers = [HostTokenizer(w) for w in self.text_wrappers]
        self._ti: dict[str, _TrainingEmbedding] = {}        # textual-inversion words registered while training
        ac = getattr(sd_model, "alphas_cumprod_original", None)
        if ac is None:
            ac = sd_model.alphas_cumprod
        self.alphas_cumprod = ac.detach().float().cpu()
        self.latent_scale = float(sd_model.scale_factor)
        self.latent_channels = int(getattr(sd_model, "latent_channels", 4))
        self.info = info
        self.clip_skip = int(shared.opts.data.get("CLIP_stop_at_last_layers", 1) or 1) if family == "sd1" else 1

    @staticmethod
    def _inner_text_model(wrapper: Any) -> torch.nn.Module:
        inner = _unwrap(wrapper)
        model = getattr(inner, "transformer", None)                 # HF CLIP (SD1, SDXL's CLIP-L)
        return model if model is not None else inner.model          # OpenCLIP (SD2, SDXL's bigG)

    # ---- text --------------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> TextConditioning:
        """A1111's own conditioning (hijacked encoders: chunks, emphasis, CLIP skip, embeddings).

        SDXL's embedders are called directly rather than through `GeneralConditioner`, which runs frozen
        embedders under no_grad (a1111-host.md §3): gradients then reach text-encoder adapters.
        """
        texts = [strip_extra_networks(p)[0] for p in prompts]
        self.ensure_embeddings()
        if self.family != "sdxl":
            return TextConditioning(context=self.text_wrappers[0](texts))
        contexts, pooled = [], None
        for wrapper in self.text_wrappers:
            out = wrapper(texts)
            if isinstance(out, tuple):
                out, pooled = out[0], out[1]
            contexts.append(out)
        if pooled is None:
            raise UserError("SDXL model without a pooled text output (unexpected conditioner layout)")
        return TextConditioning(context=torch.cat(contexts, dim=2), pooled=pooled)

    def token_embeddings(self) -> list[torch.nn.Embedding]:
        out = []
        for enc in self.text_encoders:
            emb = getattr(getattr(getattr(enc, "text_model", None), "embeddings", None), "token_embedding", None)
            emb = emb if emb is not None else enc.token_embedding
            out.append(_unwrap(emb))
        return out

    # ---- textual inversion (PromptEncoder's add_embedding / remove_embedding, through A1111's own DB) -------
    def add_embedding(self, name: str, vectors: list[torch.Tensor]) -> None:
        """Make `name` in prompts stand for `vectors` (one [n, D_i] tensor per text encoder, used as given, so
        a Parameter gets gradients), the way A1111's own textual-inversion training does it.

        An `Embedding` whose `vec` IS the tensor (SDXL: {clip_l, clip_g} by each encoder's
        `EmbeddingsWithFixes.textual_inversion_key`) is registered in `sd_hijack.model_hijack.embedding_db`, so
        A1111's prompt chunking reserves its placeholder ids and `EmbeddingsWithFixes` splices the tensor in,
        in training batches and in control pictures alike. An embedding of the same name the user has loaded is
        shadowed while training and put back by `remove_embedding` (the DB's entries restored exactly).
        """
        from modules.textual_inversion.textual_inversion import Embedding

        if not isinstance(name, str) or not name.strip():
            raise UserError("an embedding needs a non-empty name")
        vectors = list(vectors)
        fixes = self._embedding_fixes()
        if len(vectors) != len(fixes):
            raise UserError(f"embedding {name!r}: this model needs {len(fixes)} vector tensor(s), got {len(vectors)}")
        counts = {int(v.shape[0]) if v.ndim == 2 else -1 for v in vectors}
        if len(counts) != 1 or not 1 <= next(iter(counts)) <= 75:
            raise UserError(f"embedding {name!r}: vectors must be [n, dim] with the same n (1..75) for every "
                            f"encoder, got shapes {[tuple(v.shape) for v in vectors]}")
        widths = [int(_unwrap(f).weight.shape[1]) for f in fixes]
        if [int(v.shape[1]) for v in vectors] != widths:
            raise UserError(f"embedding {name!r}: widths {[int(v.shape[1]) for v in vectors]} do not fit this "
                            f"model's text encoders {widths}")
        if len(vectors) == 1:
            vec: Any = vectors[0]
        else:
            keys = [str(getattr(f, "textual_inversion_key", "")) for f in fixes]
            if len(set(keys)) != len(keys) or not all(keys):
                raise UserError(f"the text encoders' textual-inversion keys {keys} are not distinct")
            vec = dict(zip(keys, vectors))
        self.remove_embedding(name)
        embedding = Embedding(vec, name, step=0)
        embedding.vectors, embedding.shape = next(iter(counts)), sum(widths)
        embedding.sd_checkpoint = self.info.shorthash or None
        embedding.sd_checkpoint_name = self.info.name or None
        # A1111's Textual Inversion cards read the file name (None breaks the page while this word is listed)
        previous = getattr(sd_hijack.model_hijack.embedding_db, "word_embeddings", {}).get(name)
        embedding.filename = getattr(previous, "filename", None) or \
            os.path.join(str(getattr(shared.cmd_opts, "embeddings_dir", None) or ""), name)
        record = _TrainingEmbedding(name, embedding)
        self._register(record)
        self._ti[name] = record

    def remove_embedding(self, name: str) -> None:
        """Take a word of `add_embedding` out of A1111's embedding DB, putting back what it shadowed."""
        record = self._ti.pop(name, None)
        if record is not None:
            self._unregister(record)

    def remove_all_embeddings(self) -> None:
        for name in list(self._ti):
            self.remove_embedding(name)

    def ensure_embeddings(self) -> None:
        """Register the training words again if A1111 reloaded its embedding DB meanwhile (its Refresh button
        clears and re-reads the folders), which would otherwise silently stop the vectors from training."""
        for record in self._ti.values():
            if not record.registered():
                self._unregister(record)
                self._register(record)

    def _embedding_fixes(self) -> list[Any]:
        """A1111's `EmbeddingsWithFixes` of each text encoder (the splice of textual-inversion vectors)."""
        out = []
        for enc in self.text_encoders:
            emb = getattr(getattr(getattr(enc, "text_model", None), "embeddings", None), "token_embedding", None)
            emb = emb if emb is not None else getattr(enc, "token_embedding", None)
            if emb is None or not hasattr(emb, "wrapped") or not hasattr(emb, "embeddings"):
                raise UserError("the WebUI's textual-inversion hook (sd_hijack.EmbeddingsWithFixes) is missing on "
                                "the text encoder; reload the checkpoint (or remove extensions that replace it)")
            out.append(emb)
        return out

    def _register(self, record: _TrainingEmbedding) -> None:
        db = sd_hijack.model_hijack.embedding_db
        cond_model = getattr(self.sd_model, "cond_stage_model", None)
        tokenize = getattr(cond_model, "tokenize", None)
        ids = list(tokenize([record.name])[0]) if callable(tokenize) else self.tokenizers[0].encode(record.name)
        if not ids:
            raise UserError(f"embedding name {record.name!r} has no tokens")
        record.remember(db, ids[0])
        register = getattr(db, "register_embedding_by_name", None)
        if callable(register):
            register(record.embedding, self.sd_model, record.name)
        else:
            db.register_embedding(record.embedding, self.sd_model)

    @staticmethod
    def _unregister(record: _TrainingEmbedding) -> None:
        record.restore()

    # ---- UNet --------------------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning,
                sizes: list[SizeConditioning] | None = None) -> torch.Tensor:
        if self.family != "sdxl":
            return self.sd_model.apply_model(latents, timesteps, {"c_crossattn": [cond.context]})
        if cond.pooled is None:
            raise ValueError("SDXL conditioning needs the pooled text embedding")
        if sizes is None:
            h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
            sizes = [SizeConditioning((h, w))] * latents.shape[0]
        values = {
            "original_size_as_tuple": [list(s.original_size) for s in sizes],
            "crop_coords_top_left": [list(s.crop_top_left) for s in sizes],
            "target_size_as_tuple": [list(s.target_size or s.original_size) for s in sizes],
        }
        vector = [cond.pooled]
        for key, embedder in self.size_embedders.items():
            vector.append(embedder(torch.tensor(values[key], dtype=torch.float32, device=latents.device)))
        vec = torch.cat([v.to(latents.device, cond.context.dtype) for v in vector], dim=1)   # [B, adm]
        return self.sd_model.apply_model(latents, timesteps, {"crossattn": cond.context, "vector": vec})

    # ---- VAE ---------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
                      mode: str = "sample") -> torch.Tensor:
        """The VAE posterior computed from A1111's encoder (same maths as LDM's DiagonalGaussianDistribution),
        sampled with `generator` so the loop's randomness stays reproducible; times the model's scale factor."""
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        moments = vae.quant_conv(vae.encoder(pixels.to(dtype)))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        if mode == "mean":
            z = mean
        else:
            std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device="cpu")
            z = mean + std * noise.to(mean.device, mean.dtype)
        return z * self.latent_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.sd_model.decode_first_stage(latents)

    # ---- whole model -----------------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The live model under A1111's single-file keys (views of the weights; copy what you keep).

        A1111's hijack adds `.wrapped.` segments (text-encoder wrappers, token-embedding fixes) and, for SDXL,
        a `cond_stage_model` alias of `conditioner`; without them the key set is a stock checkpoint's
        (golden README: "Stock state dict"). Call it with no adapters attached (peft layers add keys).
        """
        out: dict[str, torch.Tensor] = {}
        for key, value in self.sd_model.state_dict().items():
            if self.family == "sdxl" and key.startswith("cond_stage_model."):
                continue            # the hijack's alias of `conditioner`: same tensors, second name
            if ".hyper_k." in key or ".hyper_v." in key:
                continue            # a loaded hypernetwork's modules, recorded on the layer by A1111's attention
            while ".wrapped." in key:
                key = key.replace(".wrapped.", ".", 1)
            out.setdefault(key, value)
        return out

    # ---- memory --------------------------------------------------------------------------------------
    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Non-reentrant torch checkpointing around each ResBlock / transformer block (the LDM/SGM reentrant
        one only returns gradients for parameters listed at call time, and fails on frozen ones)."""
        for m in self.unet.modules():
            if type(m).__name__ not in ("ResBlock", "BasicTransformerBlock") or not hasattr(m, "_forward"):
                continue
            if enabled:
                m.__dict__["forward"] = functools.partial(_checkpointed_forward, m)
            else:
                m.__dict__.pop("forward", None)


def _checkpointed_forward(module: Any, *args: Any, **kwargs: Any) -> Any:
    if torch.is_grad_enabled() and module.training:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(module._forward, *args, use_reentrant=False, **kwargs)
    return module._forward(*args, **kwargs)


class _Loan:
    """What `load()` changed, to undo in `release()`."""

    def __init__(self, sd_model: Any) -> None:
        self.sd_model = sd_model
        self.grads = {n: p.requires_grad for n, p in sd_model.named_parameters()}
        self.modes = {n: m.training for n, m in sd_model.named_modules()}
        self.flags: list[tuple[Any, str, bool]] = []
        self.optimization_undone = False
        self.switched_from: Any = None
        self.took_lock = False
        self.hypernetworks: tuple[list, list] | None = None      # shared.loaded_hypernetworks, its contents
        self.hyper_layers: list[tuple[Any, str, Any]] = []       # (attention, "hyper_k"|"hyper_v", module)


class WebUIHost:
    """The Host protocol over A1111 v1.10 (see the module docstring)."""

    name = "webui"

    def __init__(self, extension_dir: str | Path | None = None) -> None:
        self.extension_dir = Path(extension_dir) if extension_dir else Path(__file__).resolve().parents[2]
        self._loans: dict[int, _Loan] = {}
        self._holding = threading.local()
        self._last_progress: dict[str, Any] = {}

    @property
    def draws_zero_terminal_snr(self) -> bool:
        """Whether a SampleRequest.zero_terminal_snr picture can be drawn on that schedule: A1111 1.8+ has the
        "Noise schedule for sampling" option (sd_noise_schedule) it sets; older ones draw on the stored one."""
        return "sd_noise_schedule" in shared.opts.data_labels

    # ---- the queue lock --------------------------------------------------------------------------------
    def _lock_held(self) -> bool:
        return bool(getattr(self._holding, "count", 0))

    @contextlib.contextmanager
    def gpu_lock(self, on_wait: Callable[[], Any] | None = None, stop: Any = None) -> Iterator[None]:
        """`call_queue.queue_lock` (not re-entrant), taken once per thread however often this nests.

        `on_wait` is called once, before blocking, when the lock is taken by someone else (another generation or
        job runs): a job says that it waits rather than what it will do once it has the lock. With a `stop`
        token, the wait ends when the token is requested: `StoppedBeforeStart` is raised and the block never
        runs (see `_acquire_queue_lock`); a token already requested raises it at once."""
        if self._lock_held():
            self._holding.count += 1
            try:
                yield
            finally:
                self._holding.count -= 1
            return
        self._acquire_queue_lock(on_wait, stop)
        self._holding.count = 1
        try:
            yield
        finally:
            self._holding.count = 0
            call_queue.queue_lock.release()

    @staticmethod
    def _acquire_queue_lock(on_wait: Callable[[], Any] | None, stop: Any = None) -> None:
        """Take A1111's queue lock for this thread, waiting as long as it takes, or until `stop` is requested.

        A1111's lock (`fifo_lock.FIFOLock`) serves blocking waiters in the order they came and has no timeout;
        trying again and again without blocking would give up the job's place in that line. So with a token the
        blocking `acquire` runs on a helper thread, and this thread waits for it, looking at the token every
        0.2 s. The lock is handed over as is: a `threading.Lock` (FIFOLock's own inner lock too) can be released
        by a thread other than the one that took it, and `gpu_lock` releases it from this thread. If the token
        is requested first, `StoppedBeforeStart` is raised; the helper still waits its turn and, when it gets
        the lock, releases it at once, so the line behind it moves on. (Only the token cancels the wait, not
        A1111's Interrupt flag: an Interrupt pressed meanwhile is meant for the generation that runs.)"""
        from ..events import StoppedBeforeStart

        def stopped() -> bool:
            return stop is not None and bool(getattr(stop, "requested", False))

        if stopped():
            raise StoppedBeforeStart(getattr(stop, "reason", "") or "stopped")
        lock = call_queue.queue_lock
        if on_wait is not None or stop is not None:
            try:
                free = lock.acquire(blocking=False)     # A1111's FIFOLock and threading.Lock both take it
            except TypeError:                           # a lock that cannot be tried: wait without saying so
                free = False
            else:
                if free:
                    return
                if on_wait is not None:
                    on_wait()
        if stop is None:
            lock.acquire()
            return
        got, guard = threading.Event(), threading.Lock()
        gave_up = []                                    # set by this thread, under `guard`, when it stops waiting

        def take() -> None:
            lock.acquire()
            with guard:
                if not gave_up:
                    got.set()                           # handed to the waiting thread
                    return
            lock.release()                              # nobody waits for it any more: pass it on at once

        helper = threading.Thread(target=take, name="training-lab-queue-wait", daemon=True)
        helper.start()
        while not got.wait(0.2):
            if stopped():
                with guard:
                    if not got.is_set():
                        gave_up.append(True)
                        break
                # the lock came in just as the stop did: give it back, the job still does not start
                lock.release()
                break
        else:
            return
        raise StoppedBeforeStart(getattr(stop, "reason", "") or "stopped")

    # ---- lending the model -----------------------------------------------------------------------------
    def load(self, model: str | None = None) -> WebUIParts:
        took_lock = False
        if not self._lock_held():
            call_queue.queue_lock.acquire()
            self._holding.count = 1
            took_lock = True
        switched_from = None
        try:
            switched_from = self._select(model)
            sd_model = shared.sd_model
            if sd_model is None:
                raise UserError("no model is loaded in the WebUI: choose a Stable Diffusion checkpoint at the top "
                                "of the page (or wait until it has loaded), then start again")
            family = self._check(sd_model)
            parts = WebUIParts(sd_model, family, self._model_info(sd_model))   # no side effects yet
            loan = _Loan(sd_model)
            loan.switched_from, loan.took_lock = switched_from, took_lock
            self._prepare(sd_model, loan)
        except BaseException:
            try:
                if switched_from is not None:
                    sd_models.reload_model_weights(info=switched_from)
            finally:
                if took_lock:
                    self._holding.count = 0
                    call_queue.queue_lock.release()
            raise
        self._loans[id(parts)] = loan
        return parts

    @property
    def max_grid_megapixels(self) -> float:
        """A1111's own limit on grids ("Maximum image size, in megapixels", `img_max_size_mp`), which the X/Y/Z
        plot also obeys; compare grids follow the user's setting. Unset or unusable: A1111's default."""
        from ..evaluate.compare import MAX_GRID_MEGAPIXELS

        try:
            value = float(shared.opts.data.get("img_max_size_mp", MAX_GRID_MEGAPIXELS) or MAX_GRID_MEGAPIXELS)
        except (TypeError, ValueError):
            return MAX_GRID_MEGAPIXELS
        return value if value > 0 else MAX_GRID_MEGAPIXELS

    def native_resolution(self, model: str | None = None) -> tuple[int, str]:
        """(native size, source) of checkpoint `model` (header only) or of the loaded model (its family)."""
        from ..models.native import family_size, probe_model

        if model:
            path = self._checkpoint_file(model)
            probe = probe_model(path)
            return probe.native, f"{path.name}: {probe.source}"
        sd_model = shared.sd_model
        if sd_model is None:
            return 512, "no model loaded yet; 512 assumed"
        family = "sdxl" if getattr(sd_model, "is_sdxl", False) else "sd2" if getattr(sd_model, "is_sd2", False) \
            else "sd1"
        prediction = "v" if getattr(sd_model, "parameterization", "eps") == "v" else "eps"
        # the loaded checkpoint's own header first, as for a named one: its modelspec.resolution (the toy model
        # says 64) or a small UNet; the family's stock size only when the file says nothing or is gone
        filename = getattr(getattr(sd_model, "sd_checkpoint_info", None), "filename", None)
        if filename:
            try:
                probe = probe_model(filename)
            except (UserError, OSError, ValueError):
                probe = None
            if probe is not None and probe.family == family and not probe.source.endswith(" default"):
                return probe.native, f"the loaded {family} model ({Path(filename).name}: {probe.source})"
        return family_size(family, prediction), f"the loaded {family} model"

    @staticmethod
    def _checkpoint_file(model: str) -> Path:
        """The file of checkpoint `model` (a path, or a name or title in the WebUI's list); UserError if unknown."""
        path = Path(str(model)).expanduser()
        if path.is_file():
            return path
        info = sd_models.get_closet_checkpoint_match(str(model))
        if info is None:
            sd_models.list_models()
            info = sd_models.get_closet_checkpoint_match(str(model)) or \
                sd_models.get_closet_checkpoint_match(path.name)
        if info is None:
            raise UserError(f"checkpoint {model!r} is not in the WebUI's list (models/Stable-diffusion); "
                            "put it there and refresh, or leave the model empty to train the loaded one")
        return Path(info.filename)

    def training_notes(self, cfg: Any) -> list[str]:
        """Warnings about how this WebUI will apply the run's output: a DoRA trained while the Lora extension's
        "old method" (`lora_functional`) is on. That method adds only up·down and ignores `dora_scale`, so the
        control pictures (drawn with the trained layers) would not show what txt2img draws with the file."""
        network = getattr(getattr(cfg, "lora", None), "network_type", "")
        if getattr(cfg, "method", "") == "lora" and str(network).lower() == "dora" \
                and shared.opts.data.get("lora_functional", False):
            return ["DoRA: the WebUI's Lora option for the old method (Settings → Compatibility, lora_functional) "
                    "is on, and that method ignores DoRA's magnitudes: txt2img will draw the file as a plain LoRA, "
                    "unlike the control pictures. Turn the option off to use the DoRA as trained"]
        return []

    def model_file(self, model: str | None = None) -> Path | None:
        """The file of checkpoint `model`, or of the loaded model (None when none is loaded)."""
        if model:
            return self._checkpoint_file(model)
        sd_model = shared.sd_model
        info = getattr(sd_model, "sd_checkpoint_info", None)
        path = getattr(info, "filename", "") or getattr(sd_model, "sd_model_checkpoint", "") or ""
        return Path(str(path)) if path else None

    def _select(self, model: str | None) -> Any:
        """Switch to checkpoint `model` (name, title or path) when another one is loaded; returns the old info."""
        if not model:
            return None
        current = shared.sd_model
        current_file = getattr(current, "sd_model_checkpoint", None)
        if current_file and Path(str(model)).resolve() == Path(current_file).resolve():
            return None
        info = sd_models.get_closet_checkpoint_match(str(model))
        if info is None:
            sd_models.list_models()
            info = sd_models.get_closet_checkpoint_match(str(model)) or \
                sd_models.get_closet_checkpoint_match(Path(str(model)).name)
        if info is None:
            raise UserError(f"checkpoint {model!r} is not in the WebUI's list (models/Stable-diffusion); "
                            "put it there and refresh, or leave the model empty to train the loaded one")
        if current is not None and getattr(current, "sd_checkpoint_info", None) is info:
            return None
        old = getattr(current, "sd_checkpoint_info", None)
        # under queue_lock: never opts.set("sd_model_checkpoint") here (its onchange takes the lock → deadlock)
        sd_models.reload_model_weights(info=info)
        return old

    def _check(self, sd_model: Any) -> str:
        """The family of a model this host can train, or a UserError that says why not."""
        from modules import lowvram

        opts = shared.cmd_opts
        if getattr(opts, "lowvram", False) or getattr(opts, "medvram", False) or lowvram.is_enabled(sd_model) or \
                (getattr(opts, "medvram_sdxl", False) and getattr(sd_model, "is_sdxl", False)):
            flag = "--lowvram" if getattr(opts, "lowvram", False) else \
                "--medvram-sdxl" if getattr(opts, "medvram_sdxl", False) and not opts.medvram else "--medvram"
            raise UserError(f"the WebUI runs with {flag}: it moves parts of the model between CPU and GPU while "
                            "they are used, which training cannot follow. Restart the WebUI without "
                            f"{flag} to train here, or use the standalone trainer (python -m lib_sdtrain train)")
        if getattr(sd_model, "is_sd3", False):
            raise UserError("SD3 models cannot be trained by Training Lab (SD1, SD2 and SDXL only)")
        if getattr(sd_model, "is_sdxl", False):
            family = "sdxl"
        elif getattr(sd_model, "is_sd2", False):
            family = "sd2"
        elif getattr(sd_model, "is_sd1", False):
            family = "sd1"
        else:
            raise UserError(f"the loaded model ({type(sd_model).__name__}) is not SD1, SD2 or SDXL")
        from modules import sd_unet

        if getattr(sd_unet, "current_unet", None) is not None:
            raise UserError("a replacement UNet is active (Settings → SD Unet, e.g. TensorRT): set SD Unet to "
                            "'None' and load the checkpoint again to train")
        unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
        if unet is None or type(unet).__name__ != "UNetModel" or not hasattr(unet, "input_blocks"):
            raise UserError(f"the loaded model's UNet ({type(unet).__name__}) is not the LDM/SGM UNetModel this "
                            "trainer knows; reload the checkpoint without UNet-replacing extensions")
        in_channels = getattr(unet, "in_channels", 4)
        if in_channels != 4 or getattr(sd_model, "is_sdxl_inpaint", False) or \
                getattr(sd_model.model, "conditioning_key", "crossattn") not in ("crossattn", None):
            raise UserError(f"the loaded model is an inpainting/instruct model ({in_channels} input channels): "
                            "only standard 4-channel models can be trained")
        fp8 = bool(getattr(devices, "fp8", False)) or any(p.dtype in _FP8 for p in unet.parameters())
        if fp8 or str(shared.opts.data.get("fp8_storage", "Disable")) not in ("Disable", "None", "False"):
            raise UserError("the model's weights are stored in FP8 (Settings → Optimizations → FP8 weight): "
                            "FP8 weights cannot be trained. Set FP8 weight to 'Disable', reload the checkpoint "
                            "and start again")
        return family

    def _model_info(self, sd_model: Any) -> ModelInfo:
        info = getattr(sd_model, "sd_checkpoint_info", None)
        path = str(getattr(info, "filename", "") or getattr(sd_model, "sd_model_checkpoint", "") or "")
        name = getattr(info, "name_for_extra", "") or (Path(path).stem if path else "")
        extra: dict[str, Any] = {"host": "webui"}
        from modules import sd_vae

        if getattr(sd_vae, "loaded_vae_file", None):
            extra["vae"] = str(sd_vae.loaded_vae_file)    # latents come from this external VAE
        return ModelInfo(name=name, path=path, sha256=getattr(info, "sha256", None) or "",
                         legacy_hash=getattr(info, "hash", None) or "", extra=extra)

    def _prepare(self, sd_model: Any, loan: _Loan) -> None:
        """Freeze, switch off what training cannot go through, and clear the Lora merges and hypernetworks."""
        self._suspend_hypernetworks(sd_model, loan)
        self._unmerge_lora(sd_model)
        sd_model.requires_grad_(False)
        for m in sd_model.model.diffusion_model.modules():
            for attr in ("use_checkpoint", "checkpoint"):
                value = m.__dict__.get(attr)
                if isinstance(value, bool):
                    loan.flags.append((m, attr, value))
                    setattr(m, attr, False)
        if not shared.opts.data.get(OPTION_KEEP_OPTIMIZATION, False):
            sd_hijack.undo_optimizations()
            loan.optimization_undone = True
        self._clear_cond_caches()

    @staticmethod
    def _suspend_hypernetworks(sd_model: Any, loan: _Loan | None) -> None:
        """Hypernetworks out of the way while the model is lent (a1111-host.md §4).

        Every A1111 attention forward runs the context through `shared.loaded_hypernetworks` (what the last
        generation's `<hypernet:...>` tags loaded; they stay until the next generation), so without this every
        method would train on top of a hypernetwork the user may not even be using any more. The plain forward
        also records the modules on each layer (`hyper_k` / `hyper_v`), which makes them UNet submodules: they
        would be frozen/trained with the UNet and saved into full checkpoints. Both are taken out here (the
        list emptied in place, the layer attributes removed) and put back by `release()`; `loan` None = again
        after a control picture, whose prompt may load hypernetworks for that picture only.
        """
        loaded = getattr(shared, "loaded_hypernetworks", None)
        if isinstance(loaded, list):
            if loan is not None and loan.hypernetworks is None:
                loan.hypernetworks = (loaded, list(loaded))
            loaded.clear()
        for m in sd_model.model.diffusion_model.modules():
            for attr in ("hyper_k", "hyper_v"):
                if attr in m.__dict__.get("_modules", {}) or attr in m.__dict__:
                    if loan is not None:
                        loan.hyper_layers.append((m, attr, getattr(m, attr)))
                    delattr(m, attr)

    @staticmethod
    def _restore_hypernetworks(sd_model: Any, loan: _Loan) -> None:
        for m in sd_model.model.diffusion_model.modules():
            for attr in ("hyper_k", "hyper_v"):
                if attr in m.__dict__.get("_modules", {}) or attr in m.__dict__:
                    delattr(m, attr)            # left by a control picture's hypernetwork
        for m, attr, value in loan.hyper_layers:
            setattr(m, attr, value)
        if loan.hypernetworks is not None:
            loaded, contents = loan.hypernetworks
            loaded[:] = contents
            shared.loaded_hypernetworks = loaded

    @staticmethod
    def _unmerge_lora(sd_model: Any) -> None:
        """Builtin Lora (a1111-host.md §5): forget loaded networks, put the backed-up weights back, drop backups.

        Under `torch.no_grad()`: Lora's copy-back is a plain in-place `copy_` in the caller's grad mode, and A1111
        never freezes the UNet, so with autograd on it fails with "a leaf Variable that requires grad is being
        used in an in-place operation" (issue #16, defect 1: every run after a `<lora:...>` generation).
        """
        networks = sys.modules.get("networks")
        if networks is None or not hasattr(networks, "network_restore_weights_from_backup"):
            return
        with torch.no_grad():
            if hasattr(networks, "load_networks"):
                networks.load_networks([])
            elif hasattr(networks, "loaded_networks"):
                networks.loaded_networks.clear()
            for m in sd_model.modules():
                if getattr(m, "network_weights_backup", None) is not None or \
                        getattr(m, "network_bias_backup", None) is not None:
                    networks.network_restore_weights_from_backup(m)
                    networks.network_reset_cached_weight(m)

    @staticmethod
    def _clear_cond_caches() -> None:
        """processing's class-level conditioning caches: their key ignores the weights (a1111-host.md §3)."""
        from modules import processing

        cls = processing.StableDiffusionProcessing
        for attr in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            cache = getattr(cls, attr, None)
            if isinstance(cache, list) and len(cache) == 2:
                cache[0] = cache[1] = None

    def release(self, parts: ModelParts) -> None:
        loan = self._loans.pop(id(parts), None)
        if loan is None:
            return
        sd_model = loan.sd_model
        errors: list[str] = []

        def step(what, fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - restore as much as possible, report the rest
                errors.append(f"{what}: {type(e).__name__}: {e}")

        def restore_model():
            if isinstance(parts, WebUIParts):
                parts.set_gradient_checkpointing(False)
            for m, attr, value in loan.flags:
                setattr(m, attr, value)
            for n, p in sd_model.named_parameters():
                if n in loan.grads:
                    p.requires_grad_(loan.grads[n])
            for n, m in sd_model.named_modules():
                if n in loan.modes:
                    m.training = loan.modes[n]     # not .train(): LDM disables it on frozen parts

        try:
            if isinstance(parts, WebUIParts):
                step("embeddings", parts.remove_all_embeddings)
            step("model flags", restore_model)
            step("hypernetworks", lambda: self._restore_hypernetworks(sd_model, loan))
            if loan.optimization_undone:
                step("attention optimisation", lambda: sd_hijack.model_hijack.apply_optimizations())
            step("conditioning caches", self._clear_cond_caches)
            if loan.switched_from is not None:
                step("checkpoint", lambda: sd_models.reload_model_weights(info=loan.switched_from))
            step("memory", devices.torch_gc)
        finally:
            if loan.took_lock:
                self._holding.count = 0
                call_queue.queue_lock.release()
        if errors:
            raise RuntimeError("could not restore the WebUI's model completely: " + "; ".join(errors))

    # ---- pictures ------------------------------------------------------------------------------------
    def sample(self, parts: ModelParts, requests: list[SampleRequest], stop: Any = None) -> list:
        """Pictures through A1111's txt2img pipeline on the (adapted) live model, in eval mode.

        With a stop token (comparisons, class pictures), a picture A1111's own controls cut short is not
        returned: Interrupt ends the list there and requests the stop; Skip puts None in that picture's place
        and goes on with the next. A Skip or Interrupt that comes only after the picture's last sampling step
        (while it is decoded) cut nothing short: that picture is kept (after an Interrupt, as the list's last).
        Without a token every picture is kept as A1111 decoded it, half-drawn or not."""
        import contextlib as _cl

        from modules import processing

        modules = [parts.unet, *parts.text_encoders]
        modes = [m.training for m in modules]
        info = getattr(getattr(parts, "sd_model", None), "sd_checkpoint_info", None)
        state = shared.state
        saved = {k: getattr(state, k, None) for k in ("job_no", "job_count", "textinfo")}
        images = []
        sd_model = getattr(parts, "sd_model", None)
        try:
            for m in modules:
                m.eval()
            if isinstance(parts, WebUIParts):
                parts.ensure_embeddings()
            with self.gpu_lock(), self._counting_steps(stop is not None) as steps:
                for req in requests:
                    if stop is not None and getattr(stop, "requested", False):
                        break
                    steps["taken"] = steps["planned"] = 0
                    self._clear_cond_caches()    # adapters change the conditioning; the cache cannot tell
                    overrides = {"sd_model_checkpoint": info.name} if info is not None else {}
                    if req.zero_terminal_snr and self.draws_zero_terminal_snr:   # A1111 1.8+
                        overrides["sd_noise_schedule"] = ZERO_TERMINAL_SNR
                    p = processing.StableDiffusionProcessingTxt2Img(
                        prompt=req.prompt, negative_prompt=req.negative, seed=req.seed, steps=req.steps,
                        cfg_scale=req.cfg_scale, width=req.width, height=req.height,
                        sampler_name=self._sampler_name(req.sampler), batch_size=1, n_iter=1,
                        do_not_save_samples=True, do_not_save_grid=True, do_not_reload_embeddings=True,
                        override_settings=overrides, override_settings_restore_afterwards=True,
                        **self._scheduler_arg(processing.StableDiffusionProcessingTxt2Img))
                    with _cl.closing(p), self._settings_put_back(overrides, sd_model):
                        res = processing.process_images(p)
                    if stop is not None and getattr(state, "interrupted", False):
                        # A1111's Interrupt: its sampler ended this picture early and decoded it half-drawn.
                        # A caller with a stop token (comparisons, class pictures) takes a short list: the
                        # picture is left out and the stop requested now, not at the next event or watch.
                        # An Interrupt after the picture's last sampling step (during its decode) cut nothing
                        # short: A1111 decodes and returns it whole, and it is the list's last picture
                        if not getattr(stop, "requested", False):
                            stop.request("interrupted in the WebUI")
                        if res.images and 0 < steps["planned"] <= steps["taken"]:
                            images.append(res.images[0])
                        break
                    if stop is not None and getattr(state, "skipped", False):
                        # A1111's Skip: the same early end and half-drawn decode, for this picture only. It is
                        # left out (None in its place, so the caller still knows which request each picture
                        # answers) and the next one is drawn; the flag is cleared so it cannot end that one.
                        # A Skip that came after the last sampling step (during the decode) ended nothing:
                        # A1111's sampler reads the flag only when it calls the model, so that picture is whole
                        state.skipped = False
                        if not 0 < steps["planned"] <= steps["taken"]:
                            images.append(None)
                            continue
                    if not res.images:
                        break    # interrupted
                    images.append(res.images[0])
            self._clear_cond_caches()
        finally:
            if sd_model is not None and id(parts) in self._loans:
                # a control prompt's <hypernet:...> / <lora:...> tags: for that picture only, not for training
                self._suspend_hypernetworks(sd_model, None)
                self._unmerge_lora(sd_model)
            for m, mode in zip(modules, modes):
                m.train(mode)
            for k, v in saved.items():       # process_images moved job_no/job_count; put training's back
                setattr(state, k, v)
        return images

    @staticmethod
    @contextlib.contextmanager
    def _settings_put_back(overrides: dict[str, Any], sd_model: Any) -> Iterator[None]:
        """Put back what a picture's `override_settings` changed, where A1111 does not. Its process_images
        restores only the options already in `opts.data`, which holds what config.json holds: an option never
        saved (a fresh install's `sd_noise_schedule`) stayed at the picture's value, so after a zero-terminal-SNR
        run every later generation drew on that schedule (real A1111 v1.10.1, session 21). Such options leave
        `opts.data` again (their default applies, as before). The model's `alphas_cumprod`, which A1111 sets
        from that option for each generation, is put back too."""
        data = getattr(shared.opts, "data", None)
        absent = [k for k in overrides if isinstance(data, dict) and k not in data]
        alphas = getattr(sd_model, "alphas_cumprod", None) if "sd_noise_schedule" in overrides else None
        try:
            yield
        finally:
            for key in absent:
                data.pop(key, None)
            if alphas is not None:
                sd_model.alphas_cumprod = alphas

    @staticmethod
    @contextlib.contextmanager
    def _counting_steps(enabled: bool = True) -> Iterator[dict[str, int]]:
        """Count the sampling steps A1111 takes while the block runs: {"taken": steps done, "planned": the
        steps the sampler set out to take}, for the caller to reset before each picture.

        A1111's samplers tick the console's total progress bar (`shared.total_tqdm.update()`) once per step,
        from their step callback (after the step's model call), and set `state.sampling_steps` before the
        first one; its Skip and
        Interrupt flags are read only when the sampler calls the model, which it no longer does after the last
        step's tick. So a picture whose sampler took all its planned steps was not cut short, whatever the
        flags say afterwards. The bar's `update` is wrapped for the block (under the
        queue lock: no other generation ticks it meanwhile) and put back after. A WebUI without the bar, or
        `enabled` False, counts nothing (a count of 0 planned steps: the caller cannot tell)."""
        count = {"taken": 0, "planned": 0}
        bar = getattr(shared, "total_tqdm", None)
        inner = getattr(bar, "update", None)
        if not enabled or not callable(inner):
            yield count
            return
        own = "update" in getattr(bar, "__dict__", {})     # an update set on the bar itself, to put back

        def update(*args: Any, **kwargs: Any) -> Any:
            count["taken"] += 1
            count["planned"] = int(getattr(shared.state, "sampling_steps", 0) or 0)
            return inner(*args, **kwargs)

        try:
            bar.update = update
        except (AttributeError, TypeError):                # a bar that takes no attributes: nothing counted
            yield count
            return
        try:
            yield count
        finally:
            if own:
                bar.update = inner
            else:
                with contextlib.suppress(AttributeError):
                    del bar.update

    @staticmethod
    def _scheduler_arg(processing_class: Any) -> dict[str, str]:
        """{"scheduler": "Automatic"} where the WebUI has schedulers (1.9+): without it A1111 1.10 logs a
        "Sampler Scheduler autocorrection" warning for every picture. Older WebUIs take no such argument."""
        import inspect

        for klass in getattr(processing_class, "__mro__", ()):   # the argument may sit on a base class's __init__
            if "__init__" not in vars(klass):
                continue
            try:
                if "scheduler" in inspect.signature(klass.__init__).parameters:
                    return {"scheduler": "Automatic"}
            except (TypeError, ValueError):
                continue
        return {}

    def sampler_label(self, name: str) -> str:
        """How A1111 lists one of our samplers ("euler" → "Euler"): the Compare tab offers these names."""
        return self._sampler_name(name)

    def sampler_names(self) -> list[str]:
        """A1111's samplers as its txt2img lists them (those its settings leave visible), for the drop-downs of
        control and class pictures, which draw with any of them; [] when the WebUI cannot say."""
        try:
            from modules import sd_samplers

            listed = getattr(sd_samplers, "visible_sampler_names", None)
            names = listed() if callable(listed) else list(dict.fromkeys(sd_samplers.samplers_map.values()))
            return [str(n) for n in names if str(n).strip()]
        except Exception:  # noqa: BLE001 - a drop-down still offers ours
            return []

    def check_sampler(self, name: Any) -> str:
        """A1111's name of the sampler `name` (ours, or any spelling of A1111's names and aliases: "euler a",
        "k_dpmpp_2m", with or without a scheduler after it as A1111 1.9+ reads it: "DPM++ 2M Karras"), for
        control and class pictures; UserError when A1111 has none of that name. Its txt2img does not refuse such
        a name: it draws with its first sampler (DPM++ 2M) and says so only in the console (real A1111 v1.10.1,
        session 22: a typo in the drop-downs, which take any text, drew every control or class picture with
        DPM++ 2M)."""
        try:
            from modules import sd_samplers

            known = set(sd_samplers.samplers_map.values())
        except Exception:  # noqa: BLE001 - a WebUI that cannot tell: it checks when it draws
            return self._sampler_name(name)
        found = self._a1111_sampler(name)
        if found is not None:
            return found
        listed = self.sampler_names() or sorted(known)
        raise UserError(f"unknown sampler {name!r}: A1111 has no sampler of that name (its txt2img would draw "
                        f"with its first sampler instead); its samplers are {', '.join(listed)} (any case)")

    @staticmethod
    def _a1111_sampler(name: Any) -> str | None:
        """A1111's exact name of `name` through its `samplers_map` (names and aliases, lower case), a scheduler
        named after it kept as A1111 spells it ("euler a karras" → "Euler a Karras": A1111 splits that off, but
        only in its own case); None when A1111 has no such sampler."""
        from modules import sd_samplers

        key = str(name or "").strip()
        found = sd_samplers.samplers_map.get(key.lower())
        if found or not key:
            return found
        try:
            from modules import sd_schedulers   # 1.9+; before, "DPM++ 2M Karras" was a sampler's own name

            schedulers = list(sd_schedulers.schedulers)
        except Exception:  # noqa: BLE001
            schedulers = []
        for scheduler in schedulers:
            for option in (scheduler.label, scheduler.name, *(getattr(scheduler, "aliases", None) or [])):
                if option and key.lower().endswith(" " + str(option).lower()):
                    base = sd_samplers.samplers_map.get(key[:-len(option) - 1].strip().lower())
                    if base:
                        return f"{base} {scheduler.label}"
        return None

    @staticmethod
    def _sampler_name(name: str) -> str:
        """A1111's name of a sampler: our names (as settings store them) and any spelling of A1111's
        own names through its `samplers_map` (name and aliases, lower case → "Euler", "DDIM", "Euler a"...);
        ours by `sample_settings.A1111_NAMES` where a WebUI has no such map; anything else unchanged."""
        from ..sample_settings import A1111_NAMES, canonical_sampler

        fallback = A1111_NAMES.get(canonical_sampler(name), name)
        try:
            return WebUIHost._a1111_sampler(name) or fallback
        except Exception:  # noqa: BLE001
            return fallback

    # ---- files -------------------------------------------------------------------------------------
    def outputs_root(self) -> Path:
        """The extension's own folder for runs, control pictures and class images (Settings → Training Lab)."""
        configured = str(shared.opts.data.get(OPTION_OUTPUTS, "") or "").strip()
        if configured:
            return Path(configured)
        from modules import paths_internal

        return Path(paths_internal.default_output_dir) / "training-lab"

    def output_dir(self, kind: str) -> Path:
        o = shared.cmd_opts
        models = Path(paths.models_path)
        if kind == "lora":
            return Path(getattr(o, "lora_dir", None) or models / "Lora")
        if kind == "embedding":
            from modules import paths_internal

            return Path(getattr(o, "embeddings_dir", None) or Path(paths_internal.data_path) / "embeddings")
        if kind == "hypernetwork":
            return Path(getattr(o, "hypernetwork_dir", None) or models / "hypernetworks")
        if kind == "checkpoint":
            return Path(getattr(o, "ckpt_dir", None) or getattr(sd_models, "model_path", None)
                        or models / "Stable-diffusion")
        folders = {"runs": "runs", "class": "class_images", "compare": "compare"}
        if kind in folders:
            return self.outputs_root() / folders[kind]
        raise ValueError(f"unknown output kind {kind!r}")

    def prompt_template_dir(self) -> Path | None:
        """A1111's prompt template folder (`--textual-inversion-templates-dir`, default
        `<webui>/textual_inversion_templates`), whose .txt files the Train tab offers as prompt templates."""
        from modules import paths_internal

        folder = getattr(shared.cmd_opts, "textual_inversion_templates_dir", None) or \
            Path(getattr(paths_internal, "script_path", "") or ".") / "textual_inversion_templates"
        return Path(folder) if Path(folder).is_dir() else None

    def refresh(self, kind: str) -> None:
        """Rescan A1111's list of that kind, so the new file appears (with its metadata) in the UI."""
        if kind == "lora":
            networks = sys.modules.get("networks")
            if networks is not None and hasattr(networks, "list_available_networks"):
                networks.list_available_networks()
        elif kind == "embedding":
            sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
        elif kind == "hypernetwork":
            if hasattr(shared, "reload_hypernetworks"):
                shared.reload_hypernetworks()
        elif kind == "checkpoint":
            sd_models.list_models()

    # ---- progress and interrupt ------------------------------------------------------------------------
    def events_bridge(self, events: Any, stop: Any = None):
        """Mirror a run's Events into `shared.state`, and A1111's interrupt into `stop`; returns the listener
        (already subscribed; `events.unsubscribe(listener)` to end)."""
        state = shared.state

        def listener(event: Any) -> None:
            d = event.data
            if stop is not None and state.interrupted and not stop.requested:
                stop.request("interrupted in the WebUI")
            if event.kind == "progress":
                if d.get("phase") == "cache":
                    state.textinfo = f"Training Lab: caching latents {d.get('step', 0)}/{d.get('total', 0)}"
                    return
                state.job_count = int(d.get("total", 0) or 0)
                state.job_no = int(d.get("step", 0) or 0)
                if d.get("phase") == "compare":       # pictures of a comparison grid
                    text = f"Training Lab: comparing, picture {state.job_no}/{state.job_count}"
                    if d.get("row"):
                        text += f" ({d['row']})"
                elif d.get("job") == "classgen":      # class pictures drawn before a run
                    text = f"Training Lab: class pictures {state.job_no}/{state.job_count}"
                else:
                    loss = d.get("ema", d.get("loss"))
                    text = f"Training Lab: step {state.job_no}/{state.job_count}"
                    if loss is not None:
                        text += f", loss {float(loss):.4f}"
                    if d.get("epoch"):
                        text += f", epoch {d['epoch']}"
                state.textinfo = text
                self._last_progress = {"job_no": state.job_no, "job_count": state.job_count, "textinfo": text}
            elif event.kind == "status":
                state.textinfo = f"Training Lab: {d.get('text', '')}"
            elif event.kind == "samples" and d.get("images"):
                if hasattr(state, "assign_current_image"):
                    state.assign_current_image(d["images"][0])
            elif event.kind == "saved":
                state.textinfo = f"Training Lab: saved {os.path.basename(str(d.get('path', '')))}"

        events.subscribe(listener)
        return listener

    @contextlib.contextmanager
    def job_context(self, job: Any) -> Iterator[None]:
        """One job as A1111 runs a GPU task: queue lock, state.begin/end, progress task, interrupt (the Host
        protocol's `job_context`).

        `job` needs `.id`, `.events` and `.stop` (lib_sdtrain.jobs.Job: pass as JobManager(around_job=...)),
        and may say its `.kind` (hosts.HostJob: "compare" runs as job "training-lab-compare", "classgen" as
        "training-lab-class-pictures").
        """
        from modules import progress

        from ..events import StoppedBeforeStart

        tid = task_id(getattr(job, "id", "job"))
        if callable(getattr(progress, "add_task_to_queue", None)):
            progress.add_task_to_queue(tid)       # A1111's progress API shows it queued until it starts
        # while another generation or job holds the queue, the job's status says so (its own events: the
        # progress fields of shared.state are the running job's until this one has the lock), and its own stop
        # (job.stop: the tab's Stop button) ends the wait; A1111's Interrupt then is the running job's
        lock = self.gpu_lock(on_wait=lambda: job.events.status(WAITING_TEXT), stop=job.stop)
        try:
            lock.__enter__()
        except StoppedBeforeStart:
            # never started: shared.state is the running job's and is not touched; the task leaves A1111's
            # queue as finished (its progress display closes)
            pending = getattr(progress, "pending_tasks", None)
            if isinstance(pending, dict):
                pending.pop(tid, None)
            if callable(getattr(progress, "finish_task", None)):
                progress.finish_task(tid)
            job.events.status("stopped while waiting for A1111's queue: nothing ran")
            raise
        with contextlib.ExitStack() as held:
            held.push(lock)                       # its __exit__ releases the lock when the job ends
            state = shared.state
            state.begin(job=job_name(job))
            progress.start_task(tid)
            listener = self.events_bridge(job.events, job.stop)
            done = threading.Event()

            def watch() -> None:
                # the Interrupt button also works between events (e.g. during caching); and the job's own stop
                # (the tab's Stop, the API's POST jobs/{id}/stop) ends a picture A1111 is drawing as Interrupt
                # does: the job stops after its current step, and without this it first drew the rest of the
                # round's control pictures (minutes per picture on a CPU; real A1111 v1.10.1, session 21)
                while not done.wait(0.25):
                    if state.interrupted:
                        if not job.stop.requested:
                            job.stop.request("interrupted in the WebUI")
                    elif job.stop.requested:
                        state.interrupt()

            watcher = threading.Thread(target=watch, name="training-lab-interrupt", daemon=True)
            watcher.start()
            try:
                yield
            finally:
                done.set()
                watcher.join(2)
                job.events.unsubscribe(listener)
                progress.finish_task(tid)
                state.end()
                self._end_progress(state)

    def _end_progress(self, state: Any) -> None:
        """After a job (finished, failed or stopped): put back the progress fields the bridge set, and close
        A1111's console "Total progress" bar. The bar is made on the first sampling step with a total of
        job_count × sampling_steps, so control and class pictures drawn during the run started it with the
        run's counts; the UI's own generate buttons close it when they end, the API and this job do not, and
        the next generation would continue the stale bar (e.g. "981/1200"). WebUIs without the bar skip it."""
        state.job_no, state.job_count, state.textinfo = 0, 0, None
        self._last_progress = {}
        bar = getattr(shared, "total_tqdm", None)
        if bar is not None and callable(getattr(bar, "clear", None)):
            with contextlib.suppress(Exception):   # a console bar must never fail the job's end
                bar.clear()


# ---- what outlives Reload UI ------------------------------------------------------------------------------
_KEPT: dict[str, Any] = {}
_KEPT_LOCK = threading.RLock()


def kept(key: str, make: Callable[[], Any]) -> Any:
    """The object kept under `key` for the life of the WebUI process, made by `make()` on first use.

    Settings → Reload UI (webui.py's restart loop) calls the on_before_reload and on_script_unloaded callbacks,
    clears every callback, executes each scripts/ file again as a new module and builds a new gradio app, but
    leaves imported packages in sys.modules. Module state of scripts/training_lab.py is therefore lost on a
    reload and this module's is not: the host and the job manager live here, so the job that runs during a
    reload (and the finished ones) belong to the same manager before and after it."""
    with _KEPT_LOCK:
        if key not in _KEPT:
            _KEPT[key] = make()
        return _KEPT[key]


def forget(key: str) -> Any:
    """Drop what `kept` holds under `key` (returned, or None): the next `kept(key, ...)` makes a new one."""
    with _KEPT_LOCK:
        return _KEPT.pop(key, None)


def peek(key: str) -> Any:
    """What `kept` holds under `key`, or None (made by nobody yet); never makes one."""
    with _KEPT_LOCK:
        return _KEPT.get(key)


def _no_interrupt() -> None:
    """State.interrupt while Reload UI is requested during a training run: the reload is not meant to end it."""


def reload_keeps_training() -> bool:
    """Make A1111's Settings → Reload UI leave a running Training Lab training job alone; True when installed now.

    A1111 v1.10's button calls `shared.state.request_restart`, which interrupts whatever runs before it asks the
    server loop to restart, and a training job takes A1111's Interrupt as its stop (job_context). The job
    outlives the reload (`kept`), so that interrupt would only end a run the reloaded page could have followed.
    `shared.state.request_restart` is wrapped (on the instance, once: a second call finds the wrapper): while
    `shared.state.job` is a training run's ("training-lab"), the call goes through with `state.interrupt` a
    no-op; otherwise (nothing running, a txt2img, a comparison or class pictures of ours, whose page the reload
    takes away) it is A1111's own. Must run before A1111 builds its Settings page (on_before_ui): the button
    keeps the function it was given then."""
    state = shared.state
    current = getattr(state, "request_restart", None)
    if not callable(current) or getattr(current, "_training_lab", False):
        return False

    @functools.wraps(current)
    def request_restart(*args: Any, **kwargs: Any) -> Any:
        st = shared.state
        if getattr(st, "job", "") != JOB_NAME:
            return current(*args, **kwargs)
        own = st.__dict__.get("interrupt")
        st.interrupt = _no_interrupt
        try:
            return current(*args, **kwargs)
        finally:
            if own is not None:
                st.interrupt = own
            elif st.__dict__.get("interrupt") is _no_interrupt:
                del st.interrupt

    request_restart._training_lab = True      # type: ignore[attr-defined]
    state.request_restart = request_restart
    return True


EXIT_WAIT_S = 120.0   # how long the WebUI's exit waits for a running training job to stop and save its state
_EXIT_HOOKED: list[bool] = []


def stop_training_for_exit(timeout: float = EXIT_WAIT_S) -> str | None:
    """Stop the running Training Lab job, if any, and wait (at most `timeout` seconds) for it to end: it stops
    after its current step and saves a resumable state, as the Stop button does. Returns its state then (None
    when nothing ran). Console lines say what happens, since the page is going away."""
    jobs = peek("jobs")
    run = jobs.running() if jobs is not None else None
    if run is None:
        return None
    print(f"Training Lab: the WebUI is exiting; job {run.id} stops after its current step and saves a resumable "
          f"state first (waiting up to {timeout:.0f} s)", flush=True)
    jobs.stop(run.id, "the WebUI is exiting")
    state = jobs.wait(run.id, timeout=timeout)
    if state in ("queued", "running"):
        print(f"Training Lab: job {run.id} did not stop within {timeout:.0f} s; the WebUI exits anyway (resume "
              "from the run's last saved state)", flush=True)
    else:
        print(f"Training Lab: job {run.id} {state}; resume it from its run folder", flush=True)
    return state


def exit_keeps_training_state() -> bool:
    """Make the WebUI's own exits stop a running training job cleanly first; True when installed now.

    Extensions → "Apply and restart UI" (also "Apply and quit"), and the API's restart and kill routes, end the
    process with `modules.restart.stop_program` (os._exit): a training run was cut mid-step and lost everything
    since its last save. `stop_program` is wrapped (once) to call `stop_training_for_exit` first; a plain exit of
    the interpreter (the API's server-stop) gets the same through atexit. Ctrl-C is not touched: A1111's SIGINT
    handler calls os._exit itself, on purpose, and a user pressing it wants out now. Settings → Reload UI is not
    an exit (the run goes on, see `reload_keeps_training`)."""
    try:
        from modules import restart
    except ImportError:       # a WebUI without it (a fork): nothing to wrap
        return False
    if not _EXIT_HOOKED:
        _EXIT_HOOKED.append(True)
        import atexit

        atexit.register(stop_training_for_exit)
    current = getattr(restart, "stop_program", None)
    if not callable(current) or getattr(current, "_training_lab", False):
        return False

    @functools.wraps(current)
    def stop_program(*args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(Exception):   # the exit itself must happen whatever goes wrong here
            stop_training_for_exit()
        return current(*args, **kwargs)

    stop_program._training_lab = True      # type: ignore[attr-defined]
    restart.stop_program = stop_program
    return True
