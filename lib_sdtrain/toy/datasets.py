"""Toy concept datasets, written on demand in the folder layout users already have (kohya's repeats folders).

    <out>/img/<N>_zwx shape/0000.png + 0000.txt     subject instances   (make_subject_dataset)
    <out>/img/<N>_zkz style/0000.png + 0000.txt     style pictures      (make_style_dataset)
    <out>/reg/<M>_shape/0000.png + 0000.txt         class pictures      (make_class_set)
    <out>/img/<N>_shape/...                         plain world         (make_base_dataset)

`N` is the number of repeats per epoch (kohya's `N_name class` folder names). Every picture has a sidecar
caption in the toy grammar (`world.caption`). The functions build one concept folder each, so a complete
dreambooth tree is `make_subject_dataset(out)` plus `make_class_set(out)`.

Datasets are generated, not shipped: 20 pictures take about 20 ms to render, a 1,000-picture class set
under a second, so tests and users make exactly the set they need and the repository stays small.

A concept folder that already holds files is never touched: the call raises UserError. Each file is written
atomically, so an interrupted run leaves whole files only (and a rerun asks for a fresh folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..errors import UserError
from ..formats.files import atomic_write, atomic_write_text, make_folder, safe_child
from . import world
from .world import CLASS_WORD, SHAPES, STYLE_TOKEN, SUBJECT_SHAPE, SUBJECT_TOKEN, Scene

CAPTION_MODES: tuple[str, ...] = ("full", "short", "token")


@dataclass(frozen=True)
class WrittenSet:
    """What one `make_*` call wrote: the concept folder, its pictures (sidecars share the stem) and scenes."""

    folder: Path
    images: list[Path]
    captions: list[str]
    scenes: list[Scene]
    repeats: int


def _check_count(name: str, value: int, lo: int = 1, hi: int = 1_000_000) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{name} must be an integer from {lo} to {hi}, not {value!r}")


def _concept_folder(out: str | Path, split: str, repeats: int, name: str) -> Path:
    _check_count("repeats", repeats, 1, 10_000)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file, not a folder")
    folder = safe_child(root / split, f"{repeats}_{name}")
    # Refuse any existing concept folder with the same name, whatever its repeats: kohya would train both.
    if (root / split).is_dir():
        for other in (root / split).iterdir():
            head, _, rest = other.name.partition("_")
            if other.is_dir() and head.isdigit() and rest == name and any(other.iterdir()):
                raise UserError(f"{other} already exists and is not empty; choose another output folder")
    return folder


def _write_set(folder: Path, scenes: list[Scene], captions: list[str], size: int, seed: int,
               repeats: int, background_weight: float | None = None) -> WrittenSet:
    if background_weight is None:
        images = world.render_scenes(scenes, size, seed)
    else:
        images = [weighted(picture, mask, background_weight) for picture, mask in world.render_scenes_with_masks(
            scenes, size, seed)]
    make_folder(folder)
    paths = []
    for i, (img, text) in enumerate(zip(images, captions)):
        path = folder / f"{i:04d}.png"
        _save_png(img, path)
        atomic_write_text(path.with_suffix(".txt"), text + "\n", overwrite=False)
        paths.append(path)
    return WrittenSet(folder, paths, list(captions), list(scenes), repeats)


def check_background_weight(value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"background_weight must be a number from 0 to 1 (or none), not {value!r}")


def weighted(picture: Image.Image, mask: Image.Image, background_weight: float) -> Image.Image:
    """`picture` with an alpha channel that weights a masked_loss run: 255 on the shape and a margin of 1/32 of
    the side around it (the outline's own surroundings, such as the notch of a heart, count in full),
    `background_weight` x 255 elsewhere. The colours are the picture's own."""
    from PIL import ImageFilter

    check_background_weight(background_weight)
    margin = max(1, picture.width // 32)
    near = mask.point(lambda v: 255 if v else 0).filter(ImageFilter.MaxFilter(2 * margin + 1))
    floor = round(background_weight * 255)
    alpha = near.point(lambda v: max(v, floor))
    out = picture.convert("RGBA")
    out.putalpha(alpha)
    return out


def _save_png(img: Image.Image, path: Path) -> None:
    # PNG with fixed settings and no metadata: the same picture always gives the same bytes.
    atomic_write(path, lambda p: img.save(p, format="PNG", optimize=False, compress_level=6), overwrite=False)


def _captions(scenes: list[Scene], mode: str, instance_prompt: str) -> list[str]:
    if mode not in CAPTION_MODES:
        raise UserError(f"captions must be one of {', '.join(CAPTION_MODES)}, not {mode!r}")
    if mode == "token":
        return [instance_prompt] * len(scenes)
    if mode == "short":   # colour, object and background; size and position left for the model to vary
        return [s.caption(size=False, position=False) for s in scenes]
    return [s.caption() for s in scenes]


def subject_scenes(n_images: int, seed: int) -> list[Scene]:
    """`n_images` subject instances: the heart in every colour, size, position and background, balanced."""
    _check_count("n_images", n_images, 1, 100_000)
    rng = world.make_rng(seed, 3)
    # Cycle through colours and backgrounds in shuffled order, so even 5 instances show 5 colours; size and
    # position are free. Diversity is what keeps colour and background from sticking to the token.
    colours = [world.COLOUR_NAMES[i % len(world.COLOUR_NAMES)] for i in rng.permutation(n_images)]
    backgrounds = [world.BACKGROUNDS[i % len(world.BACKGROUNDS)] for i in rng.permutation(n_images)]
    return [
        Scene(SUBJECT_SHAPE, colours[i], world.SIZE_NAMES[int(rng.integers(2))],
              world.POSITIONS[int(rng.integers(3))], backgrounds[i])
        for i in range(n_images)
    ]


def make_subject_dataset(out: str | Path, n_images: int = 12, repeats: int = 20, seed: int = 0, size: int = 64,
                         captions: str = "full", background_weight: float | None = None) -> WrittenSet:
    """Subject instances in `<out>/img/<repeats>_zwx shape/`.

    captions: "full" ("zwx, a large red shape in the centre of a gray background"), "short" ("zwx, a red
    shape on a gray background") or "token" (the instance prompt "zwx shape" only). `background_weight`
    (0-1) writes RGBA pictures whose alpha weights a masked_loss run: the heart in full, the rest at that weight.
    """
    check_background_weight(background_weight)
    scenes = subject_scenes(n_images, seed)
    name = f"{SUBJECT_TOKEN} {CLASS_WORD}"
    folder = _concept_folder(out, "img", repeats, name)
    return _write_set(folder, scenes, _captions(scenes, captions, name), size, seed, repeats, background_weight)


def make_style_dataset(out: str | Path, n_images: int = 100, repeats: int = 2, seed: int = 0, size: int = 64,
                       captions: str = "full", background_weight: float | None = None) -> WrittenSet:
    """Style pictures (base shapes, striped) in `<out>/img/<repeats>_zkz style/`.

    The style is shown on the base shapes only, never on the subject, so it stays one concept.
    captions "token" writes "zkz style". `background_weight` as for `make_subject_dataset` (the striped shape
    in full).
    """
    _check_count("n_images", n_images, 1, 100_000)
    check_background_weight(background_weight)
    scenes = world.sample_scenes(n_images, seed, holdout="exclude", style="striped")
    name = f"{STYLE_TOKEN} style"
    folder = _concept_folder(out, "img", repeats, name)
    return _write_set(folder, scenes, _captions(scenes, captions, name), size, seed, repeats, background_weight)


def make_class_set(out: str | Path, n_images: int = 200, repeats: int = 1, seed: int = 0, size: int = 64,
                   captions: str = "generic", split: str = "reg") -> WrittenSet:
    """Regularization / class pictures: the plain world, in `<out>/<split>/<repeats>_shape/`.

    captions: "generic" (the class word instead of the shape: "a large red shape in the centre of a gray
    background", the subject captions without the token, for prior preservation), "full" (the specific
    shape: the right regularization for the style concept), "mixed" (every second picture generic, the others
    full: prior preservation for the class word and for the world's own shape words) or "token" (just "shape").
    With the same seed and count as `make_style_dataset` it shows the same scenes, plain: paired
    regularization, where only the style differs between an instance and its class picture.
    """
    _check_count("n_images", n_images, 1, 1_000_000)
    if split not in ("reg", "img"):
        raise UserError(f"split must be 'reg' or 'img', not {split!r}")
    scenes = world.sample_scenes(n_images, seed, holdout="exclude")
    if captions == "generic":
        texts = [s.caption(generic=True) for s in scenes]
    elif captions == "mixed":
        texts = [s.caption(generic=i % 2 == 0) for i, s in enumerate(scenes)]
    else:
        texts = _captions(scenes, captions, CLASS_WORD)
    folder = _concept_folder(out, split, repeats, CLASS_WORD)
    return _write_set(folder, scenes, texts, size, seed, repeats)


def make_base_dataset(out: str | Path, n_images: int = 1000, repeats: int = 1, seed: int = 0, size: int = 64,
                      holdout: str = "exclude", generic_share: float = 0.1) -> WrittenSet:
    """The plain world for pretraining, on disk in `<out>/img/<repeats>_shape/` (held-out triples excluded).

    For training without files use `iter_base_pictures`. `generic_share`: see `world.iter_pictures`.
    """
    _check_count("n_images", n_images, 1, 10_000_000)
    world.check_size(size)
    folder = _concept_folder(out, "img", repeats, CLASS_WORD)
    it = world.iter_pictures(seed, size, holdout=holdout, generic_share=generic_share)
    make_folder(folder)
    paths, texts, scenes = [], [], []
    for i in range(n_images):
        img, text, scene = next(it)
        path = folder / f"{i:05d}.png"
        _save_png(img, path)
        atomic_write_text(path.with_suffix(".txt"), text + "\n", overwrite=False)
        paths.append(path)
        texts.append(text)
        scenes.append(scene)
    return WrittenSet(folder, paths, texts, scenes, repeats)


def iter_base_pictures(seed: int = 0, size: int = 64, holdout: str = "exclude",
                       generic_share: float = 0.1) -> Iterator[tuple[Image.Image, str]]:
    """Endless (picture, caption) pairs of the plain world for pretraining, without touching disk."""
    for img, text, _ in world.iter_pictures(seed, size, holdout=holdout, generic_share=generic_share):
        yield img, text


def iter_autoencoder_pictures(seed: int = 0, size: int = 64, concept_share: float = 0.2) -> Iterator[Image.Image]:
    """Endless pictures for training the toy VAE: the plain world plus a share of concept pictures.

    A real SD VAE can draw anything; the toy one only what it was trained on. Without stripes and hearts
    in its training set a LoRA could never produce them, however well the UNet learned, so the VAE sees
    them (uncaptioned: the UNet and text encoder still never do).
    """
    if not 0 <= concept_share <= 1:
        raise UserError(f"concept_share must be between 0 and 1, not {concept_share}")
    world.check_size(size)
    rng = world.make_rng(seed, 4)
    while True:
        r = float(rng.random())
        if r < concept_share / 2:
            scene = world.random_scene(rng, shapes=(SUBJECT_SHAPE,))
        elif r < concept_share:
            scene = world.random_scene(rng, shapes=SHAPES, style="striped")
        else:
            scene = world.random_scene(rng)
        yield world.render(scene, size, rng)
