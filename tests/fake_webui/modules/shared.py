"""modules.shared: cmd_opts, opts, state and the `sd_model` property (the module's class is swapped for one with
properties, as A1111 does with `shared_items.Shared`)."""

import argparse
import os
import sys
import types

from modules import devices, paths_internal, shared_state, shared_total_tqdm
from modules.options import OptionInfo, Options, options_section  # noqa: F401 - re-exported like A1111

cmd_opts = argparse.Namespace(
    lowvram=False, medvram=False, medvram_sdxl=False, no_half=True, no_half_vae=True, upcast_sampling=False,
    api=False, api_auth=None, nowebui=False, listen=False, server_name=None, share=False, ngrok=None, ckpt=None, ckpt_dir=None, vae_dir=None,
    lora_dir=None, lyco_dir_backcompat=None, hypernetwork_dir=None, embeddings_dir=None,
    textual_inversion_templates_dir=None, data_dir=None, models_dir=None, ui_settings_file="config.json",
    gradio_allowed_path=[], disable_opt_split_attention=False, xformers=False, skip_install=False,
    disable_safe_unpickle=False,
)

options_templates = {}
options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "sd_unet": OptionInfo("Automatic", "SD Unet"),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
    "sd_noise_schedule": OptionInfo("Default", "Noise schedule for sampling"),   # "Default" / "Zero Terminal SNR"
    "sdxl_clip_l_skip": OptionInfo(False, "Clip skip SDXL"),
    "emphasis": OptionInfo("Original", "Emphasis mode"),
    "fp8_storage": OptionInfo("Disable", "FP8 weight"),
    "sdxl_crop_top": OptionInfo(0, "crop top coordinate"),
    "sdxl_crop_left": OptionInfo(0, "crop left coordinate"),
}))
options_templates.update(options_section(("optimizations", "Optimizations", "sd"), {
    "cross_attention_optimization": OptionInfo("Automatic", "Cross attention optimization"),
}))
options_templates.update(options_section(("training", "Training", "training"), {
    "training_xattention_optimizations": OptionInfo(False, "Use cross attention optimizations while training"),
}))
options_templates.update(options_section(("saving-images", "Saving images/grids", "saving"), {
    "img_max_size_mp": OptionInfo(200, "Maximum image size, in megapixels"),
}))
options_templates.update(options_section(("extra_networks", "Extra Networks", "sd"), {
    "lora_functional": OptionInfo(False, "Lora/Networks: use old method"),
    "samples_format": OptionInfo("png", "File format for images"),
}))

opts = Options(options_templates)
state = shared_state.State()
total_tqdm = shared_total_tqdm.TotalTQDM()   # A1111 makes it in shared_init.initialize()
device = devices.device
demo = None
parallel_processing_allowed = True
hypernetworks = {}
loaded_hypernetworks = []
config_filename = "config.json"


def reload_hypernetworks():
    from modules.hypernetworks import hypernetwork

    global hypernetworks
    hypernetworks = hypernetwork.list_hypernetworks(cmd_opts.hypernetwork_dir)
    sys.modules[__name__].__dict__["hypernetworks"] = hypernetworks


def refresh_checkpoints():
    from modules import sd_models

    sd_models.list_models()


def walk_files(path, allowed_extensions=None):
    for root, _, files in os.walk(path or "", followlinks=True):
        for name in sorted(files):
            if allowed_extensions is None or os.path.splitext(name)[1].lower() in allowed_extensions:
                yield os.path.join(root, name)


class Shared(types.ModuleType):
    @property
    def sd_model(self):
        from modules import sd_models

        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        from modules import sd_models

        sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared
_ = paths_internal
