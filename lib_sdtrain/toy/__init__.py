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
