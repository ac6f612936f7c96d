"""modules.processing: StableDiffusionProcessingTxt2Img + process_images with a small Euler sampler on the
live `shared.sd_model` (conditioning through the hijacked text encoders, CFG, VAE decode → PIL).

Before sampling, as A1111: the embedding folders are rescanned unless `do_not_reload_embeddings` (a non-forced
reload: only when a folder's mtime changed), extra-network tags are taken out of the prompts and, unless
`disable_extra_networks`, `<hypernet:name:mult>` tags load `shared.loaded_hypernetworks` (none → emptied).

The Interrupt and Skip flags work as in A1111: each picture (iteration of n_iter) first clears
`state.skipped` (a Skip pressed before the picture started is forgotten), then stops the loop if
`state.interrupted`; inside a picture, either flag ends the sampling before its next step and the latent
reached so far is decoded and returned (a half-drawn picture). Skip ends only that picture; nothing here
clears `state.skipped` after it, so it stays set until the next picture starts (or the next job begins).
"""

import logging

import numpy as np
import torch
from PIL import Image

from modules import devices, prompt_parser, sd_models, shared


class StableDiffusionProcessing:
    cached_uc = [None, None]
    cached_c = [None, None]
    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]

    def __init__(self, sd_model=None, outpath_samples=None, outpath_grids=None, prompt="", styles=None, seed=-1,
                 subseed=-1, sampler_name=None, scheduler=None, batch_size=1, n_iter=1, steps=50, cfg_scale=7.0,
                 width=512, height=512, negative_prompt="", do_not_save_samples=False, do_not_save_grid=False,
                 override_settings=None, override_settings_restore_afterwards=True, do_not_reload_embeddings=False,
                 disable_extra_networks=False, **kwargs):
        self.prompt, self.negative_prompt, self.seed, self.steps, self.cfg_scale = prompt, negative_prompt, seed, \
            steps, cfg_scale
        self.sampler_name, self.scheduler, self.batch_size, self.n_iter = sampler_name, scheduler, batch_size, n_iter
        self.width, self.height = width, height
        self.do_not_save_samples, self.do_not_save_grid = do_not_save_samples, do_not_save_grid
        self.override_settings = dict(override_settings or {})
        self.override_settings_restore_afterwards = override_settings_restore_afterwards
        self.do_not_reload_embeddings = do_not_reload_embeddings
        self.disable_extra_networks = disable_extra_networks
        self.scripts = None
        self.closed = False

    @property
    def sd_model(self):
        return shared.sd_model

    def close(self):
        self.closed = True


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, enable_hr=False, **kwargs):
        super().__init__(**kwargs)
        self.enable_hr = enable_hr


class Processed:
    def __init__(self, p, images, seed, info="", all_seeds=None, infotexts=None):
        self.images, self.seed, self.info = images, seed, info
        self.all_seeds = all_seeds or [seed]
        self.infotexts = infotexts or [info] * len(images)
        self.prompt = p.prompt


def _conds(model, prompts, steps, cache, width, height, negative=False):
    key = (tuple(prompts), steps, width, height)
    if cache[0] == key:
        return cache[1]
    batch = prompt_parser.SdConditioning(prompts, is_negative_prompt=negative, width=width, height=height)
    cond = model.get_learned_conditioning(batch)
    cache[0], cache[1] = key, cond
    return cond


def _model_out(model, x, t, cond):
    ts = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    return model.apply_model(x, ts, cond)


def _hypernet_handler(tag_args):
    from modules.hypernetworks import hypernetwork

    hypernetwork.load_hypernetworks([a[0] for a in tag_args], [float(a[1]) if len(a) > 1 else 1.0 for a in tag_args])


# extra-network kind → handler(list of argument lists); every kind is called for every picture, with an empty
# list when the prompt has no tag of it (so a kind used by the last picture is switched off by the next one).
# The Lora stand-in (lora_ext/networks.py) adds "lora" when it is imported.
extra_network_handlers = {"hypernet": _hypernet_handler}


def _activate_extra_networks(p):
    """The prompts without their `<kind:args>` tags, after handing the positive prompt's tags to the handlers."""
    from lib_sdtrain.models.prompt import strip_extra_networks

    prompt, found = strip_extra_networks(p.prompt)
    negative, _ = strip_extra_networks(p.negative_prompt)
    if not p.disable_extra_networks:
        for kind, handler in extra_network_handlers.items():
            handler([args for k, args in found if k == kind])
    return prompt, negative


@torch.no_grad()
def process_images(p):
    if p.scheduler is None:   # 1.9+: a p made without a scheduler is given "Automatic", with a warning each time
        logging.warning('Sampler Scheduler autocorrection: "%s" -> "%s", "None" -> "Automatic"', p.sampler_name,
                        p.sampler_name)
        p.scheduler = "Automatic"
    overrides = p.override_settings
    # A1111 1.10.1 (processing.py): only the options already in opts.data are stored and put back; opts.data
    # holds what config.json holds, so an option never saved keeps the override's value afterwards
    stored = {key: shared.opts.data[key] for key in overrides if key in shared.opts.data}
    if sd_models.checkpoint_aliases.get(overrides.get("sd_model_checkpoint")) is None:
        overrides.pop("sd_model_checkpoint", None)        # unknown or absent: the configured checkpoint
        sd_models.reload_model_weights()
    for key, value in overrides.items():                  # applied without their change callbacks
        shared.opts.set(key, value, is_api=True, run_callbacks=False)
    if "sd_model_checkpoint" in overrides:
        sd_models.reload_model_weights()
    try:
        model = p.sd_model
        state = shared.state
        if not p.do_not_reload_embeddings:
            from modules import sd_hijack

            sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings()
        prompt, negative = _activate_extra_networks(p)
        if state.job_count == -1:
            state.job_count = p.n_iter
        images, seeds = [], []
        # 1.8+: each generation starts from the model's stored schedule, rescaled when the "Noise schedule for
        # sampling" option asks for zero terminal SNR (its last step's alpha-bar set to a tiny floor)
        model.alphas_cumprod = model.alphas_cumprod_original
        if shared.opts.sd_noise_schedule == "Zero Terminal SNR":
            root = model.alphas_cumprod_original.double().sqrt()
            root = (root - root[-1]) * root[0] / (root[0] - root[-1])
            zero = root ** 2
            zero[-1] = 4.8973451890853435e-08
            model.alphas_cumprod = zero.float()
        ac = model.alphas_cumprod.float().cpu()
        sigmas_all = ((1 - ac) / ac) ** 0.5
        for n in range(p.n_iter):
            if state.skipped:
                state.skipped = False
            if state.interrupted:
                break
            seed = int(p.seed) + n
            seeds.append(seed)
            c = _conds(model, [prompt] * p.batch_size, p.steps, StableDiffusionProcessing.cached_c, p.width,
                       p.height)
            uc = _conds(model, [negative] * p.batch_size, p.steps, StableDiffusionProcessing.cached_uc,
                        p.width, p.height, negative=True)
            gen = torch.Generator("cpu").manual_seed(seed)
            ts = torch.linspace(999, 0, p.steps).round().long()
            sig = torch.cat([sigmas_all[ts], torch.zeros(1)])
            x = torch.randn((p.batch_size, 4, p.height // 8, p.width // 8), generator=gen) * sig[0]
            x = x.to(devices.device)
            state.sampling_steps = p.steps
            for i, t in enumerate(ts):
                if state.interrupted or state.skipped:    # A1111's denoiser stops; the last latent is decoded
                    break
                s = float(sig[i])
                c_in = 1.0 / (s ** 2 + 1) ** 0.5
                out_c = _model_out(model, x * c_in, t, c)
                out_u = _model_out(model, x * c_in, t, uc)
                out = out_u + p.cfg_scale * (out_c - out_u)
                if model.parameterization == "v":
                    denoised = x * (1.0 / (s ** 2 + 1)) + out * (-s / (s ** 2 + 1) ** 0.5)
                else:
                    denoised = x - s * out
                # A1111's step callback (k-diffusion calls it with the step's index, counted from 0, after the
                # model call and before the step moves x): it records the step and ticks the console bar
                state.sampling_step = i
                shared.total_tqdm.update()
                x = x + (x - denoised) / s * (float(sig[i + 1]) - s)
            pixels = model.decode_first_stage(x)
            arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            images += [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
            state.nextjob()
        return Processed(p, images, seeds[0] if seeds else p.seed, all_seeds=seeds)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored.items():
                shared.opts.set(k, v, is_api=True, run_callbacks=False)
