"""modules.lowvram: --lowvram / --medvram(-sdxl) move parts of the model between CPU and GPU during use."""

from modules import shared

module_in_gpu = None


def is_needed(sd_model):
    return shared.cmd_opts.lowvram or shared.cmd_opts.medvram or \
        (shared.cmd_opts.medvram_sdxl and hasattr(sd_model, "conditioner"))


def is_enabled(sd_model):
    return getattr(sd_model, "lowvram", False)
