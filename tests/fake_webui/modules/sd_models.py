"""modules.sd_models: checkpoint registry and loading. Builds the fake LDM/SGM model from a single-file
checkpoint in A1111's layout (our tiny test checkpoints), loads it non-strictly as A1111 does, sets A1111's
model flags, hijacks it, and for SDXL adds what `sd_models_xl.extend_sdxl` adds."""

import hashlib
import json
import os
from pathlib import Path

import torch

from modules import devices, lowvram, paths_internal, script_callbacks, sd_hijack, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths_internal.models_path, model_dir))
checkpoints_list = {}
checkpoint_aliases = {}
list_calls = 0


class CheckpointInfo:
    """A checkpoint file as A1111 lists it: name relative to the models folder, titles, hashes, aliases."""

    def __init__(self, filename):
        self.filename = filename
        full = os.path.abspath(filename)
        relative = full[len(model_path):].lstrip("\\/") if full.startswith(model_path) else os.path.basename(filename)
        self.name = self.title = relative
        self.name_for_extra = Path(filename).stem
        self.model_name = os.path.splitext(relative.replace("/", "_").replace("\\", "_"))[0]
        self.short_title = self.name_for_extra
        self.hash = model_hash(filename)
        self.sha256 = self.shorthash = None
        self.is_safetensors = filename.lower().endswith(".safetensors")
        self.metadata = read_metadata_from_safetensors(filename) if self.is_safetensors else {}
        self.ids = [self.hash, self.model_name, self.title, relative, self.name_for_extra,
                    f"{relative} [{self.hash}]"]

    def register(self):
        checkpoints_list[self.title] = self
        checkpoint_aliases.update({alias: self for alias in self.ids})

    def calculate_shorthash(self):
        digest = hashlib.sha256(Path(self.filename).read_bytes()).hexdigest()
        self.sha256, self.shorthash = digest, digest[:10]
        self.title = f"{self.name} [{self.shorthash}]"
        self.ids += [self.shorthash, self.sha256, self.title]
        self.register()
        return self.shorthash


def model_hash(filename):
    """A1111's legacy 8-hex "model hash": sha256 of the 64 KiB that start 1 MiB into the file."""
    if not os.path.exists(filename):
        return "NOFILE"
    with open(filename, "rb") as fh:
        fh.seek(1 << 20)
        return hashlib.sha256(fh.read(1 << 16)).hexdigest()[:8]


def read_metadata_from_safetensors(filename):
    with open(filename, mode="rb") as file:
        n = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(n))
    res = {}
    for k, v in header.get("__metadata__", {}).items():
        if isinstance(v, str) and v[0:1] == "{":
            try:
                v = json.loads(v)
            except Exception:
                pass
        res[k] = v
    return res


def list_models():
    global list_calls
    list_calls += 1
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    for folder in filter(None, [model_path, shared.cmd_opts.ckpt_dir]):
        for filename in shared.walk_files(folder, allowed_extensions=[".ckpt", ".safetensors"]):
            CheckpointInfo(filename).register()


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    found = checkpoint_aliases.get(search_string)
    if found is not None:
        return found
    found = sorted([info for info in checkpoints_list.values() if search_string in info.title],
                   key=lambda x: len(x.title))
    return found[0] if found else None


def select_checkpoint():
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint)
    if info is not None:
        return info
    if not checkpoints_list:
        return None
    return next(iter(checkpoints_list.values()))


class SdModelData:
    def __init__(self):
        self.sd_model, self.loaded_sd_models = None, []
        self.was_loaded_at_least_once = False
        self.autoload = False          # fake: tests decide whether touching shared.sd_model loads one

    def get_sd_model(self):
        if self.sd_model is None and self.autoload and not self.was_loaded_at_least_once:
            load_model()
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v
        if v is not None:
            self.was_loaded_at_least_once = True


model_data = SdModelData()


# ---- building the fake LDM/SGM model ----------------------------------------------------------------
def _unet(cfg, use_checkpoint):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = cfg["block_out_channels"][0]
    attn = [2 ** i for i, t in enumerate(cfg["down_block_types"]) if t.startswith("CrossAttn")]
    heads = cfg["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(cfg["block_out_channels"])
    depth = cfg.get("transformer_layers_per_block", 1)
    sdxl = cfg.get("addition_embed_type") == "text_time"
    return UNetModel(in_channels=cfg["in_channels"], model_channels=base, out_channels=cfg["out_channels"],
                     num_res_blocks=cfg["layers_per_block"], attention_resolutions=attn,
                     channel_mult=[c // base for c in cfg["block_out_channels"]], num_heads=heads,
                     transformer_depth=depth, context_dim=cfg["cross_attention_dim"],
                     use_linear_in_transformer=cfg.get("use_linear_projection", False),
                     use_checkpoint=use_checkpoint, num_classes="sequential" if sdxl else None,
                     adm_in_channels=cfg.get("projection_class_embeddings_input_dim"))


def _vae(cfg):
    from ldm.models.autoencoder import AutoencoderKL

    base = cfg["block_out_channels"][0]
    dd = dict(double_z=True, z_channels=cfg["latent_channels"], resolution=cfg.get("sample_size", 256),
              in_channels=cfg["in_channels"], out_ch=cfg["out_channels"], ch=base,
              ch_mult=[c // base for c in cfg["block_out_channels"]], num_res_blocks=cfg["layers_per_block"],
              attn_resolutions=[], dropout=0.0)
    return AutoencoderKL(dd, embed_dim=cfg["latent_channels"])


def _hf_clip(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**cfg))


def _open_clip(cfg):
    from ldm.modules.encoders.modules import CLIP

    return CLIP(embed_dim=cfg["projection_dim"], width=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
                heads=cfg["num_attention_heads"], context_length=cfg["max_position_embeddings"],
                vocab_size=cfg["vocab_size"], mlp_ratio=cfg["intermediate_size"] / cfg["hidden_size"])


_hf_tokenizer_cache = []


def hf_clip_tokenizer():
    """transformers' CLIPTokenizer over the CLIP vocabulary, as LDM/SGM's FrozenCLIPEmbedder holds it (built
    once per process from vocab.json + merges.txt written beside it; nothing is downloaded)."""
    if not _hf_tokenizer_cache:
        import tempfile

        from transformers import CLIPTokenizer

        from lib_sdtrain.methods.diffusers_export import _write_tokenizer
        from lib_sdtrain.models.tokenizer import make_tokenizers

        folder = tempfile.TemporaryDirectory(prefix="fake-webui-clip-tokenizer-")
        _write_tokenizer(Path(folder.name), make_tokenizers("sd1")[0], "<|endoftext|>")
        _hf_tokenizer_cache.extend([CLIPTokenizer.from_pretrained(folder.name), folder])
    return _hf_tokenizer_cache[0]


def build_model(arch):
    """The fake model object for an `Architecture` (lib_sdtrain.models.checkpoint), weights uninitialised.
    CLIP encoders hold transformers' CLIPTokenizer; OpenCLIP ones none (A1111 uses open_clip's module-level one)."""
    from lib_sdtrain.models.schedule import ldm_schedule_buffers, sgm_sigmas

    tokenizers = [hf_clip_tokenizer()]
    family = arch.family
    if family in ("sd1", "sd2"):
        from ldm.models.diffusion.ddpm import LatentDiffusion
        from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

        if family == "sd1":
            cond = FrozenCLIPEmbedder(_hf_clip(arch.text[0]), tokenizers[0])
        else:
            cond = FrozenOpenCLIPEmbedder(_open_clip(arch.text[0]), layer="penultimate")
        # A1111's v1-inference.yaml: use_checkpoint False; SD2's v2-inference(-v).yaml: True
        return LatentDiffusion(_unet(arch.unet, family == "sd2"), _vae(arch.vae), cond,
                               scale_factor=arch.latent_scale, parameterization=arch.prediction,
                               schedule_buffers=ldm_schedule_buffers())
    from sgm.models.diffusion import AutoencoderKLInferenceWrapper, DiffusionEngine
    from sgm.modules.encoders.modules import (ConcatTimestepEmbedderND, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2,
                                              GeneralConditioner)

    e0 = FrozenCLIPEmbedder(_hf_clip(arch.text[0]), tokenizers[0], layer="hidden",
                            layer_idx=arch.text[0]["num_hidden_layers"] - 1)
    e1 = FrozenOpenCLIPEmbedder2(_open_clip(arch.text[1]))
    e0.input_key = e1.input_key = "txt"
    size = arch.unet["addition_time_embed_dim"]
    others = []
    for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
        e = ConcatTimestepEmbedderND(size)
        e.input_key = key
        others.append(e)
    conditioner = GeneralConditioner([e0, e1, *others])
    return DiffusionEngine(_unet(arch.unet, True), conditioner, AutoencoderKLInferenceWrapper(_vae(arch.vae)),
                           sgm_sigmas(), scale_factor=arch.latent_scale, parameterization=arch.prediction)


def extend_sdxl(sd_model):
    """What `sd_models_xl.extend_sdxl` adds to an SGM DiffusionEngine."""
    import types

    from lib_sdtrain.models.schedule import alphas_cumprod

    def get_learned_conditioning(self, batch):
        """SDXL conditioning of a prompt list: text plus size/crop vectors (size from the batch, else 1024);
        an all-empty negative batch gets zero text embeddings."""
        for embedder in self.conditioner.embedders:
            embedder.ucg_rate = 0.0
        size = [getattr(batch, "height", None) or 1024, getattr(batch, "width", None) or 1024]
        crop = [shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left]

        def per_prompt(values):
            row = torch.tensor(values, device=devices.device, dtype=devices.dtype)
            return row.expand(len(batch), -1).clone()

        inputs = {"txt": batch, "original_size_as_tuple": per_prompt(size), "crop_coords_top_left": per_prompt(crop),
                  "target_size_as_tuple": per_prompt(size)}
        empty_negative = getattr(batch, "is_negative_prompt", False) and not any(batch)
        return self.conditioner(inputs, force_zero_embeddings=["txt"] if empty_negative else [])

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond)

    def tokenize(self, texts):
        for embedder in [embedder for embedder in self.embedders if hasattr(embedder, "tokenize")]:
            return embedder.tokenize(texts)
        raise AssertionError("no tokenizer available")

    def encode_embedding_init_text(self, init_text, nvpt):
        res = []
        for embedder in [embedder for embedder in self.embedders if hasattr(embedder, "encode_embedding_init_text")]:
            res.append(embedder.encode_embedding_init_text(init_text, nvpt))
        return torch.cat(res, dim=1)

    # sd_models_xl patches these onto sgm's GeneralConditioner class
    from sgm.modules.encoders.modules import GeneralConditioner

    GeneralConditioner.tokenize = tokenize
    GeneralConditioner.encode_embedding_init_text = encode_embedding_init_text
    sd_model.get_learned_conditioning = types.MethodType(get_learned_conditioning, sd_model)
    sd_model.apply_model = types.MethodType(apply_model, sd_model)
    sd_model.get_first_stage_encoding = lambda x: x
    from sgm.models.diffusion import VScaling

    sd_model.parameterization = "v" if isinstance(sd_model.denoiser.scaling, VScaling) else "eps"
    sd_model.alphas_cumprod = torch.asarray(alphas_cumprod(), device=devices.device, dtype=torch.float32)
    sd_model.conditioner.wrapped = torch.nn.Module()


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    from lib_sdtrain.models.checkpoint import architecture_from_state_dict, read_state_dict
    from lib_sdtrain.models.detect import read_metadata_hints

    checkpoint_info = checkpoint_info or select_checkpoint()
    if checkpoint_info is None:
        raise FileNotFoundError("No checkpoints found")
    sd, metadata = read_state_dict(checkpoint_info.filename)
    arch = architecture_from_state_dict(sd, read_metadata_hints(metadata))
    if model_data.sd_model is not None:
        sd_hijack.model_hijack.undo_hijack(model_data.sd_model)
    model = build_model(arch)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    model.load_report = (list(missing), list(unexpected))
    model.is_sdxl = arch.family == "sdxl"
    model.is_sd2 = arch.family == "sd2"
    model.is_sd1 = arch.family == "sd1"
    model.is_ssd = model.is_sd3 = model.is_sdxl_inpaint = False
    model.latent_channels = 4
    model.sd_model_hash = checkpoint_info.calculate_shorthash()
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info
    model.lowvram = lowvram.is_needed(model)
    if model.is_sdxl:
        extend_sdxl(model)
    model.alphas_cumprod_original = model.alphas_cumprod
    model.eval()
    model_data.set_sd_model(model)
    sd_hijack.model_hijack.hijack(model)
    script_callbacks.model_loaded_callback(model)
    # "Reload embeddings after model load as they may or may not fit the model"
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    return model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    checkpoint_info = info or select_checkpoint()
    current = model_data.sd_model
    if current is not None and not forced_reload and current.sd_model_checkpoint == checkpoint_info.filename:
        return current
    return load_model(checkpoint_info)
