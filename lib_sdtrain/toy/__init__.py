"""The bundled toy world: a small, measurable stand-in for real Stable Diffusion data (client code of the core).

- `world`: captioned pictures of shapes (`Scene`, `render`, `caption`, `parse_caption`, `sample_scenes`,
  the held-out combinations) and the two concepts a base model never sees: the subject "zwx shape" and
  the style "zkz".
- `datasets`: concept, class and base datasets written in kohya's `N_name class` folder layout, or
  streamed without touching disk.
- `detector`: a tiny CNN (shipped in `data/detector.safetensors`) that names what a picture shows and
  whether a concept is present; the accuracy and bleeding measure for toy training runs.

`world` and `datasets` need numpy and Pillow only; `detector` needs torch.
"""

from pathlib import Path


def bundled_model() -> Path:
    """The bundled toy model file (`toy/data/toy-sd1.safetensors`); UserError if this install lacks it.

    `hosts.standalone.default_model` finds the same file for a host given no model; this copy is for screens
    (the UI's "@toy" presets), which never pick a host themselves.
    """
    from importlib import resources

    from ..errors import UserError

    try:
        path = Path(str(resources.files("lib_sdtrain") / "toy" / "data" / "toy-sd1.safetensors"))
    except (ModuleNotFoundError, TypeError):
        path = Path(__file__).resolve().parent / "data" / "toy-sd1.safetensors"
    if not path.is_file():
        raise UserError("the bundled toy model is missing from this install; pass a .safetensors checkpoint")
    return path
