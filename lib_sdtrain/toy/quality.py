"""Train a method on a toy concept and measure what it learned, with 95 % intervals (bench/quality.py, demo).

One quality run:
1. writes the concept dataset (`datasets.make_subject_dataset` / `make_style_dataset`, plus class pictures when
   the method's defaults or the settings ask for them) under the work folder;
2. measures the base model once on three fixed prompt sets (see `prompt_sets`): concept prompts WITH the token,
   the same scenes' class prompts WITHOUT it, and plain-world prompts; every set is prompts x seeds
   (default 96 prompts x 1 seed = 96 samples per figure: on the toy model two seeds of one prompt draw
   nearly the same picture, so different prompts are the independent samples);
3. trains with the project's one loop (`train.loop.train`, `loop="ours"`) or with an independent plain
   diffusers + peft loop (`loop="reference"`, LoRA only, `toy.reference`), saving at `curve` evenly spaced steps;
4. puts every save on the base model and measures it the same way (same prompts, same seeds);
5. scores every picture with the shipped detector (concept present = detector probability >= 0.5).

Figures (each with its 95 % interval; `toy.stats` says how each is computed):
- fidelity: share of token-prompt samples showing the concept (Wilson);
- fidelity_of_ceiling: fidelity / ceiling, where the ceiling is the share of clean pictures of the same scenes
  that still show the concept after the model's own VAE encode -> decode (no method can draw more than its
  VAE lets through); interval by bootstrap;
- binding: P(concept | token prompt) - P(concept | the same prompt with the class word instead), after
  training: is the concept tied to its token? (Newcombe, paired: same scene and seed);
- bleeding: share of class-prompt samples showing the concept after training minus before (Newcombe, paired);
- effect: fidelity after minus before (Newcombe, paired): did training change anything at all?
- retention: plain-world accuracy after / before, accuracy = mean of colour and shape hits per sample
  (paired bootstrap).
Each save gives one point of the curve; `best_step` is the save with the highest binding.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UserError
from ..events import Events, StopToken
from . import world
from .stats import Interval, bootstrap_ratio, paired_difference, share

CONCEPTS = ("subject", "style")
LOOPS = ("ours", "reference")
CLASS_PICTURES = ("", "none", "world")
CLASS_CAPTIONS = ("", "generic", "full", "mixed")

# Per-method training defaults for the toy concepts (the toy model is tiny: rates are higher than for SD).
# Keys are TrainSettings fields, "<section>.<field>" for the method's own section, or "class_pictures"
# ("world": a class set of plain toy pictures captioned with the class word, as reg_data; "none").
# Chosen from the measured curves in bench/README.md ("Tuning").
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"learning_rate": 2e-3, "max_steps": 300, "batch_size": 4, "class_pictures": "world",
             "lora.network_dim": 8, "lora.network_alpha": 8.0, "lora.train_text_encoder": False},
    "embedding": {"learning_rate": 5e-2, "max_steps": 300, "batch_size": 4, "class_pictures": "none"},
    "hypernetwork": {"learning_rate": 1e-3, "max_steps": 300, "batch_size": 4, "class_pictures": "none"},
    "dreambooth": {"learning_rate": 2e-4, "max_steps": 300, "batch_size": 4, "class_pictures": "world"},
    "finetune": {"learning_rate": 2e-4, "max_steps": 300, "batch_size": 4, "class_pictures": "none"},
}
# Per concept, on top of METHOD_DEFAULTS (the style is shown on many pictures, the subject on few).
# Class-picture captions: the subject's class pictures say the class word (prior for "shape"), the style's their
# own shape (the same scenes without the style).
CONCEPT_DEFAULTS: dict[str, dict[str, Any]] = {"subject": {"class_captions": "generic"},
                                               "style": {"class_captions": "full"}}
DATASET_DEFAULTS: dict[str, dict[str, int]] = {"subject": {"images": 12, "repeats": 10},
                                               "style": {"images": 24, "repeats": 5}}
# Per (method, concept), on top of both: settings and concept pictures ("images", "repeats") one method's measured
# defaults need for one concept. The LoRA ties the subject to its token only when the heart is shown in many
# scenes: with 12 pictures it ties the heart to their 12 captions instead (bench/README.md, "Why the LoRA does
# not bind"). The style needs the same many pictures, and binds once its words stand in front of the caption
# (world.caption: with "in zkz style" at the end a UNet LoRA bound +0.08, a text-encoder LoRA was needed for
# +0.38; in front the UNet LoRA alone binds +0.62 at 1,800 steps with a cosine decay; bench/README.md, "The style
# words in front"). The subject's class pictures are captioned half with the class word, half with their own
# shape words ("mixed"): with the class word alone the LoRA kept 0.77 of the plain world at 600 steps, with mixed
# captions 0.93 at 900-1200 steps, binding as high or higher (bench/README.md, "Retention"). On toy model v2.1 the
# subject LoRA learns with the token in front of its captions, a cosine decay and min-SNR weighting (gamma 5):
# fidelity 0.82-0.86 at 600-1,200 steps, bleeding 0.00, where the token in the middle and a constant rate gave
# 0.65 and +0.18 (bench/README.md, "Toy model v2.1: the subject token in front, min-SNR"). The style needs twice
# the rate on v2.1 (2e-3: 0.32 with the token; 4e-3 with min-SNR: 0.54, retention 0.82; over seeds 0-3 0.57).
# Class pictures weighted 4 read 0.65 / 0.80 on seeds 0 / 1 but 0.60 over seeds 0-3 (+0.04 [-0.14, +0.22]), so
# the weight stays 1. The spread over seeds comes from which 96 pictures are drawn, not from the training draw;
# 384 pictures or paired class pictures (`class_paired`) narrow it but keep the mean at 0.56 (session 10).
# The subject trains batch 8 for 600 steps at 6e-3: the same pictures seen as batch 4 for 1,200 steps at 2e-3 (the
# defaults of sessions 8-14), in 1.6x less training time (a batch-8 step costs 1.3x a batch-4 step on the CPU), and
# as much learnt: at CFG 3 over training seeds 0-7, 0.84 [0.80, 0.88] against 0.81 [0.77, 0.85], +0.025 [-0.008,
# +0.057] paired by seed, strict reader +0.05 [-0.01, +0.11] (chosen on seeds 0-3, +0.01 [-0.04, +0.05]; seeds 4-7
# were run after; bench/README.md, "Session 15"). Since session 16 it trains 900 steps of batch 8: over seeds 0-7
# at CFG 3, 0.88 [0.84, 0.92] against 600 steps' 0.84 [0.80, 0.88], +0.040 [+0.008, +0.073] paired by seed (strict
# reader +0.049 [+0.003, +0.096]), 0.89 [0.84, 0.93] of the round-trip ceiling (over seeds 0-11: 0.89 [0.86, 0.92];
# a check fixed in advance on fresh seeds 12-19 read 0.862 [0.835, 0.888], session 17), in about 175 s of training
# (within the 5 minutes the bench allows). The README's main job keeps 600 steps
# (`tools/demo.sh --steps 600`) to fit its 3 minutes (bench/README.md, "Session 16").
METHOD_CONCEPT_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("lora", "subject"): {"images": 96, "repeats": 2, "max_steps": 900, "batch_size": 8, "learning_rate": 6e-3,
                          "class_captions": "mixed", "lr_scheduler": "cosine", "min_snr_gamma": 5.0},
    ("lora", "style"): {"images": 96, "repeats": 2, "max_steps": 1800, "lr_scheduler": "cosine",
                        "learning_rate": 4e-3, "min_snr_gamma": 5.0},
    # The other subject rows on the same 96 pictures x 2 (bench/README.md, "The other methods with 96 pictures"):
    # Dreambooth (192 class pictures) binds at 600 steps (it did not with 12 pictures); the hypernetwork and
    # fine-tune cannot bind (no token of their own, no class pictures) and keep more of the base world at 300 steps
    # than at 600. The embedding: 4 vectors at 300 steps read as much as 1 vector at 600 in half the training time
    # (v2.1, seeds 0-7 at CFG 7: 0.18 [0.10, 0.26] against 0.11 [0.07, 0.14], +0.07 [-0.03, +0.18] paired by seed,
    # no gain shown), and still show the heart at CFG 3 where 1 vector did not (bench/README.md, "Session 14").
    ("embedding", "subject"): {"images": 96, "repeats": 2, "max_steps": 300, "embedding.vectors": 4},
    ("dreambooth", "subject"): {"images": 96, "repeats": 2, "max_steps": 600},
    ("hypernetwork", "subject"): {"images": 96, "repeats": 2, "max_steps": 300},
    ("finetune", "subject"): {"images": 96, "repeats": 2, "max_steps": 300},
}
DATASET_KEYS = ("images", "repeats")
# The guidance scale the toy model's trained LoRAs draw best at (bench/README.md, "Session 13"): against CFG 7
# (A1111's default, and the bench's, so that every recorded table stays comparable) the same subject LoRA files read
# more hearts at CFG 3 on each of training seeds 0-7 and on fresh prompts, by the detector and the strict reader,
# and keep the plain world as well; the base model's world accuracy is the same at 3 and 7. The README's main job
# and the Train tab's toy preset sample at it.
TOY_CFG = 3.0


@dataclass
class QualitySettings:
    """One quality run. `steps`/`learning_rate` 0 and `images`/`repeats` 0 take the defaults above."""

    method: str = "lora"
    concept: str = "subject"
    model: str = ""                     # empty = the bundled toy model
    images: int = 0                     # concept pictures (0 = METHOD_CONCEPT_DEFAULTS, else DATASET_DEFAULTS)
    repeats: int = 0
    captions: str = "full"              # concept captions: full, short or token (`datasets.CAPTION_MODES`)
    class_images: int = 0               # class pictures when used (0 = max(24, 2 x images))
    class_paired: bool = False          # class pictures = the concept pictures' own scenes without the concept (same
                                        # seed, count and jitter: each instance has its plain twin); else other scenes
    background_weight: float | None = None   # concept pictures as RGBA whose alpha weights a masked_loss run:
                                        # the concept's shape (and a margin) 1, the rest this weight; None = opaque
    class_captions: str = ""            # class-picture captions: generic, full or mixed (`datasets.make_class_set`);
                                        # "" = the defaults' (CONCEPT_DEFAULTS, per method and concept)
    steps: int = 0
    learning_rate: float = 0.0
    seed: int = 0                       # dataset and training seed
    eval_seed: int = 777                # prompt and sampling seeds of the measurements
    concept_samples: int = 96           # token samples (= class samples) per figure: prompts x seeds_per_prompt
    seeds_per_prompt: int = 1           # 1: every sample its own prompt (two seeds of one prompt draw nearly the
                                        # same picture on the toy model: not independent samples)
    world_samples: int = 96             # plain-world samples (retention)
    sample_steps: int = 20
    cfg_scale: float = 7.0
    size: int = 64                      # picture side of the training pictures, the samples and the round trips;
                                        # the detector reads a 64-px copy (BOX filter) of anything larger
    curve: int = 3                      # saves measured (evenly spaced; the last is the final file)
    class_pictures: str = ""            # "" = the method's default, "none" or "world"
    loop: str = "ours"                  # "ours" (train.loop) or "reference" (plain diffusers + peft; LoRA)
    keep_samples: str = ""              # folder: keep every sampled picture (.npz) for `rescore`
    device: str = ""                    # empty = cuda when available
    train_threads: int = 0              # CPU threads while training (0 = as set); measuring keeps the process's
                                        # count: the toy model's small training steps run best on one thread, the
                                        # batched sampling of the measurements gains from two
    overrides: dict[str, Any] = field(default_factory=dict)   # extra TrainSettings / section fields

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> QualitySettings:
        """The settings a result row was run with (its `settings`, which also hold figures that are not fields)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row["settings"].items() if k in known})

    def validate(self) -> None:
        from ..methods import method_spec

        method_spec(self.method)   # UserError for a method not registered
        if self.concept not in CONCEPTS:
            raise UserError(f"unknown concept {self.concept!r}; choose subject or style")
        if self.loop not in LOOPS:
            raise UserError(f"unknown loop {self.loop!r}; choose ours or reference")
        if self.loop == "reference" and self.method != "lora":
            raise UserError("the reference loop trains LoRA only")
        if self.class_pictures not in CLASS_PICTURES:
            raise UserError(f"class_pictures must be none or world, not {self.class_pictures!r}")
        for name in ("concept_samples", "seeds_per_prompt", "world_samples", "sample_steps", "curve"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, not {value!r}")
        from .datasets import CAPTION_MODES

        if self.captions not in CAPTION_MODES:
            raise UserError(f"captions must be one of {', '.join(CAPTION_MODES)}, not {self.captions!r}")
        if self.class_captions not in CLASS_CAPTIONS:
            raise UserError(f"class_captions must be one of {', '.join(c for c in CLASS_CAPTIONS if c)} (or empty), "
                            f"not {self.class_captions!r}")
        for name in ("images", "repeats", "class_images", "train_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{name} must be a non-negative integer, not {value!r}")
        if self.concept_samples % self.seeds_per_prompt:
            raise UserError(f"concept_samples ({self.concept_samples}) must be a multiple of seeds_per_prompt "
                            f"({self.seeds_per_prompt})")
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float)) or \
                not math.isfinite(self.cfg_scale) or not 0 < self.cfg_scale <= 30:
            raise UserError(f"cfg_scale must be a number above 0 and at most 30, not {self.cfg_scale!r}")
        if self.steps < 0 or self.learning_rate < 0:
            raise UserError("steps and learning_rate must not be negative")
        from .datasets import check_background_weight

        check_background_weight(self.background_weight)
        if self.background_weight is not None and self.loop != "ours":
            raise UserError("background_weight needs masked_loss, which the reference loop does not have")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 64 or self.size % 64:
            raise UserError(f"size must be a multiple of 64 px (the detector reads 64 px), not {self.size!r}")

    def dataset(self) -> tuple[int, int]:
        d = {**DATASET_DEFAULTS[self.concept], **{k: v for k, v in self.defaults().items() if k in DATASET_KEYS}}
        return self.images or d["images"], self.repeats or d["repeats"]

    def class_set(self) -> str:
        return self.class_pictures or str(self.defaults().get("class_pictures", "none"))

    def defaults(self) -> dict[str, Any]:
        return {**METHOD_DEFAULTS.get(self.method, {}), **CONCEPT_DEFAULTS.get(self.concept, {}),
                **METHOD_CONCEPT_DEFAULTS.get((self.method, self.concept), {})}

    def train_values(self) -> dict[str, Any]:
        """The run's training values as the bench was asked for them: the defaults, then `steps` and
        `learning_rate` when given, then `overrides` (what `train_settings` applies, in that order)."""
        values = self.defaults()
        if self.steps:
            values["max_steps"] = self.steps
        if self.learning_rate:
            values["learning_rate"] = self.learning_rate
        return {**values, **dict(self.overrides)}


# ---- prompts ---------------------------------------------------------------------------------------
@dataclass
class PromptSets:
    """The fixed prompts and seeds every measurement of a run uses, before and after training.

    token_prompts[i] and class_prompts[i] show the same scene with the same seed concept_seeds[i]; only the
    token (subject: "zwx, a ..." -> "a ..."; style: "zkz style, a ..." -> "a ...") differs.
    """

    concept: str
    scenes: list[world.Scene]           # the concept scene of each sample (repeated per seed)
    token_prompts: list[str]
    class_prompts: list[str]
    concept_seeds: list[int]
    world_scenes: list[world.Scene]
    world_prompts: list[str]
    world_seeds: list[int]


def concept_scenes(concept: str, n: int, seed: int) -> list[world.Scene]:
    """`n` scenes showing the concept, other than any training scene (a different seed stream)."""
    if concept == "subject":
        from .datasets import subject_scenes

        return subject_scenes(n, seed)
    if concept == "style":
        return world.sample_scenes(n, seed, holdout="exclude", style="striped")
    raise UserError(f"unknown concept {concept!r}; choose subject or style")


def class_caption(scene: world.Scene) -> str:
    """The caption of a concept scene with the class word instead of the token."""
    if scene.is_subject:     # "a large red shape ..." (the generic caption; any base shape stands in)
        return world.Scene(world.BASE_SHAPES[0], scene.colour, scene.size, scene.position,
                           scene.background).caption(generic=True)
    return world.Scene(scene.shape, scene.colour, scene.size, scene.position, scene.background).caption()


def prompt_sets(concept: str, concept_samples: int, world_samples: int, seed: int,
                seeds_per_prompt: int = 1) -> PromptSets:
    """Concept scenes with and without the token (`concept_samples` / `seeds_per_prompt` distinct scenes,
    each with `seeds_per_prompt` seeds), and `world_samples` plain prompts with one seed each."""
    if seeds_per_prompt < 1 or concept_samples % seeds_per_prompt:
        raise UserError("concept_samples must be a positive multiple of seeds_per_prompt")
    base = concept_scenes(concept, concept_samples // seeds_per_prompt, seed + 1)
    scenes = [s for s in base for _ in range(seeds_per_prompt)]
    wscenes = world.sample_scenes(world_samples, seed + 2, holdout="exclude")
    return PromptSets(concept, scenes, [s.caption() for s in scenes], [class_caption(s) for s in scenes],
                      [seed * 1000 + i for i in range(concept_samples)], wscenes, [s.caption() for s in wscenes],
                      [seed * 1000 + 500 + i for i in range(world_samples)])


# ---- measuring ---------------------------------------------------------------------------------------
@dataclass
class Measure:
    """What one model draws for the prompt sets, scored per sample."""

    token_hits: list[bool]
    class_hits: list[bool]
    world_scores: list[float]           # per plain prompt: (colour right + shape right) / 2
    token_images: list = field(default_factory=list, repr=False)   # the first `keep` of each, for grids
    class_images: list = field(default_factory=list, repr=False)
    token_probs: list[float] = field(default_factory=list, repr=False)
    token_strict: list[bool] = field(default_factory=list, repr=False)   # subject: the strict reader's calls

    def fidelity(self) -> Interval:
        return share(self.token_hits)

    def class_share(self) -> Interval:
        return share(self.class_hits)

    def world_accuracy(self) -> float:
        return sum(self.world_scores) / len(self.world_scores)


def concept_hits(images: Sequence, concept: str, detector: Any = None) -> tuple[list[bool], list[float]]:
    """(present?, probability) per picture for the subject (heart) or the style (stripes)."""
    from .detector import default_detector

    found = (detector or default_detector()).detect(list(images))
    if concept == "subject":
        return [d.has_subject for d in found], [d.subject for d in found]
    return [d.has_style for d in found], [d.style for d in found]


def measure(parts: Any, sets: PromptSets, *, steps: int = 20, cfg_scale: float = 7.0, keep: int = 8,
            detector: Any = None, stop: Any = None, save: Path | None = None, size: int = 64) -> Measure:
    """Sample `sets` with `parts` (batched) at `size` px and score them with the detector (on 64-px copies,
    which are also what is kept). `save`: also write every picture to this .npz file (uint8 arrays `token`,
    `class`, `world`), so `score_samples` can score them again later, e.g. with another detector, without
    sampling again."""
    from .evaluate import sample_batch

    # one batched pass over all three sets: fewer, fuller UNet calls
    prompts = sets.token_prompts + sets.class_prompts + sets.world_prompts
    seeds = sets.concept_seeds + sets.concept_seeds + sets.world_seeds
    images = sample_batch(parts, prompts, seeds, steps=steps, cfg_scale=cfg_scale, size=size,
                          batch_size=96 if size == 64 else max(1, 96 * 64 * 64 // (size * size)), stop=stop)
    if len(images) < len(prompts):
        raise UserError("measurement stopped")
    from .detector import at_input_size

    images = at_input_size(images)
    n = len(sets.token_prompts)
    token, plain, wimgs = images[:n], images[n:2 * n], images[2 * n:]
    if save is not None:
        import numpy as np

        save.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(save, token=np.stack([np.asarray(i) for i in token]),
                            **{"class": np.stack([np.asarray(i) for i in plain])},
                            world=np.stack([np.asarray(i) for i in wimgs]))
    return score_measure(sets, token, plain, wimgs, keep=keep, detector=detector)


def score_measure(sets: PromptSets, token: Sequence, plain: Sequence, wimgs: Sequence, *, keep: int = 8,
                  detector: Any = None) -> Measure:
    """Score sampled pictures of `sets` (token, class-word and plain-world pictures, in the sets' order)."""
    from .detector import default_detector

    det = detector or default_detector()
    t_hits, t_probs = concept_hits(token, sets.concept, det)
    c_hits, _ = concept_hits(plain, sets.concept, det)
    found = det.detect(list(wimgs))
    wscores = [((d.colour == s.colour) + (d.shape == s.shape)) / 2 for d, s in zip(found, sets.world_scenes)]
    return Measure(t_hits, c_hits, wscores, list(token[:keep]), list(plain[:keep]), t_probs,
                   strict_calls(token, sets.concept, det))


# the figures of a row's last save that the row itself carries (a run's row and a rescored one alike)
ROW_FIGURES = ("fidelity", "fidelity_of_ceiling", "fidelity_strict", "binding", "bleeding", "effect", "retention",
               "class_share")


def strict_calls(images: Sequence, concept: str, detector: Any) -> list[bool]:
    """The strict heart reader's calls (`toy.strict`) for subject pictures scored by the shipped detector; [] for
    the style, for another detector, or when the reader's file is missing."""
    from .detector import default_detector

    if concept != "subject" or detector is not default_detector():
        return []
    from .strict import default_strict

    try:
        return default_strict().calls(list(images))
    except UserError:
        return []


def load_samples(path: str | Path) -> tuple[list, list, list]:
    """(token, class, world) pictures saved by `measure(save=...)`."""
    import numpy as np
    from PIL import Image

    with np.load(path) as z:
        return tuple([Image.fromarray(a) for a in z[k]] for k in ("token", "class", "world"))   # type: ignore


def roundtrip_ceiling(parts: Any, scenes: Sequence[world.Scene], concept: str, seed: int = 0,
                      detector: Any = None, size: int = 64) -> tuple[Interval, list[bool], list]:
    """Share of clean concept pictures of `scenes` in which the detector still sees the concept after the
    model's VAE encode -> decode (latent mean): the most any training can reach on this model.
    Returns (Wilson interval, hit per picture, the round-trip pictures at 64 px)."""
    import torch
    from PIL import Image

    from .detector import at_input_size, to_tensor

    images = world.render_scenes(list(scenes), size, seed)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            x = to_tensor(images[start:start + 64], resize=False).to(parts.device, parts.dtype)
            y = parts.decode_latents(parts.encode_images(x, mode="mean")).float().clamp(-1, 1)
            arr = ((y.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
            out += [Image.fromarray(a) for a in arr]
    out = at_input_size(out)
    hits, _ = concept_hits(out, concept, detector)
    return share(hits), hits, out


def figures(before: Measure, after: Measure, ceiling_hits: Sequence[bool] | None) -> dict[str, Any]:
    """The figures of one save against the base model (JSON-ready dicts with value, lo, hi, n, method)."""
    fid = after.fidelity()
    out: dict[str, Any] = {
        "fidelity": fid.to_dict(),
        "binding": paired_difference(after.token_hits, after.class_hits).to_dict(),
        "bleeding": paired_difference(after.class_hits, before.class_hits).to_dict(),
        "effect": paired_difference(after.token_hits, before.token_hits).to_dict(),
        "class_share": after.class_share().to_dict(),
        "world_accuracy": round(after.world_accuracy(), 4),
        "retention": (bootstrap_ratio(after.world_scores, before.world_scores, paired=True).to_dict()
                      if before.world_accuracy() > 0 else None),
    }
    if ceiling_hits and any(ceiling_hits):
        out["fidelity_of_ceiling"] = bootstrap_ratio(after.token_hits, ceiling_hits, paired=False).to_dict()
    if after.token_strict:     # the subject as a strict person reads it (toy.strict), beside the detector's
        out["fidelity_strict"] = share(after.token_strict).to_dict()
    return out


# ---- datasets and settings ---------------------------------------------------------------------------
def make_dataset(root: Path, settings: QualitySettings) -> tuple[Path, Path | None]:
    """The concept folder (and class pictures when asked for) under `root`; returns (data, reg_data)."""
    from .datasets import make_class_set, make_style_dataset, make_subject_dataset

    images, repeats = settings.dataset()
    if settings.concept == "subject":
        make_subject_dataset(root, n_images=images, repeats=repeats, seed=settings.seed, captions=settings.captions,
                             size=settings.size, background_weight=settings.background_weight)
    else:
        make_style_dataset(root, n_images=images, repeats=repeats, seed=settings.seed, captions=settings.captions,
                           size=settings.size, background_weight=settings.background_weight)
    reg = None
    if settings.class_set() == "world":
        if settings.class_paired:       # the same scenes, plain: only the concept differs between the pairs
            count, seed = images, settings.seed
        else:
            count, seed = settings.class_images or max(24, images * 2), settings.seed + 100
        make_class_set(root, n_images=count, seed=seed, size=settings.size,
                       captions=settings.class_captions or settings.defaults()["class_captions"])
        reg = root / "reg"
    return root / "img", reg


def train_settings(settings: QualitySettings, data: Path, reg: Path | None, model: Path, out: Path):
    """TrainSettings for the run: the method's toy defaults, then `settings.overrides`."""
    from ..train.settings import TrainSettings

    cfg = TrainSettings()
    values: dict[str, Any] = {
        "method": settings.method, "model": str(model), "data": str(data), "reg_data": str(reg or ""),
        "output": str(out), "name": f"quality-{settings.method}-{settings.concept}", "overwrite": True,
        "seed": settings.seed, "resolution": settings.size, "enable_buckets": False, "min_bucket": settings.size,
        "max_bucket": settings.size,
        "save_every_n_epochs": 0, "save_state": False, "tensorboard": False, "sample_every_n_epochs": 0,
        "lr_scheduler": "constant", "cache_latents": True,
        "masked_loss": settings.background_weight is not None,   # the weights are in the pictures' alpha
    }
    if settings.method == "embedding":
        token = world.SUBJECT_TOKEN if settings.concept == "subject" else world.STYLE_TOKEN
        values.update({"embedding.token": token, "embedding.init_text": "shape" if settings.concept == "subject"
                       else "style"})
    values.update({k: v for k, v in settings.train_values().items()
                   if k not in ("class_pictures", "class_captions", *DATASET_KEYS)})
    if settings.curve > 1:
        values["save_every_n_steps"] = max(1, int(values["max_steps"]) // settings.curve)
    for key, value in values.items():
        target, name = cfg, key
        if "." in key:
            section, name = key.split(".", 1)
            target = getattr(cfg, section, None)
            if target is None:
                raise UserError(f"the training settings have no section {section!r}")
        if not hasattr(target, name):
            raise UserError(f"the training settings have no field {key!r}")
        setattr(target, name, value)
    cfg.validate()
    return cfg


def _apply_file(host: Any, base_parts: Any, cfg: Any, path: Path) -> tuple[Any, Callable[[], None]]:
    """(model with the trained file applied, undo), as the method's registry entry says (`applied_as`):
    adapters: attach + method.load_weights; checkpoints: host.load."""
    from ..methods import create_method, method_spec

    if method_spec(cfg.method).applied_as == "checkpoint":
        parts = host.load(str(path))
        return parts, lambda: host.release(parts)
    method = create_method(cfg)
    import torch

    torch.manual_seed(0)
    method.attach(base_parts)
    method.load_weights(path)
    return base_parts, method.detach


# ---- the run -----------------------------------------------------------------------------------------
@dataclass
class BaseMeasure:
    """The base model's measurement and ceiling for one (model, concept, prompt settings): reusable across
    methods of one bench run (`run_quality(base=...)`)."""

    key: tuple
    measure: Measure
    ceiling: Interval
    ceiling_hits: list[bool]
    ceiling_images: list = field(default_factory=list, repr=False)
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)     # base / ceiling .npz when samples are kept


def base_key(settings: QualitySettings, model: Path) -> tuple:
    return (str(model), settings.concept, bool(settings.keep_samples), settings.concept_samples, settings.seeds_per_prompt,
            settings.world_samples, settings.eval_seed, settings.sample_steps, settings.cfg_scale, settings.size)


def measure_base(settings: QualitySettings, parts: Any, sets: PromptSets, model: Path, stop: Any = None
                 ) -> BaseMeasure:
    t0 = time.monotonic()
    keep = Path(settings.keep_samples) if settings.keep_samples else None
    files = {}
    if keep is not None:
        files = {"base": str(keep / f"base-{settings.concept}.npz"), "ceiling": str(keep / f"ceiling-{settings.concept}.npz")}
    m = measure(parts, sets, steps=settings.sample_steps, cfg_scale=settings.cfg_scale,
                save=Path(files["base"]) if files else None, size=settings.size, stop=stop)
    ceiling, hits, rts = roundtrip_ceiling(parts, sets.scenes, settings.concept, seed=settings.eval_seed,
                                           size=settings.size)
    if files:
        import numpy as np

        np.savez_compressed(files["ceiling"], ceiling=np.stack([np.asarray(i) for i in rts]))
    return BaseMeasure(base_key(settings, model), m, ceiling, hits, rts[:8], time.monotonic() - t0, files)


class _BaseBesideTraining:
    """`measure_base` in a thread while the training runs, each on one core.

    Used when training is held to one thread (`train_threads` 1) but the process was given more (an idle
    machine): the base model's samples then cost no wall time. Safe because the two never share state: the base
    copy of the model is not the one the loop trains (the loop loads its own), sampling and the loop draw from their
    own seeded generators (the loop re-seeds the global one before each batch), and each thread runs its operators
    on one thread of its own. The figures are those of `measure_base` up to floating-point order (one thread
    instead of the process's count)."""

    def __init__(self, settings: QualitySettings, parts: Any, sets: PromptSets, model: Path) -> None:
        import threading

        self._stop = StopToken()
        self._result: BaseMeasure | None = None
        self._error: BaseException | None = None

        def run() -> None:
            import torch

            torch.set_num_threads(1)
            try:
                self._result = measure_base(settings, parts, sets, model, stop=self._stop)
            except BaseException as e:  # noqa: BLE001 - raised again in the caller by result()
                self._error = e

        self._thread = threading.Thread(target=run, name="quality-base", daemon=True)
        self._thread.start()

    @staticmethod
    def wanted(settings: QualitySettings, parts: Any) -> bool:
        import torch

        return (settings.loop == "ours" and settings.train_threads == 1 and torch.get_num_threads() >= 2
                and getattr(parts, "device", torch.device("cpu")).type == "cpu")

    def result(self) -> BaseMeasure:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        self._stop.request("the training did not finish")
        self._thread.join()


def run_quality(settings: QualitySettings, work: str | Path, *, grid: str | Path | None = None,
                events: Events | None = None, stop: StopToken | None = None,
                base: BaseMeasure | None = None) -> dict[str, Any]:
    """Run one quality measurement (see the module text); returns the result row (JSON-ready).

    `base`: a `BaseMeasure` from an earlier run with the same model and prompt settings (else measured here;
    the row's `base_measure` attribute is not part of the JSON, use `run_quality_full` to get it back).
    """
    row, _ = run_quality_full(settings, work, grid=grid, events=events, stop=stop, base=base)
    return row


def run_quality_full(settings: QualitySettings, work: str | Path, *, grid: str | Path | None = None,
                     events: Events | None = None, stop: StopToken | None = None,
                     base: BaseMeasure | None = None) -> tuple[dict[str, Any], BaseMeasure]:
    """`run_quality`, also returning the base model's measurement for reuse."""
    from ..hosts.standalone import StandaloneHost, default_model
    from ..train.loop import train

    settings.validate()
    events, stop = events or Events(), stop or StopToken()
    work = Path(work)
    if work.exists() and any(work.iterdir()):
        raise UserError(f"{work} is not empty; give a new work folder")
    model = Path(settings.model) if settings.model else default_model()
    t_all = time.monotonic()
    data, reg = make_dataset(work / "data", settings)
    cfg = train_settings(settings, data, reg, model, work / "out")
    host = StandaloneHost(device=settings.device or None, dtype="fp32", output_root=work / "outputs")
    sets = prompt_sets(settings.concept, settings.concept_samples, settings.world_samples, settings.eval_seed,
                       settings.seeds_per_prompt)

    base_parts = host.load(model)
    beside: _BaseBesideTraining | None = None
    if base is None or base.key != base_key(settings, model):
        what = (f"{2 * settings.concept_samples} concept + {settings.world_samples} plain samples, "
                f"{settings.concept_samples} VAE round trips")
        if _BaseBesideTraining.wanted(settings, base_parts):
            events.status(f"measuring the base model beside the training, on the second thread ({what})")
            beside = _BaseBesideTraining(settings, base_parts, sets, model)
        else:
            events.status(f"measuring the base model ({what})")
            base = measure_base(settings, base_parts, sets, model)

    events.status(f"training {settings.method} ({settings.loop} loop) for {cfg.max_steps} steps")
    t0 = time.monotonic()
    saves: list[tuple[int, Path]] = []
    run_dir = None
    if settings.loop == "reference":
        from .reference import train_reference_lora

        ref = train_reference_lora(cfg, base_parts, save_steps=_save_steps(cfg, settings), events=events,
                                   stop=stop)
        t_train = time.monotonic() - t0
        steps_done, losses = ref.steps, ref.losses
        points = []
        try:
            for step in ref.save_steps:
                events.status(f"measuring the save at step {step}")
                ref.apply(step)
                points.append((step, measure(base_parts, sets, steps=settings.sample_steps, size=settings.size,
                                             cfg_scale=settings.cfg_scale, stop=stop, save=_keep(settings, step))))
        finally:
            ref.remove()
        final_file = ""
    else:
        def on_saved(e) -> None:
            if e.kind == "saved" and e.data.get("path"):
                saves.append((int(e.data.get("step", 0)), Path(e.data["path"])))

        events.subscribe(on_saved)
        import torch

        threads = torch.get_num_threads()
        if settings.train_threads > 0:
            torch.set_num_threads(settings.train_threads)
        finished = False
        try:
            result = train(cfg, host, events, stop)
            finished = result.final is not None
        finally:
            events.unsubscribe(on_saved)
            if beside is not None and not finished:
                beside.cancel()
            torch.set_num_threads(threads)
        t_train = time.monotonic() - t0
        if result.final is None:
            raise UserError(f"training did not finish ({result.stopped or 'no final file'})")
        if beside is not None:
            base = beside.result()
        steps_done, losses = result.steps, result.losses
        run_dir = result.run_dir
        if not saves or saves[-1][1] != result.final:
            saves.append((result.steps, result.final))
        points = []
        for step, path in saves:
            events.status(f"measuring the save at step {step}")
            parts, undo = _apply_file(host, base_parts, cfg, path)
            try:
                points.append((step, measure(parts, sets, steps=settings.sample_steps, size=settings.size,
                                             cfg_scale=settings.cfg_scale, stop=stop, save=_keep(settings, step))))
            finally:
                undo()
        final_file = str(result.final)

    assert base is not None
    before = base.measure
    curve = [{"step": 0, **_base_figures(before, base.ceiling)}]
    for step, m in points:
        curve.append({"step": step, **figures(before, m, base.ceiling_hits)})
    final = curve[-1]
    best = max(curve[1:], key=lambda p: (p["binding"]["value"], -p["step"]))
    tb = _write_tensorboard(run_dir if settings.loop == "ours" and cfg.tensorboard else None, curve)
    row: dict[str, Any] = {
        "method": settings.method,
        "concept": settings.concept,
        "loop": settings.loop,
        "class_pictures": settings.class_set(),
        "label": row_label(settings),
        **{k: final[k] for k in ROW_FIGURES if k in final},
        "fidelity_before": curve[0]["fidelity"],
        "class_share_before": curve[0]["class_share"],
        "world_accuracy": {"before": round(before.world_accuracy(), 4), "after": final["world_accuracy"]},
        "ceiling": base.ceiling.to_dict(),
        "curve": curve,
        "best_step": best["step"],
        "steps": steps_done,
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5) if losses else None,
        "seconds": {"train": round(t_train, 1), "measure_base": round(base.seconds, 1),
                    "total": round(time.monotonic() - t_all, 1)},
        "settings": {**asdict(settings), "learning_rate": cfg.learning_rate, "max_steps": cfg.max_steps,
                     "batch_size": cfg.batch_size, "images_repeats": list(settings.dataset()),
                     "train": settings.train_values()},
        "samples": {"concept": settings.concept_samples, "prompts": settings.concept_samples // settings.seeds_per_prompt,
                    "seeds_per_prompt": settings.seeds_per_prompt, "world": settings.world_samples},
        "seeds": {"train": settings.seed, "prompts": settings.eval_seed,
                  "concept_sampling": [sets.concept_seeds[0], sets.concept_seeds[-1]],
                  "world_sampling": [sets.world_seeds[0], sets.world_seeds[-1]]},
        "model": str(model),
        "trained_file": final_file,
        "tensorboard": tb,
    }
    if settings.keep_samples:
        row["sample_files"] = {**base.files, **{str(step): str(_keep(settings, step)) for step, _ in points}}
    if grid is not None:
        row["grid"] = str(save_quality_grid(grid, settings, sets, before, points, curve, base))
    events.emit("saved", path=row.get("grid", ""), quality=json.dumps(
        {k: row[k]["value"] for k in ("fidelity", "binding", "bleeding") if isinstance(row.get(k), dict)}))
    return row, base


def _keep(settings: QualitySettings, step: int) -> Path | None:
    if not settings.keep_samples:
        return None
    return Path(settings.keep_samples) / f"{settings.method}-{settings.concept}-{settings.loop}-step{step:05d}.npz"


def rescore(row: dict[str, Any], detector: Any = None, grid: str | Path | None = None) -> dict[str, Any]:
    """The figures of a row whose pictures were kept (`keep_samples`), scored again by `detector` (default:
    the shipped one): the same prompts and seeds, no sampling. Returns a new row; `rescored` notes it.
    `grid`: also draw the row's labelled grid again (with the new figures) there."""
    import copy

    import numpy as np
    from PIL import Image

    from .detector import default_detector

    det = detector or default_detector()
    files = row.get("sample_files")
    if not files:
        raise UserError("this row kept no pictures (run it with keep_samples)")
    st = row["settings"]
    sets = prompt_sets(row["concept"], st["concept_samples"], st["world_samples"], st["eval_seed"],
                       st["seeds_per_prompt"])
    before = score_measure(sets, *load_samples(files["base"]), detector=det)
    with np.load(files["ceiling"]) as z:
        ceiling_images = [Image.fromarray(a) for a in z["ceiling"]]
    ceiling_hits, _ = concept_hits(ceiling_images, row["concept"], det)
    out = copy.deepcopy(row)
    out["curve"] = [{"step": 0, **_base_figures(before, share(ceiling_hits))}]
    points = []
    for point in row["curve"][1:]:
        m = score_measure(sets, *load_samples(files[str(point["step"])]), detector=det)
        points.append((point["step"], m))
        out["curve"].append({"step": point["step"], **figures(before, m, ceiling_hits)})
    final = out["curve"][-1]
    for k in ROW_FIGURES:
        if k in final:
            out[k] = final[k]
    out["fidelity_before"] = out["curve"][0]["fidelity"]
    out["class_share_before"] = out["curve"][0]["class_share"]
    out["ceiling"] = share(ceiling_hits).to_dict()
    out["world_accuracy"] = {"before": round(before.world_accuracy(), 4), "after": final["world_accuracy"]}
    out["best_step"] = max(out["curve"][1:], key=lambda p: (p["binding"]["value"], -p["step"]))["step"]
    out["rescored"] = det.metadata.get("format", "detector") + " " + det.metadata.get("train_seconds", "")
    if grid is not None:
        settings = QualitySettings.from_row(row)
        base = BaseMeasure((), before, share(ceiling_hits), ceiling_hits, ceiling_images[:8])
        out["grid"] = str(save_quality_grid(grid, settings, sets, before, points, out["curve"], base))
    return out


def _write_tensorboard(run_dir: Path | None, curve: list[dict]) -> str:
    """Add the quality figures of every save to the run's TensorBoard log (run_dir/tensorboard); its path."""
    if run_dir is None:
        return ""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return ""
    folder = Path(run_dir) / "tensorboard"
    writer = SummaryWriter(str(folder))
    try:
        for point in curve:
            for key in ("fidelity", "binding", "bleeding", "retention", "fidelity_of_ceiling", "class_share"):
                d = point.get(key)
                if isinstance(d, dict):
                    writer.add_scalar(f"quality/{key}", d["value"], point["step"])
                    writer.add_scalar(f"quality/{key}_lo95", d["lo"], point["step"])
                    writer.add_scalar(f"quality/{key}_hi95", d["hi"], point["step"])
    finally:
        writer.close()
    return str(folder)


def _save_steps(cfg: Any, settings: QualitySettings) -> list[int]:
    every = cfg.save_every_n_steps
    steps = [s for s in range(every, cfg.max_steps, every)] if every else []
    return steps + [cfg.max_steps]


def _base_figures(before: Measure, ceiling: Interval) -> dict[str, Any]:
    return {"fidelity": before.fidelity().to_dict(), "class_share": before.class_share().to_dict(),
            "binding": paired_difference(before.token_hits, before.class_hits).to_dict(),
            "world_accuracy": round(before.world_accuracy(), 4)}


def row_label(settings: QualitySettings) -> str:
    parts = [settings.method]
    if settings.loop == "reference":
        parts.append("reference loop")
    cls = settings.class_set()
    if settings.method in ("dreambooth", "finetune", "lora") and cls == "world":
        parts.append("class pictures")
    elif settings.method == "dreambooth":
        parts.append("no class pictures")
    if settings.background_weight is not None:
        parts.append(f"masked loss, background {settings.background_weight:g}")
    return " / ".join(parts) if len(parts) > 1 else parts[0]


# ---- grids -------------------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: the bitmap font only
        return ImageFont.load_default()


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def labelled_grid(rows: Sequence[tuple[str, Sequence]], headers: Sequence[str], title: str,
                  cell: int = 96, label_width: int = 250, footer: Sequence[str] = ()):
    """A PIL grid: a title, one header per column (prompt and seed), one labelled row per entry of `rows`
    (label text may hold several lines: the figures), and footer lines."""
    from PIL import Image, ImageDraw

    cols = max(len(imgs) for _, imgs in rows)
    pad = 4
    small, big = _font(11), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    head_lines = [_wrap(probe, h, small, cell) for h in headers]
    head_h = 14 * max(len(h) for h in head_lines) + pad
    title_lines = _wrap(probe, title, big, label_width + cols * (cell + pad))
    title_h = 18 * len(title_lines) + pad
    foot_h = 14 * len(footer) + (pad if footer else 0)
    width = label_width + cols * (cell + pad) + pad
    height = title_h + head_h + len(rows) * (cell + pad) + foot_h + pad
    grid = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    y = pad
    for line in title_lines:
        draw.text((pad, y), line, fill=(255, 255, 255), font=big)
        y += 18
    for c, lines in enumerate(head_lines):
        for i, line in enumerate(lines):
            draw.text((label_width + pad + c * (cell + pad), title_h + i * 14), line, fill=(200, 200, 200), font=small)
    y0 = title_h + head_h
    for r, (label, images) in enumerate(rows):
        top = y0 + r * (cell + pad)
        for i, line in enumerate(label.split("\n")):
            draw.text((pad, top + 2 + i * 14), line, fill=(235, 235, 235), font=small)
        for c, img in enumerate(images):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST),
                       (label_width + pad + c * (cell + pad), top))
    y = y0 + len(rows) * (cell + pad) + pad
    for line in footer:
        draw.text((pad, y), line, fill=(200, 200, 200), font=small)
        y += 14
    return grid


def _fig(d: dict | None, signed: bool = False) -> str:
    if not d:
        return "n/a"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f"{fmt.format(d['value'])} [{fmt.format(d['lo'])}, {fmt.format(d['hi'])}]"


def save_quality_grid(path: str | Path, settings: QualitySettings, sets: PromptSets, before: Measure,
                      points: list[tuple[int, Measure]], curve: list[dict], base: BaseMeasure, columns: int = 8):
    """The labelled grid of one run: columns = the first `columns` token prompts (their seeds in the header);
    rows = VAE round trip (the ceiling), the base model and every measured save on the token prompts, then
    the base model and the final save on the class prompts. Figures with 95 % intervals on each row."""
    from ..formats.files import atomic_write

    n = min(columns, len(before.token_images))
    token = world.SUBJECT_TOKEN if settings.concept == "subject" else world.STYLE_TOKEN
    headers = [f"{p} (seed {s})" for p, s in zip(sets.token_prompts[:n], sets.concept_seeds[:n])]
    rows = [(f"VAE round trip of a clean picture\nceiling {_fig(base.ceiling.to_dict())}", base.ceiling_images[:n]),
            (f"base model, with {token}\nfidelity {_fig(curve[0]['fidelity'])}", before.token_images[:n])]
    for (step, m), fig in zip(points, curve[1:]):
        rows.append((f"step {step}, with {token}\nfidelity {_fig(fig['fidelity'])}\n"
                     f"binding {_fig(fig['binding'], True)}\nretention {_fig(fig.get('retention'))}",
                     m.token_images[:n]))
    without = "class word" if settings.concept == "subject" else "no style words"
    rows.append((f"base model, {without}\n(no {token})\nshare {_fig(curve[0]['class_share'])}",
                 before.class_images[:n]))
    last_step, last = points[-1]
    fig = curve[-1]
    rows.append((f"step {last_step}, {without}\nshare {_fig(fig['class_share'])}\nbleeding {_fig(fig['bleeding'], True)}",
                 last.class_images[:n]))
    title = (f"{row_label(settings)} on the toy {settings.concept} ({token}): {curve[-1]['step']} steps; "
             f"figures: {settings.concept_samples} samples each ({settings.concept_samples // settings.seeds_per_prompt}"
             f" prompts x {settings.seeds_per_prompt} seeds), retention on {settings.world_samples} plain prompts; "
             f"Euler {settings.sample_steps} steps, CFG {settings.cfg_scale:g}; value [95 % interval]")
    footer = [("class-word rows: the same prompts with the token replaced by the class word, same seeds"
               if settings.concept == "subject" else
               "no-style-words rows: the same prompts without \"zkz style,\", same seeds"),
              "fidelity/share: detector sees the concept (Wilson); binding, bleeding: Newcombe paired; "
              "retention: paired bootstrap"]
    grid = labelled_grid(rows, headers, title, footer=footer)
    return atomic_write(Path(path), lambda p: grid.save(p, format="PNG"), overwrite=True)
