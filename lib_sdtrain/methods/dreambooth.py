"""Dreambooth: teach the model a subject by training its own weights, with prior preservation.

Dreambooth (Ruiz et al. 2022) trains the whole UNet (and optionally the text encoder) on a few instance
pictures captioned with a rare token plus the class ("a photo of zwx dog"). Prior preservation trains at the
same time on class pictures the model itself drew from the class prompt ("a photo of a dog"), weighted by
`prior_loss_weight`, so that the class keeps its variety and the subject does not show up unprompted
("bleeding", training guide).

How it maps onto the loop:
  - before the data scan, `prepare_data` makes sure the class folder holds `num_class_images` pictures:
    missing ones are drawn with the host's own model and sampler (`classgen`: resumable, progress
    events, honours the StopToken), and the folder becomes the run's `reg_data`. Pictures already in the
    folder count, so a folder of the user's own class pictures is used as it is;
  - the loop weights class samples by `prior_loss_weight` (TrainSettings) and cycles them to balance the
    instance samples, as kohya does;
  - `instance_prompt`, when set, is the caption of every instance picture, and `class_prompt` that of every
    class picture (diffusers' example does the same); otherwise captions come from the dataset as usual.
The weights are trained and saved by `fullmodel.FullModelMethod`: one single-file checkpoint in A1111's
layout in the checkpoint folder, beside the base model.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigBase, setting
from ..errors import UserError
from ..sample_settings import MAX_SEED
from .fullmodel import SAVE_PRECISIONS, TRAIN_BLOCKS_HELP, FullModelMethod, parse_train_blocks


@dataclass
class DreamboothSettings(ConfigBase):
    """Settings of Dreambooth (the `[dreambooth]` section of a training config)."""

    KIND = "dreambooth"
    VERSION = 1

    instance_prompt: str = setting(
        "", "caption of every instance picture, e.g. \"a photo of zwx dog\" (a rare token + the class); empty = "
        "the dataset's own captions", group="dreambooth")
    class_prompt: str = setting(
        "", "prior preservation: the class without the token, e.g. \"a photo of a dog\"; missing class pictures "
        "are drawn with it, and it captions every class picture. Empty = no class pictures drawn",
        group="dreambooth")
    class_data: str = setting(
        "", "folder of class (regularization) pictures; missing ones are drawn into it. Empty = reg_data, or a "
        "folder per class prompt under the host's class-picture folder", group="dreambooth")
    num_class_images: int = setting(
        100, "class pictures wanted (usually 20-100x the instance pictures); pictures already in the folder "
        "count", minimum=0, maximum=100000, group="dreambooth")
    class_negative_prompt: str = setting("", "negative prompt for drawing class pictures", group="dreambooth",
                                         advanced=True)
    class_seed: int = setting(0, "seed of the first class picture (picture i uses seed + i)", minimum=0,
                              maximum=MAX_SEED, group="dreambooth", advanced=True)
    train_text_encoder: bool = setting(
        True, "also train the text encoder(s) fully (better likeness, more memory; use a lower text-encoder "
        "learning rate, e.g. half)", flag="--dreambooth-train-text-encoder", group="dreambooth")
    train_blocks: str = setting("all", TRAIN_BLOCKS_HELP, flag="--dreambooth-train-blocks", group="dreambooth",
                                advanced=True)
    save_precision: str = setting(
        "fp16", "precision of the saved checkpoint (fp16 = half the size, what A1111 runs anyway)",
        choices=list(SAVE_PRECISIONS), flag="--dreambooth-save-precision", group="dreambooth")
    export_diffusers: bool = setting(
        False, "also write the final model as a diffusers folder (in the run folder)",
        flag="--dreambooth-export-diffusers", group="dreambooth", advanced=True)

    def validate(self) -> None:
        super().validate()
        parse_train_blocks(self.train_blocks)


def class_folder_name(prompt: str) -> str:
    """A folder name for a class prompt: its words, then 8 hex of the prompt (different prompts never meet)."""
    words = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:48] or "class"
    return f"{words}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:8]}"


def _pictures(folder: Path) -> list[Path]:
    from ..data.scan import is_picture

    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_picture(p))


class DreamboothMethod(FullModelMethod):
    """Dreambooth with prior preservation (see the module docstring)."""

    name = "dreambooth"

    def __init__(self, settings: DreamboothSettings | None = None) -> None:
        super().__init__(settings if settings is not None else DreamboothSettings())

    def prepare_data(self, cfg: Any, host: Any, events: Any, stop: Any) -> Any:
        """Fill the class folder (drawing missing pictures with the host's model) and make it the reg data."""
        from ..classgen import class_image_name, generate_class_images

        cfg = super().prepare_data(cfg, host, events, stop)
        s = self.settings
        if not (s.class_prompt.strip() or s.class_data):
            return cfg   # no prior preservation asked for (reg_data, if given, still works as usual)
        if cfg.prior_loss_weight == 0:
            events.warning("prior_loss_weight is 0: class pictures would not count, so none are drawn or used")
            return cfg
        if s.class_data and cfg.reg_data and Path(s.class_data).resolve() != Path(cfg.reg_data).resolve():
            raise UserError(f"class_data ({s.class_data}) and reg_data ({cfg.reg_data}) name different folders; "
                            "give one of them")
        if s.class_data or cfg.reg_data:
            folder = Path(s.class_data or cfg.reg_data).expanduser()
        elif s.class_prompt.strip():
            folder = Path(host.output_dir("class")) / class_folder_name(s.class_prompt.strip())
        if folder.exists() and not folder.is_dir():
            raise UserError(f"class folder {folder} is a file")
        size = cfg.resolution
        draw = dict(negative=s.class_negative_prompt, width=size, height=size, steps=cfg.sample_steps,
                    sampler=cfg.sample_sampler, cfg_scale=cfg.sample_cfg)
        prompt = s.class_prompt.strip()
        left_out = 0
        if prompt and s.num_class_images:
            ours = class_image_name(prompt, 0, **draw).rsplit("-", 1)[0] + "-"
            others = [p for p in _pictures(folder) if not p.name.startswith(ours)]
            count = max(0, s.num_class_images - len(others))
            missing = [i for i in range(count)
                       if not (folder / class_image_name(prompt, s.class_seed + i, **draw)).is_file()]
            if missing:
                events.status(f"drawing {len(missing)} class pictures of \"{prompt}\" into {folder}")
                parts = host.load(cfg.model or None)
                try:
                    result = generate_class_images(host, parts, prompt, count, folder, seed=s.class_seed,
                                                   events=events, stop=stop, batch_size=cfg.batch_size, **draw)
                finally:
                    host.release(parts)
                    del parts
                if result.stopped:
                    return cfg
                left_out = result.left_out
        found = len(_pictures(folder))
        if found == 0:
            raise UserError(f"no class pictures in {folder}: give a class_prompt to draw them, or fill the folder")
        if found < s.num_class_images:
            why = (f"{left_out} skipped while drawing (the WebUI's Skip), drawn by the next run" if left_out else
                   "no class prompt to draw the rest")
            events.warning(f"{found} class pictures in {folder}, fewer than the {s.num_class_images} asked for "
                           f"({why})")
        return cfg.replace(reg_data=str(folder))

    def prepare_records(self, records: list) -> None:
        """Instance / class prompts replace the captions of instance / class pictures when set."""
        s = self.settings
        for r in records:
            prompt = s.class_prompt.strip() if r.is_regularization else s.instance_prompt.strip()
            if prompt:
                r.caption, r.caption_source = prompt, "class_prompt" if r.is_regularization else "instance_prompt"
