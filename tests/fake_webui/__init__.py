"""A fake AUTOMATIC1111 v1.10 for tests: `modules.*`, `ldm.*`, `sgm.*` and the builtin Lora's `networks`.

`installed(root)` puts this folder on sys.path, points the WebUI's folders at `root` (models/Stable-diffusion,
models/Lora, models/hypernetworks, embeddings, outputs) and removes everything again on exit, so the fake never
leaks into other test files. Models are loaded from real single-file checkpoints (the tiny ones from
`lib_sdtrain.testing.tiny`) into module trees with A1111's class names and state-dict keys.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIXES = ("modules", "ldm", "sgm", "networks")
EXTRA = ("lib_sdtrain.hosts.webui",)


def _purge():
    lora = sys.modules.get("networks")
    if lora is not None and hasattr(lora, "uninstall"):
        lora.uninstall()           # the Lora stand-in patches torch's Linear/Conv2d/MultiheadAttention forwards
    for name in list(sys.modules):
        if name.split(".")[0] in PREFIXES or name in EXTRA:
            del sys.modules[name]


def configure(root: Path) -> dict:
    """Folders of a WebUI rooted at `root`; returns them by kind."""
    from modules import paths_internal, sd_hijack, sd_models, shared

    root = Path(root)
    dirs = {"root": root, "models": root / "models", "checkpoint": root / "models" / "Stable-diffusion",
            "lora": root / "models" / "Lora", "hypernetwork": root / "models" / "hypernetworks",
            "embedding": root / "embeddings", "outputs": root / "outputs"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    paths_internal.script_path = paths_internal.data_path = str(root)
    paths_internal.models_path = str(dirs["models"])
    paths_internal.default_output_dir = str(dirs["outputs"])
    paths_internal.extensions_dir = str(root / "extensions")
    sd_models.model_path = str(dirs["checkpoint"])
    o = shared.cmd_opts
    o.lora_dir, o.hypernetwork_dir, o.embeddings_dir = str(dirs["lora"]), str(dirs["hypernetwork"]), \
        str(dirs["embedding"])
    o.data_dir, o.gradio_allowed_path = str(root), [str(root)]
    sd_hijack.model_hijack.embedding_db.clear_embedding_dirs()
    sd_hijack.model_hijack.embedding_db.add_embedding_dir(o.embeddings_dir)
    shared.config_filename = str(root / "config.json")
    return dirs


@contextlib.contextmanager
def installed(root: Path):
    """Import the fake WebUI configured for `root`; yields the folders dict."""
    _purge()
    sys.path.insert(0, str(HERE))
    try:
        yield configure(root)
    finally:
        for path in (str(HERE), str(HERE / "lora_ext")):
            while path in sys.path:
                sys.path.remove(path)
        _purge()


def load_lora_extension():
    """Make the builtin Lora's `networks` importable (A1111 puts extensions-builtin/Lora on sys.path)."""
    import importlib

    path = str(HERE / "lora_ext")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("networks")


def write_lora(path: Path, sd_model, module_keys, *, rank: int = 2, scale: float = 0.05, seed: int = 0) -> Path:
    """A kohya LoRA file with random factors for the given kohya module names (e.g. "lora_unet_..._to_q"),
    shaped from the loaded model through the Lora stand-in's own name resolution; returns `path`."""
    import torch
    from safetensors.torch import save_file

    networks = load_lora_extension()
    if getattr(sd_model, "network_layer_mapping", None) is None:
        networks.assign_network_names_to_compvis_modules(sd_model)
    mapping = sd_model.network_layer_mapping
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in module_keys:
        layer = networks._resolve(key, sd_model)
        if layer is None:
            raise ValueError(f"{key} names no layer of the loaded model")
        module = mapping.get(layer)
        if module is None:                     # a q/k/v/out projection inside a MultiheadAttention
            mha = mapping[layer.rsplit("_", 2)[0]]
            width = mha.embed_dim
            shape = (width, width)
        else:
            shape = tuple(module.weight.shape)
        down_shape = (rank, shape[1], *shape[2:])
        up_shape = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
        tensors[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=gen) * scale
        tensors[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=gen) * scale
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    path = Path(path)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    networks.list_available_networks()
    return path
