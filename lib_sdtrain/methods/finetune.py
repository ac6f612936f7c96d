"""Full fine-tuning, EveryDream style: caption-driven training of the model's own weights on many concepts.

Unlike Dreambooth there is no instance token and no class prompt: every picture is trained on its own caption
(full sentences or tags), over datasets of thousands of pictures, and the model learns all of them at once
(training guide, "Full Fine-Tuning"). What can be chosen is which weights train (`train_blocks`, e.g. only the
up blocks or only attention, for less memory and less forgetting), whether the text encoder trains, and an
EMA of the weights, which smooths the noise of long runs and is what gets saved when on.

Memory: the trained modules are float32 while training; gradient checkpointing (TrainSettings) and the 8-bit
optimizers (with bitsandbytes) are the usual savings, `ema_on_cpu` keeps the EMA copy out of GPU memory.
Training, restoring and saving are `fullmodel.FullModelMethod`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigBase, setting
from ..errors import UserError
from .fullmodel import SAVE_PRECISIONS, TRAIN_BLOCKS_HELP, FullModelMethod, parse_train_blocks


@dataclass
class FinetuneSettings(ConfigBase):
    """Settings of full fine-tuning (the `[finetune]` section of a training config)."""

    KIND = "finetune"
    VERSION = 1

    train_blocks: str = setting("all", TRAIN_BLOCKS_HELP, flag="--finetune-train-blocks", group="finetune")
    train_text_encoder: bool = setting(
        False, "also train the text encoder(s) (EveryDream trains it at about half the UNet rate; needs more "
        "memory)", flag="--finetune-train-text-encoder", group="finetune")
    ema: bool = setting(False, "keep an exponential moving average of the weights and save it instead of the "
                        "raw weights (smoother results on long runs; one more copy of the trained weights)",
                        group="finetune")
    ema_decay: float = setting(0.999, "EMA decay per step (0.999 ≈ averages the last ~1000 steps; warms up from "
                               "0 over the first steps)", minimum=0.0, maximum=1.0, group="finetune")
    ema_on_cpu: bool = setting(False, "keep the EMA copy in CPU memory (saves GPU memory, slower steps)",
                               group="finetune", advanced=True)
    save_precision: str = setting(
        "fp16", "precision of the saved checkpoint (fp16 = half the size, what A1111 runs anyway)",
        choices=list(SAVE_PRECISIONS), flag="--finetune-save-precision", group="finetune")
    export_diffusers: bool = setting(
        False, "also write the final model as a diffusers folder (in the run folder)",
        flag="--finetune-export-diffusers", group="finetune", advanced=True)

    def validate(self) -> None:
        super().validate()
        parse_train_blocks(self.train_blocks)
        if self.ema and not 0.0 < self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be between 0 and 1 (exclusive), got {self.ema_decay}")


class FinetuneMethod(FullModelMethod):
    """Full fine-tuning (see the module docstring)."""

    name = "finetune"

    def __init__(self, settings: FinetuneSettings | None = None) -> None:
        super().__init__(settings if settings is not None else FinetuneSettings())
