"""TrainSettings: every training control as one declared setting (CLI flag, UI widget, saved config, metadata).

Method-specific settings live in their method's module and appear here as sections (`[lora]` in TOML): one per
entry of the method registry (`methods.METHODS`), added by `_method_sections`, so a new method needs no line here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import ConfigBase, setting
from ..errors import UserError
from ..formats.names import check_name, drop_model_suffix
from ..methods import METHODS
from ..sample_settings import MAX_PICTURE_SIDE, MAX_SEED, sampling_setting
from .optim import OPTIMIZERS, check_rates
from .schedules import SCHEDULES

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")          # computed by train.noise.elementwise_loss
HUBER_LOSSES = ("huber", "smooth_l1")                     # the loss types with a scheduled threshold
HUBER_SCHEDULES = ("snr", "exponential", "constant")     # computed by train.noise.huber_thresholds

if TYPE_CHECKING:   # the sections' types, for readers and type checkers (added at run time from METHODS)
    from ..methods.dreambooth import DreamboothSettings
    from ..methods.embedding import EmbeddingSettings
    from ..methods.finetune import FinetuneSettings
    from ..methods.hypernetwork import HypernetworkSettings
    from ..methods.lora import LoraSettings


def _method_sections(cls: type) -> type:
    """One settings section per registered method (`cfg.lora`, `cfg.embedding`, ...), after the plain fields."""
    for spec in METHODS.values():
        section = spec.settings_class()
        cls.__annotations__[spec.name] = section
        setattr(cls, spec.name, field(default_factory=section))
    return cls


@dataclass
@_method_sections
class TrainSettings(ConfigBase):
    KIND = "train"
    VERSION = 1

    # -- what and where -------------------------------------------------------------------------------
    method: str = setting("lora", "training method", choices=list(METHODS), group="run")
    model: str = setting("", "base model file; empty = the host's loaded model (standalone: the toy model)",
                         group="run")
    data: str = setting("", "dataset folder: `N_name class` repeats folders, or a folder of pictures with "
                            ".txt captions", group="run")
    reg_data: str = setting("", "regularization (class) pictures folder; empty = none", group="run")
    caption_ext: str = setting(".txt", "caption sidecar extension", group="run", advanced=True)
    output: str = setting("", "output folder; empty = the host's folder for this kind of file", group="run")
    name: str = setting("my-lora", "output name: files are NAME.safetensors, NAME-000004.safetensors ... (a "
                        "typed extension such as .safetensors is dropped)", group="run", normalize=drop_model_suffix)
    overwrite: bool = setting(False, "allow replacing existing output files of the same name", group="run")
    seed: int = setting(42, "random seed for data order, noise and dropout", minimum=0, maximum=MAX_SEED,
                        group="run")

    # -- data -----------------------------------------------------------------------------------------
    resolution: int = setting(0, "training resolution (pixels); buckets keep about this area. 0 = the model's "
                                 "native size (SD1 512, SD2-v 768, SDXL 1024, the toy model 64)", minimum=0,
                              maximum=MAX_PICTURE_SIDE, step=64, group="data")
    enable_buckets: bool = setting(True, "aspect-ratio buckets instead of square crops", group="data")
    min_bucket: int = setting(0, "smallest bucket side; 0 = half the resolution (256 at 512)", minimum=0, step=64,
                              group="data", advanced=True)
    max_bucket: int = setting(0, "largest bucket side; 0 = twice the resolution (1024 at 512)", minimum=0,
                              step=64, group="data", advanced=True)
    prompt_template: str = setting(
        "", "A1111's prompt templates: each picture's prompt is a random line of the template, with [name] "
            "replaced by the embedding's token or the run's name and [filewords] by the picture's caption. A "
            "built-in template (subject, subject_filewords, style, style_filewords) or a template .txt file; "
            "empty = the captions as they are (embedding, hypernetwork and LoRA runs)", group="data")
    bucket_no_upscale: bool = setting(False, "never upscale small pictures into a bucket", group="data",
                                      advanced=True)
    flip_aug: bool = setting(False, "mirror each picture left-right at random (half the time) whenever it is "
                                    "used; a cached run keeps both latents. Leave off when left and right differ "
                                    "in the concept (writing, logos, a parting on one side) or when captions say "
                                    "left or right (the run warns), unless flip_swap_sides is on", group="data")
    flip_swap_sides: bool = setting(False, "with flip_aug: a mirrored picture's caption says right where it said "
                                           "left and left where it said right (also leftmost, rightward...), so it "
                                           "still describes the picture; every such word is swapped, 'right' "
                                           "meaning 'correct' too", group="data")
    masked_loss: bool = setting(False, "the alpha channel of pictures with transparency weights their loss (0 = "
                                       "not trained, 0.5 = half, colours kept where alpha is above 0; A1111's "
                                       "'use PNG alpha channel as loss weight', kohya's masked_loss). Mask files "
                                       "weigh instead where there are some: OneTrainer's '<name>-masklabel.png' "
                                       "beside the picture, or mask_dir", group="data")
    masked_loss_normalize: bool = setting(False, "with masked_loss: each picture's loss is averaged over its "
                                                 "weighted area instead of the whole picture, so a small masked "
                                                 "subject trains as hard as a large one and as an unmasked picture "
                                                 "(OneTrainer's 'normalize masked area loss')", group="data",
                                          advanced=True)
    mask_dir: str = setting("", "with masked_loss: a folder of loss masks, kohya's layout: a picture of the same "
                                "name (white = trained, black = not, grey = partly; the red channel is read), in "
                                "the same sub-folder as in the dataset or at the top (the top serves instance pictures "
                                "only; class pictures take masks from their own sub-folder); empty = none",
                            group="data")
    validation_split: float = setting(0.0, "share of each instance folder's pictures held out of training to "
                                           "measure a validation loss (fixed noise levels and noise, so it moves "
                                           "only with the weights; a rise after its lowest point warns of "
                                           "over-training; kohya's validation_split); 0 = off", minimum=0.0,
                                      maximum=0.5, group="data")
    validation_every_n_steps: int = setting(0, "measure the validation loss every N steps; 0 = at the end of "
                                               "every epoch (and always at the end)", minimum=0, group="data",
                                            advanced=True)
    shuffle_tags: bool = setting(False, "shuffle comma-separated caption tags each time", group="data")
    keep_tokens: int = setting(0, "tags kept in place at the start when shuffling (e.g. the trigger)",
                               minimum=0, group="data")
    caption_dropout: float = setting(0.0, "probability of training a sample with an empty caption", minimum=0.0,
                                     maximum=1.0, group="data")
    tag_dropout: float = setting(0.0, "probability of dropping each tag", minimum=0.0, maximum=1.0,
                                 group="data", advanced=True)
    caption_prefix: str = setting("", "text put before every caption (e.g. the trigger token)", group="data",
                                  advanced=True)
    caption_suffix: str = setting("", "text put after every caption", group="data", advanced=True)
    keep_tokens_separator: str = setting("", "shuffling keeps the text before this marker in place (kohya's "
                                              "keep_tokens_separator, e.g. '|||')", group="data", advanced=True)
    caption_wildcards: bool = setting(False, "captions may hold several lines (one is picked) and {a|b} choices",
                                      group="data", advanced=True)
    caption_dropout_every_n_epochs: int = setting(0, "drop all captions every N-th epoch; 0 = off", minimum=0,
                                                  group="data", advanced=True)
    cache_latents: bool = setting(True, "encode every picture once with the VAE and reuse the latents",
                                  group="data")
    cache_latents_to_disk: bool = setting(False, "also keep the latent cache on disk between runs",
                                          group="data", advanced=True)

    # -- steps ----------------------------------------------------------------------------------------
    batch_size: int = setting(1, "pictures per batch", minimum=1, maximum=1024, group="steps")
    grad_accum: int = setting(1, "batches per optimizer step (effective batch = batch × this)", minimum=1,
                              group="steps")
    epochs: int = setting(10, "passes over the dataset (each picture × its repeats per pass)", minimum=1,
                          group="steps")
    max_steps: int = setting(0, "stop after this many optimizer steps; 0 = run all epochs", minimum=0,
                             group="steps")

    # -- optimisation ---------------------------------------------------------------------------------
    learning_rate: float = setting(1e-4, "base learning rate", minimum=0.0, group="optim")
    unet_lr: float | None = setting(None, "UNet learning rate; empty = learning_rate", minimum=0.0, group="optim")
    text_encoder_lr: float | None = setting(None, "text-encoder learning rate; empty = learning_rate",
                                            minimum=0.0, group="optim")
    lr_scheduler: str = setting("constant", "learning-rate schedule", choices=list(SCHEDULES), group="optim")
    lr_warmup_steps: int = setting(0, "steps of linear warmup from 0", minimum=0, group="optim")
    lr_cycles: float = setting(1.0, "cosine: half-waves ×2 / restarts: number of cycles", minimum=0.0,
                               maximum=1000.0, group="optim", advanced=True)
    lr_power: float = setting(1.0, "polynomial schedule power (at 1e300 the rate was 0 from the second step)",
                              minimum=0.0, maximum=100.0, group="optim", advanced=True)
    optimizer: str = setting("adamw", "optimizer (8-bit ones need bitsandbytes, prodigy needs prodigyopt)",
                             choices=list(OPTIMIZERS), group="optim")
    weight_decay: float = setting(0.01, "weight decay (Lion takes 3-10 times AdamW's; at 1e300 the first step "
                                        "made the weights NaN)", minimum=0.0, maximum=10.0, group="optim",
                                  advanced=True)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this; 0 = no clipping", minimum=0.0,
                                   group="optim")
    min_snr_gamma: float = setting(0.0, "min-SNR-γ loss weighting (5 is common); 0 = off", minimum=0.0,
                                   group="optim")
    loss_type: str = setting("l2", "loss: l2 (squared error, the standard), l1, or huber / smooth_l1 (scheduled "
                                   "pseudo-Huber: squared for small errors, linear for large ones, so a few odd "
                                   "pictures pull less; kohya's loss_type)", choices=list(LOSS_TYPES),
                             group="optim", advanced=True)
    huber_schedule: str = setting("snr", "huber / smooth_l1: how the threshold follows the noise level (snr: "
                                         "near l2 on nearly clean latents, near l1 on the noisiest; exponential; "
                                         "constant)", choices=list(HUBER_SCHEDULES), group="optim", advanced=True)
    huber_c: float = setting(0.1, "huber / smooth_l1: the threshold (its value at the noisiest step for snr "
                                  "and exponential), above 0 and at most 1", minimum=0.0, maximum=1.0,
                             group="optim", advanced=True)
    huber_scale: float = setting(1.0, "huber / smooth_l1: multiplies the exponential and constant thresholds",
                                 minimum=0.0, maximum=100.0, group="optim", advanced=True)
    noise_offset: float = setting(0.0, "noise offset (0.05–0.1 helps very dark/bright pictures); 0 = off",
                                  minimum=0.0, maximum=1.0, group="optim")
    noise_offset_random_strength: bool = setting(False, "with noise_offset: each step's offset is drawn between 0 "
                                                        "and noise_offset (kohya's noise_offset_random_strength)",
                                                 group="optim", advanced=True)
    adaptive_noise_scale: float = setting(0.0, "with noise_offset: add this times the latent's mean brightness "
                                               "(per picture and channel) to the offset, so pictures far from "
                                               "mid-grey get more (kohya's adaptive_noise_scale, about "
                                               "noise_offset / 10); 0 = off", minimum=-1.0, maximum=1.0,
                                          group="optim", advanced=True)
    zero_terminal_snr: bool = setting(False, "rescale the noise schedule so its last step is pure noise (kohya's "
                                             "zero_terminal_snr); for v-prediction models only, which must then "
                                             "be sampled with the same schedule (A1111: the 'Zero Terminal SNR' "
                                             "noise schedule); the run's control pictures are drawn with it",
                                             group="optim", advanced=True)
    multires_noise_iterations: int = setting(0, "multi-resolution (pyramid) noise levels added to the noise "
                                                "(6-10 is usual; it teaches large changes of light and colour); "
                                                "0 = off", minimum=0, maximum=32, group="optim", advanced=True)
    multires_noise_discount: float = setting(0.3, "multi-resolution noise: the weight of each coarser level "
                                                  "relative to the one before", minimum=0.0, maximum=1.0,
                                             group="optim", advanced=True)
    ip_noise_gamma: float = setting(0.0, "input perturbation: extra noise in the model's input, not in its "
                                         "target (0.1 is usual); 0 = off", minimum=0.0, maximum=1.0,
                                    group="optim", advanced=True)
    ip_noise_gamma_random_strength: bool = setting(False, "with ip_noise_gamma: each step's perturbation is drawn "
                                                          "between 0 and ip_noise_gamma (kohya's "
                                                          "ip_noise_gamma_random_strength)", group="optim",
                                                   advanced=True)
    debiased_estimation_loss: bool = setting(False, "weigh each step's loss by 1/√SNR (v-models: 1/(SNR+1)), so "
                                                    "the nearly clean steps count less", group="optim",
                                             advanced=True)
    adapter_ema: bool = setting(False, "keep an exponential moving average of the trained weights and save it "
                                       "instead of the last weights (LoRA, embedding, hypernetwork; the fine-tune "
                                       "has its own ema setting). It smooths the noise of the last steps; after a "
                                       "schedule that decays to 0 it changes little", group="optim", advanced=True)
    adapter_ema_decay: float = setting(0.999, "adapter_ema: the decay per step (0.999 averages about the last "
                                              "1,000 steps; it warms up from 0, so short runs average less)",
                                       minimum=0.0, maximum=1.0, group="optim", advanced=True)
    prior_loss_weight: float = setting(1.0, "loss weight of regularization (class) pictures", minimum=0.0,
                                       maximum=100.0, group="optim")
    min_timestep: int = setting(0, "train on noise levels from this timestep up (0-999; 0 = all). Raising it "
                                   "skips the nearly clean steps that draw fine detail", minimum=0, maximum=999,
                                group="optim", advanced=True)
    max_timestep: int = setting(1000, "train on noise levels below this timestep (1-1000; 1000 = all). Lowering "
                                      "it skips the noisiest steps that decide layout and colour, for a concept "
                                      "made of texture or detail", minimum=1, maximum=1000, group="optim",
                                advanced=True)

    # -- speed and memory -----------------------------------------------------------------------------
    mixed_precision: str = setting("no", "compute precision: fp16 (with loss scaling), bf16 or no (fp32); "
                                         "trained weights always stay fp32", choices=["no", "fp16", "bf16"],
                                   group="speed")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, "
                                                  "about 30% slower", group="speed")
    attention: str = setting("sdpa", "attention kernel: sdpa (torch's fused attention), xformers (needs the "
                                      "xformers package, CUDA) or math (plain, the reference); the WebUI keeps "
                                      "its own choice", choices=["sdpa", "xformers", "math"], group="speed",
                             advanced=True)
    cache_text_encoder_outputs: str = setting("auto", "encode each caption once when the text encoder is not "
                                                      "trained (and move it off the GPU when captions never "
                                                      "change); auto = on for SDXL",
                                              choices=["auto", "on", "off"], group="speed")
    vae_precision: str = setting("auto", "VAE precision: auto = fp32 for SDXL (its VAE gives NaN/black in fp16), "
                                         "fp32, or model (as loaded)", choices=["auto", "fp32", "model"],
                                 group="speed", advanced=True)
    channels_last: bool = setting(False, "UNet in channels-last memory layout (often faster convolutions on "
                                         "tensor-core GPUs)", group="speed", advanced=True)
    torch_compile: bool = setting(False, "compile the UNet with torch.compile (slow first steps per bucket size; "
                                         "needs torch >= 2.2, triton on CUDA)", group="speed", advanced=True)
    compile_backend: str = setting("inductor", "torch.compile backend", choices=["inductor", "aot_eager", "eager",
                                                                                 "cudagraphs"],
                                   group="speed", advanced=True)
    optimizer_kernel: str = setting("auto", "AdamW implementation: auto (torch's choice), foreach, fused (one "
                                            "kernel) or for-loop; same results", choices=["auto", "foreach", "fused",
                                                                                          "for-loop"],
                                    group="speed", advanced=True)
    ddp_find_unused_parameters: str = setting("auto", "DDP: look for trained tensors a step did not use (auto: "
                                                      "when the text encoder or extra tensors are trained)",
                                              choices=["auto", "on", "off"], group="speed", advanced=True)
    distributed: str = setting("ddp", "several processes (torchrun / accelerate launch): ddp = every GPU holds the "
                                      "whole model, gradients averaged (DistributedDataParallel); fsdp = the "
                                      "trained weights, their gradients and optimizer state are split across the "
                                      "GPUs (torch fully_shard, torch >= 2.6; dreambooth and finetune only). One "
                                      "process: no effect", choices=["ddp", "fsdp"], group="speed", advanced=True)

    # -- saving ---------------------------------------------------------------------------------------
    save_every_n_epochs: int = setting(1, "save after every N-th epoch (N, 2N, ...); 0 = only at the end", minimum=0,
                                       group="save")
    save_from_epoch: int = setting(1, "no epoch saves before this epoch", minimum=1, group="save")
    save_every_n_steps: int = setting(0, "also save every N steps; 0 = off", minimum=0, group="save")
    keep_last: int = setting(0, "keep only the last K intermediate saves of this run; 0 = keep all", minimum=0,
                             group="save")
    save_state: bool = setting(True, "keep a resumable state (optimizer, step, data order) with the saves",
                               group="save")
    resume: str = setting("", "resume a stopped run: its run folder (…/runs/NAME) or that folder's state/",
                          group="save")
    start_from: str = setting("", "a saved file of this method to train further (kohya's network_weights; "
                                  "A1111's training of an existing embedding or hypernetwork): a LoRA of the "
                                  "same type and dim, an embedding with the same vector count, a hypernetwork "
                                  "with the same structure. Its weights are the start; optimizer and step start "
                                  "afresh (resume continues a run exactly). Empty = a fresh start",
                              group="save")

    # -- monitoring -----------------------------------------------------------------------------------
    sample_prompts: list[str] = setting([], "set A: prompts with the concept; should converge (separate with "
                                            "commas on the command line)", group="monitor")
    control_prompts: list[str] = setting([], "set B: class prompts without the trigger; must not change "
                                             "(bleeding check)", group="monitor")
    sample_every_n_epochs: int = setting(1, "render control pictures every N epochs; 0 = off", minimum=0,
                                         group="monitor")
    sample_every_n_steps: int = setting(0, "render control pictures every N steps; 0 = off", minimum=0,
                                        group="monitor")
    sample_seed: int = sampling_setting("seed", 1234, "seed of the control pictures (fixed, so pictures are "
                                        "comparable)", group="monitor")
    sample_steps: int = sampling_setting("steps", help="sampling steps for control pictures", group="monitor")
    sample_cfg: float = sampling_setting("cfg_scale", help="guidance scale for control pictures", group="monitor")
    sample_sampler: str = sampling_setting("sampler", help="sampler for control pictures", any_host_sampler=True,
                                           group="monitor")
    sample_size: int = setting(0, "control picture size; 0 = the training resolution", minimum=0,
                               maximum=MAX_PICTURE_SIDE, step=8, group="monitor")
    tensorboard: bool = setting(True, "write TensorBoard event files (needs tensorboardX or tensorboard)",
                                group="monitor")
    stop_on_divergence: bool = setting(True, "stop when the loss becomes NaN/inf or rises fast, keeping the "
                                             "last good save", group="monitor")

    if TYPE_CHECKING:
        lora: LoraSettings
        dreambooth: DreamboothSettings
        finetune: FinetuneSettings
        embedding: EmbeddingSettings
        hypernetwork: HypernetworkSettings

    def validate(self) -> None:
        super().validate()
        if 0 < self.resolution < 64:
            raise UserError(f"resolution {self.resolution} is below 64 px (0 = the model's native size)")
        if self.min_bucket and self.max_bucket and self.min_bucket > self.max_bucket:
            raise UserError("min_bucket cannot be larger than max_bucket")
        if self.loss_type in HUBER_LOSSES and not (self.huber_c > 0 and self.huber_scale > 0):
            raise UserError(f"huber_c ({self.huber_c}) and huber_scale ({self.huber_scale}) must be above 0 for "
                            f"loss_type {self.loss_type}")
        if self.min_timestep >= self.max_timestep:
            raise UserError(f"min_timestep ({self.min_timestep}) must be below max_timestep ({self.max_timestep}): "
                            "training draws its noise levels from min_timestep to max_timestep - 1")
        check_rates(self)   # a rate far above any the optimizer can use (1e300 ran until the divergence guard)
        check_name(self.name, "output name")
        from ..data.scan import normalize_ext

        normalize_ext(self.caption_ext)   # never a picture or model extension
        METHODS[self.method].method_class().check_run(self)   # e.g. embedding: the output name is the token
        if self.adapter_ema and self.method in ("dreambooth", "finetune"):
            own = ("finetune keeps its own average of the model's weights: its ema setting" if self.method ==
                   "finetune" else "Dreambooth has no weight average (the finetune method's ema setting has one)")
            raise UserError(f"adapter_ema is for LoRA, embedding and hypernetwork runs; {own}")
        if self.adapter_ema and not 0.0 < self.adapter_ema_decay < 1.0:
            raise UserError(f"adapter_ema_decay must be between 0 and 1 (exclusive), got {self.adapter_ema_decay}")
        if (self.noise_offset_random_strength or self.adaptive_noise_scale) and not self.noise_offset:
            raise UserError("noise_offset_random_strength and adaptive_noise_scale change the noise offset: set "
                            "noise_offset above 0 first")
        if self.ip_noise_gamma_random_strength and not self.ip_noise_gamma:
            raise UserError("ip_noise_gamma_random_strength draws the perturbation up to ip_noise_gamma: set "
                            "ip_noise_gamma above 0 first")
        if self.flip_swap_sides and not self.flip_aug:
            raise UserError("flip_swap_sides changes the captions of mirrored pictures: it needs flip_aug on")
        if self.masked_loss_normalize and not self.masked_loss:
            raise UserError("masked_loss_normalize changes how the loss masks weigh: it needs masked_loss on")
        if self.mask_dir and not self.masked_loss:
            raise UserError("mask_dir is read only with masked_loss on: turn masked_loss on, or clear mask_dir")
        if self.start_from and self.method in ("dreambooth", "finetune"):
            raise UserError(f"start_from is for LoRA, embedding and hypernetwork files; {self.method} trains the "
                            "model itself: give the checkpoint to continue from as the model")
        if self.distributed == "fsdp":
            reason = METHODS[self.method].method_class().fsdp_refusal()
            if reason:
                raise UserError(reason)
        check_name(self.name, "output name" if self.method != "embedding" else "embedding token")

