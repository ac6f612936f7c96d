"""Train a method on a toy concept and measure it: fidelity, bleeding and retention (bench/quality.py, demo).

One quality run:
1. writes the concept dataset (`datasets.make_subject_dataset` / `make_style_dataset`, plus class pictures
   for Dreambooth) under the work folder;
2. samples the base model on three fixed prompt sets: concept prompts WITH the token, the same scenes'
   class prompts WITHOUT it, and plain-world prompts;
3. trains with the project's one loop (`train.loop.train`) on the standalone host;
4. puts the result on the base model (adapter files through the method's `load_weights`, checkpoints
   through the host) and samples the same prompts and seeds again;
5. scores both sets with the shipped detector.

Figures:
- fidelity: share of token-prompt samples in which the detector sees the concept (the subject's heart,
  the zkz stripes), after training (`fidelity_before` is the base model's share, normally near 0);
- bleeding: share of class-prompt samples (no token) showing the concept after training, minus the base
  model's share on the same prompts and seeds (0 = no leak; the concept should stay on its token);
- retention: the plain world's accuracy (mean of colour and shape accuracy on fixed plain prompts) after
  training divided by before (1 = the base world is intact).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..events import Events, StopToken
from . import world

CONCEPTS = ("subject", "style")

# Per-method training defaults for the toy concept (the toy model is tiny: rates are higher than for SD).
# Keys are TrainSettings fields, or "<section>.<field>" for the method's own settings section.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"learning_rate": 2e-3, "max_steps": 300, "batch_size": 4,
             "lora.network_dim": 8, "lora.network_alpha": 8.0, "lora.train_text_encoder": False},
    "embedding": {"learning_rate": 5e-2, "max_steps": 300, "batch_size": 4},
    "hypernetwork": {"learning_rate": 1e-3, "max_steps": 300, "batch_size": 4},
    "dreambooth": {"learning_rate": 2e-4, "max_steps": 300, "batch_size": 4},
}


@dataclass
class QualitySettings:
    """One quality run. `steps`/`learning_rate` 0 take the method's default from METHOD_DEFAULTS."""

    method: str = "lora"
    concept: str = "subject"
    model: str = ""                     # empty = the bundled toy model
    images: int = 12                    # concept pictures
    repeats: int = 10
    steps: int = 0
    learning_rate: float = 0.0
    seed: int = 0                       # dataset and training seed
    eval_seed: int = 777                # prompt and sampling seeds of the measurements
    concept_samples: int = 24           # token prompts (fidelity) = class prompts (bleeding)
    world_samples: int = 48             # plain prompts (retention)
    sample_steps: int = 20
    cfg_scale: float = 7.0
    device: str = ""                    # empty = cuda when available
    overrides: dict[str, Any] = field(default_factory=dict)   # extra TrainSettings / section fields

    def validate(self) -> None:
        from ..methods import method_spec

        method_spec(self.method)   # UserError for a method not registered
        if self.concept not in CONCEPTS:
            raise UserError(f"unknown concept {self.concept!r}; choose subject or style")
        for name in ("images", "repeats", "concept_samples", "world_samples", "sample_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, not {value!r}")
        if self.steps < 0 or self.learning_rate < 0:
            raise UserError("steps and learning_rate must not be negative")


@dataclass
class PromptSets:
    """The fixed prompts and seeds every measurement of a run uses, before and after training."""

    token_prompts: list[str]
    class_prompts: list[str]
    concept_seeds: list[int]
    world_scenes: list[world.Scene]
    world_prompts: list[str]
    world_seeds: list[int]


def prompt_sets(concept: str, concept_samples: int, world_samples: int, seed: int) -> PromptSets:
    """Concept scenes (other than the training ones) with and without the token, and plain prompts."""
    if concept == "subject":
        from .datasets import subject_scenes

        scenes = subject_scenes(concept_samples, seed + 1)
        token = [s.caption() for s in scenes]
        # the same scenes in class words ("a large red shape ..."): any base shape stands in for the heart,
        # since a generic caption never names the shape
        plain = [world.Scene(world.BASE_SHAPES[0], s.colour, s.size, s.position, s.background).caption(generic=True)
                 for s in scenes]
    else:
        scenes = world.sample_scenes(concept_samples, seed + 1, holdout="exclude", style="striped")
        token = [s.caption() for s in scenes]                    # "... in zkz style"
        plain = [world.Scene(s.shape, s.colour, s.size, s.position, s.background).caption() for s in scenes]
    wscenes = world.sample_scenes(world_samples, seed + 2, holdout="exclude")
    return PromptSets(token, plain, [seed * 1000 + i for i in range(concept_samples)], wscenes,
                      [s.caption() for s in wscenes], [seed * 1000 + 500 + i for i in range(world_samples)])


@dataclass
class Measure:
    """What one model draws for the prompt sets, scored."""

    concept_share_token: float
    concept_share_class: float
    world_accuracy: float
    world_colour: float
    world_shape: float
    token_images: list = field(default_factory=list, repr=False)
    class_images: list = field(default_factory=list, repr=False)


def measure(parts: Any, sets: PromptSets, concept: str, *, steps: int = 20, cfg_scale: float = 7.0) -> Measure:
    """Sample `sets` with `parts` and score them with the shipped detector."""
    from .detector import concept_share, default_detector
    from .evaluate import sample_batch, score

    det = default_detector()
    token = sample_batch(parts, sets.token_prompts, sets.concept_seeds, steps=steps, cfg_scale=cfg_scale)
    plain = sample_batch(parts, sets.class_prompts, sets.concept_seeds, steps=steps, cfg_scale=cfg_scale)
    wimgs = sample_batch(parts, sets.world_prompts, sets.world_seeds, steps=steps, cfg_scale=cfg_scale)
    acc = score(wimgs, sets.world_scenes, det)
    return Measure(concept_share(token, concept, det), concept_share(plain, concept, det),
                   (acc["colour"] + acc["shape"]) / 2, acc["colour"], acc["shape"], token, plain)


def make_dataset(root: Path, settings: QualitySettings) -> tuple[Path, Path | None]:
    """The concept folder (and class pictures for Dreambooth) under `root`; returns (data, reg_data)."""
    from .datasets import make_class_set, make_style_dataset, make_subject_dataset

    if settings.concept == "subject":
        make_subject_dataset(root, n_images=settings.images, repeats=settings.repeats, seed=settings.seed)
    else:
        make_style_dataset(root, n_images=settings.images, repeats=settings.repeats, seed=settings.seed)
    reg = None
    if settings.method == "dreambooth":
        make_class_set(root, n_images=max(24, settings.images * 2), seed=settings.seed + 100,
                       captions="generic" if settings.concept == "subject" else "full")
        reg = root / "reg"
    return root / "img", reg


def train_settings(settings: QualitySettings, data: Path, reg: Path | None, model: Path, out: Path):
    """TrainSettings for the run: the method's toy defaults, then `settings.overrides`."""
    from ..train.settings import TrainSettings

    cfg = TrainSettings()
    values: dict[str, Any] = {
        "method": settings.method, "model": str(model), "data": str(data), "reg_data": str(reg or ""),
        "output": str(out), "name": f"quality-{settings.method}-{settings.concept}", "overwrite": True,
        "seed": settings.seed, "resolution": 64, "enable_buckets": False, "min_bucket": 64, "max_bucket": 64,
        "save_every_n_epochs": 0, "save_state": False, "tensorboard": False, "sample_every_n_epochs": 0,
        "lr_scheduler": "constant", "cache_latents": True,
    }
    values.update(METHOD_DEFAULTS.get(settings.method, {}))
    if settings.method == "embedding":
        token = world.SUBJECT_TOKEN if settings.concept == "subject" else world.STYLE_TOKEN
        values.update({"embedding.token": token, "embedding.init_text": "shape" if settings.concept == "subject"
                       else "style"})
    if settings.steps:
        values["max_steps"] = settings.steps
    if settings.learning_rate:
        values["learning_rate"] = settings.learning_rate
    values.update(settings.overrides)
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


def _apply_result(host: Any, base_parts: Any, cfg: Any, final: Path) -> tuple[Any, Callable[[], None]]:
    """(model with the trained file applied, undo), as the method's registry entry says (`applied_as`):
    adapters: attach + method.load_weights; checkpoints: host.load."""
    from ..methods import create_method, method_spec

    if method_spec(cfg.method).applied_as == "checkpoint":
        parts = host.load(str(final))
        return parts, lambda: host.release(parts)
    method = create_method(cfg)
    import torch

    torch.manual_seed(0)
    method.attach(base_parts)
    method.load_weights(final)
    return base_parts, method.detach


def run_quality(settings: QualitySettings, work: str | Path, *, grid: str | Path | None = None,
                events: Events | None = None, stop: StopToken | None = None) -> dict[str, Any]:
    """Run one quality measurement (see the module text); returns the result row (JSON-ready)."""
    from ..hosts.standalone import StandaloneHost, default_model
    from ..train.loop import train
    from .evaluate import save_grid

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
    sets = prompt_sets(settings.concept, settings.concept_samples, settings.world_samples, settings.eval_seed)

    events.status("sampling the base model")
    t0 = time.monotonic()
    base = host.load(model)
    before = measure(base, sets, settings.concept, steps=settings.sample_steps, cfg_scale=settings.cfg_scale)
    t_measure = time.monotonic() - t0

    events.status(f"training {settings.method} for {cfg.max_steps} steps")
    t0 = time.monotonic()
    result = train(cfg, host, events, stop)
    t_train = time.monotonic() - t0
    if result.final is None:
        raise UserError(f"training did not finish ({result.stopped or 'no final file'})")

    events.status("sampling the trained model")
    parts, undo = _apply_result(host, base, cfg, result.final)
    try:
        after = measure(parts, sets, settings.concept, steps=settings.sample_steps, cfg_scale=settings.cfg_scale)
    finally:
        undo()
    row: dict[str, Any] = {
        "method": settings.method,
        "concept": settings.concept,
        "fidelity": round(after.concept_share_token, 4),
        "fidelity_before": round(before.concept_share_token, 4),
        "bleeding": round(after.concept_share_class - before.concept_share_class, 4),
        "class_concept_share": {"before": round(before.concept_share_class, 4),
                                "after": round(after.concept_share_class, 4)},
        "retention": round(after.world_accuracy / before.world_accuracy, 4) if before.world_accuracy else None,
        "world_accuracy": {"before": round(before.world_accuracy, 4), "after": round(after.world_accuracy, 4),
                           "colour_before": round(before.world_colour, 4), "colour_after": round(after.world_colour, 4),
                           "shape_before": round(before.world_shape, 4), "shape_after": round(after.world_shape, 4)},
        "steps": result.steps,
        "final_loss": round(sum(result.losses[-20:]) / max(1, len(result.losses[-20:])), 5) if result.losses else None,
        "seconds": {"train": round(t_train, 1), "measure_once": round(t_measure, 1),
                    "total": round(time.monotonic() - t_all, 1)},
        "settings": {**asdict(settings), "learning_rate": cfg.learning_rate, "max_steps": cfg.max_steps,
                     "batch_size": cfg.batch_size},
        "seeds": {"train": settings.seed, "prompts": settings.eval_seed,
                  "concept_sampling": [sets.concept_seeds[0], sets.concept_seeds[-1]],
                  "world_sampling": [sets.world_seeds[0], sets.world_seeds[-1]]},
        "model": str(model),
        "trained_file": str(result.final),
    }
    if grid is not None:
        n = min(8, len(sets.token_prompts))
        labels = [f"base: {world.SUBJECT_TOKEN if settings.concept == 'subject' else world.STYLE_TOKEN}",
                  "trained: token", "base: class", "trained: class"]
        images = before.token_images[:n] + after.token_images[:n] + before.class_images[:n] + after.class_images[:n]
        row["grid"] = str(save_grid(images, grid, columns=n, rows_labels=labels, overwrite=True))
    events.emit("saved", path=row.get("grid", ""), quality=json.dumps({k: row[k] for k in
                                                                       ("fidelity", "bleeding", "retention")}))
    return row
