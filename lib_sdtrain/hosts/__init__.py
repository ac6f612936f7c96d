"""The Host protocol and ModelParts: what the core sees of a Stable Diffusion model.

A host owns the model (A1111's loaded checkpoint, or a file loaded standalone) and lends it to the core as
`ModelParts`. The core trains, samples and saves only through these objects, so it never needs to know whose
model it is. Two hosts implement the protocol: `hosts.standalone` (diffusers/transformers modules built from a
single-file checkpoint) and `hosts.webui` (A1111's live LDM/SGM model; the only module importing `modules`).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Literal, Protocol, runtime_checkable

from ..data.buckets import SizeConditioning  # noqa: F401 - part of the protocol; a bucket computes it
from ..sample_settings import DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS

if TYPE_CHECKING:  # torch stays out of `import lib_sdtrain.hosts`
    import torch
    from PIL import Image

    from ..events import Events, StopToken

Family = Literal["sd1", "sd2", "sdxl"]
Prediction = Literal["eps", "v"]
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")

# Latent scale factors of the stock VAEs (LDM yaml `scale_factor`).
LATENT_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


@dataclass
class TextConditioning:
    """Output of the text side for a batch of prompts."""

    context: torch.Tensor                 # [B, 77*chunks, D] cross-attention context (D = 768 | 1024 | 2048)
    pooled: torch.Tensor | None = None    # [B, 1280] SDXL: pooled output of the second (bigG) encoder


@dataclass
class SampleRequest:
    """One picture to render: what control pictures, class images and comparisons ask a host for."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG_SCALE
    width: int = 512
    height: int = 512
    sampler: str = DEFAULT_SAMPLER      # sample_settings.SAMPLERS; the WebUI host also takes A1111's names
    zero_terminal_snr: bool = False     # draw on the zero-terminal-SNR schedule (a v-model trained with it; in the
                                        # WebUI: its "Zero Terminal SNR" noise schedule for this picture)


@dataclass
class HostJob:
    """One GPU job as `Host.job_context` sees it (lib_sdtrain.jobs.Job, a training run, has the same fields
    but `kind`): its progress and status go out as `events`, and the host's own stop control requests `stop`."""

    id: str                             # unique among the jobs of this process, e.g. "compare-0001"
    events: Events
    stop: StopToken
    kind: str = "train"                 # "train", "compare" or "classgen" (class pictures outside a run)


_JOB_NUMBERS: dict[str, Iterator[int]] = {}


@contextlib.contextmanager
def host_job(host: Any, kind: str, events: Events, stop: StopToken) -> Iterator[HostJob]:
    """Run the block as one of `host`'s jobs of `kind` (ids "<kind>-0001", ... per kind): inside the host's
    `job_context` (A1111: queue lock, progress display, Interrupt), or as it is on a host without one."""
    job = HostJob(f"{kind}-{next(_JOB_NUMBERS.setdefault(kind, itertools.count(1))):04d}", events, stop, kind=kind)
    around = getattr(host, "job_context", None)
    with (around(job) if callable(around) else contextlib.nullcontext()):
        yield job


@dataclass
class ModelInfo:
    """Identity of a base model, written into every output's metadata."""

    name: str = ""                      # file stem, e.g. "v1-5-pruned-emaonly"
    path: str = ""
    sha256: str = ""                    # full-file sha256 (A1111's shorthash is its first 10 hex digits)
    legacy_hash: str = ""               # A1111's old 8-hex "model hash"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    def fill_hashes(self) -> ModelInfo:
        """Compute the file hashes if not known yet (reads the whole file once)."""
        if not self.sha256 and self.path and Path(self.path).is_file():
            from ..formats.hashes import legacy_model_hash, model_sha256

            self.sha256 = model_sha256(self.path)
            self.legacy_hash = legacy_model_hash(self.path)
        return self


class ModelParts:
    """A loaded model as the core uses it. Hosts subclass this and implement the abstract operations.

    Attributes that methods read directly (LoRA finds layers by name in these modules):
      unet, vae, text_encoders (1 for SD1/SD2, 2 for SDXL), tokenizers (same length),
      module_naming: "diffusers" (standalone) or "ldm" (A1111's CompVis/SGM modules).
    """

    family: Family
    prediction: Prediction
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    alphas_cumprod: torch.Tensor          # [1000] float32, the training noise schedule
    latent_scale: float
    latent_channels: int = 4
    module_naming: Literal["diffusers", "ldm"] = "diffusers"
    info: ModelInfo
    clip_skip: int = 1                    # 1 = last layer (SD2/SDXL use the penultimate layer by design)

    # ---- operations every host implements ------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_text(self, prompts: list[str]) -> TextConditioning:
        """Conditioning for a batch of prompts, A1111-style (75-token chunks, emphasis, BREAK)."""
        raise NotImplementedError

    def predict(
        self,
        latents: torch.Tensor,            # [B, 4, H/8, W/8], already scaled by latent_scale
        timesteps: torch.Tensor,          # [B] integer timesteps 0..999
        cond: TextConditioning,
        sizes: list[SizeConditioning] | None = None,  # SDXL only; None = from the latent size
    ) -> torch.Tensor:
        """The UNet's output (eps or v, as `prediction` says), [B, 4, H/8, W/8]."""
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
                      mode: Literal["sample", "mean"] = "sample") -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] → scaled latents [B, 4, H/8, W/8]."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels [B, 3, H, W] in [-1, 1]."""
        raise NotImplementedError

    def token_embeddings(self) -> list[torch.nn.Embedding]:
        """The token-embedding table of each text encoder (textual inversion trains rows of these)."""
        raise NotImplementedError

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model under A1111's single-file LDM keys (`model.diffusion_model.*`, `first_stage_model.*`,
        `cond_stage_model.*` / `conditioner.embedders.*`, schedule buffers), without EMA copies.

        Values may be views of the live weights (callers copy what they keep). Full-model methods (Dreambooth,
        fine-tune) save this, so their saver does not depend on the host's module naming.
        """
        raise NotImplementedError


@runtime_checkable
class Host(Protocol):
    """Where models come from and where outputs go."""

    name: str

    def load(self, model: str | None = None) -> ModelParts:
        """The model to train. `None` = the host's current/default model."""

    def release(self, parts: ModelParts) -> None:
        """Give the model back; the host restores anything a run changed."""

    def native_resolution(self, model: str | None = None) -> tuple[int, str]:
        """(native picture size, where it came from) of `model` or the current model, without loading it;
        UserError when that model cannot be used (file missing, not a checkpoint, not in the host's list)."""

    def model_file(self, model: str | None = None) -> Path | None:
        """The checkpoint file of `model` or of the current model, without loading it (the submission check
        refuses outputs that would land on it); None when the host cannot tell."""

    def prompt_template_dir(self) -> Path | None:
        """The host's folder of prompt template .txt files (A1111: textual_inversion_templates), or None."""

    def sample(self, parts: ModelParts, requests: list[SampleRequest],
               stop: Any = None) -> list[Image.Image | None]:
        """Render pictures with the host's own samplers (control pictures, class images, comparisons), one per
        request, in order. Given a stop token the list may be short: it ends where the stop was requested (also
        by the host's own stop control), and holds None for a request whose picture the host's own skip control
        cut short (A1111's Skip), so callers can tell which picture answers which request. Without a token
        every entry is a picture."""

    def output_dir(self, kind: str) -> Path:
        """Folder for outputs of a kind: "lora", "embedding", "hypernetwork", "checkpoint", "runs"."""

    def refresh(self, kind: str) -> None:
        """Tell the host new files of `kind` exist (A1111 rescans its lists; standalone does nothing)."""

    def job_context(self, job: Any) -> ContextManager[Any]:
        """Wrap one GPU job (`HostJob`, or `jobs.Job` for a training run: `.id`, `.events`, `.stop`, optional
        `.kind`) so that it runs as one of the host's own jobs: under the host's GPU lock, its progress in the
        host's progress display, the host's stop control requesting `job.stop`, and everything put back when
        the job ends, however it ends. A1111: queue lock, `shared.state` job / progress / textinfo, its
        Interrupt button. Standalone: nothing to take or show (the job's own events and stop token are all).
        While the job waits for the host's lock, `job.stop` ends the wait: `events.StoppedBeforeStart` is
        raised instead of entering the block, and nothing of the job has run."""

    # Optional: `training_notes(cfg) -> list[str]`, warnings about how the host will use what the run makes
    # (A1111: a setting that applies the file differently from how it was trained). The preflight adds them to
    # the run's warnings; hosts without it have none.
    # Optional: `sampler_label(name) -> str`, how the host's own UI names one of our samplers (A1111: "Euler" for
    # "euler"); the Compare tab shows those names. Hosts without it show ours.
    # Optional: `sampler_names() -> list[str]`, every sampler the host draws control and class pictures with, as its
    # UI names them (A1111: the samplers its settings leave visible); the drop-downs of those offer them. Hosts
    # without it offer ours.
    # Optional: `check_sampler(name) -> str`, the host's name of a sampler it draws control and class pictures
    # with, or UserError for a name it has none of (A1111 would draw with its first sampler instead). Training's
    # preflight and the class pictures ask it before anything is drawn; hosts without it check when they draw.


# ---- the standalone host's folders and default model (no torch: the CLI's checks run before torch loads) -----
OUTPUT_KINDS = {"lora": "Lora", "embedding": "embeddings", "hypernetwork": "hypernetworks",
                "checkpoint": "Stable-diffusion", "runs": "runs", "class": "class_images", "compare": "compare"}


def standalone_output_root(root: str | Path | None = None) -> Path:
    """Where the standalone host writes: `root`, else $TRAINING_LAB_OUTPUT, else ./outputs."""
    import os

    return Path(root or os.environ.get("TRAINING_LAB_OUTPUT", "outputs"))


def default_model() -> Path:
    """The bundled toy model, the model used when none is given."""
    from importlib import resources

    from ..errors import UserError

    try:
        path = Path(str(resources.files("lib_sdtrain") / "toy" / "data" / "toy-sd1.safetensors"))
    except (ModuleNotFoundError, TypeError):
        path = Path(__file__).resolve().parents[1] / "toy" / "data" / "toy-sd1.safetensors"
    if not path.is_file():
        raise UserError("no model given and the bundled toy model is missing; pass a .safetensors checkpoint")
    return path
