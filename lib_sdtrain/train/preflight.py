"""Check before work: everything about a run's inputs that can fail is checked before the dataset's pictures are
opened and before the first step, in the CLI, the tab and the API alike (the loop calls `preflight`, and
`JobManager.start` calls it before queueing so the tab and the API answer at once).

Checked, in order (each a `UserError` with one clear line):
  1. the model: the file opens and is a Stable Diffusion checkpoint (header only; the host's loaded model when
     none is given), which also gives its native size; from the header's shapes, a LoRA run on an SD1/SD2 UNet
     whose layout A1111 would put the layers of wrongly (not 2 res blocks per level) is refused, and a UNet of
     other than stock widths whose attention heads nothing gives is noted (the stock rule is assumed);
  2. settings that depend on the model: resolution 0 → the native size; bucket bounds 0 → half and twice the
     resolution;
  3. the output folder and the run folder can be written (a probe file, removed at once), a full-model run's
     outputs would not land on its base model's file (even when overwriting), and the output name is free (no
     final, epoch or step file of that name, no NAME.yaml beside a checkpoint, no run folder; unless
     overwriting or resuming);
  4. the dataset's folders and captions (a scan without opening any picture); what the run will not use is
     reported: folders without a usable repeat count, picture folders with no pictures, pictures in their
     sub-folders, caption files of another extension, and files of types it does not read; a link to a picture
     folder under another numbered name is said to train those pictures twice;
  5. the prompt template (a built-in name or a readable file), allowed for embedding, hypernetwork and LoRA;
  6. an embedding's token appears in the prompts the run will use (captions, caption prefix/suffix, template).
Names (output name, token) are checked by the settings' own validation, which runs first.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models.native import default_buckets, default_buckets_for  # noqa: F401 - the tabs take both from here
from .optim import rate_warnings
from .settings import TrainSettings

TEMPLATE_METHODS = ("embedding", "hypernetwork", "lora")


@dataclass
class Checked:
    """What the preflight found, for the loop."""

    cfg: TrainSettings
    native: int = 0
    native_source: str = ""
    template: Any = None                 # data.templates.PromptTemplate | None
    template_name: str = ""              # what [name] becomes
    warnings: list[str] = field(default_factory=list)


class FolderHost:
    """The standalone host's folders and model check without torch, so the command line refuses bad input
    before the seconds that importing torch takes (the full host checks the same again)."""

    name = "standalone"

    def __init__(self, output_root: str | Path | None = None) -> None:
        from ..hosts import standalone_output_root

        self.output_root = standalone_output_root(output_root)

    def output_dir(self, kind: str) -> Path:
        from ..hosts import OUTPUT_KINDS

        return self.output_root / OUTPUT_KINDS[kind]

    def native_resolution(self, model: str | None = None) -> tuple[int, str]:
        from ..hosts import default_model
        from ..models.native import probe_model

        probe = probe_model(model or default_model())
        return probe.native, f"{probe.path.name}: {probe.source}"

    def model_file(self, model: str | None = None) -> Path | None:
        from ..hosts import default_model

        return Path(model).expanduser() if model else default_model()


def base_model_file(cfg: TrainSettings, host: Any) -> Path | None:
    """The file of the run's base model (the host's current model when none is given), without loading it;
    None when the host cannot tell."""
    fn = getattr(host, "model_file", None)
    if callable(fn):
        return fn(cfg.model or None)
    return Path(cfg.model).expanduser() if cfg.model else None


def native_size(cfg: TrainSettings, host: Any) -> tuple[int, str]:
    """(native size, where it came from) of the run's model; UserError when the model cannot be used."""
    fn = getattr(host, "native_resolution", None)
    if callable(fn):
        return fn(cfg.model or None)
    if cfg.model:
        from ..models.native import probe_model

        probe = probe_model(cfg.model)
        return probe.native, probe.source
    return 512, "no model information; 512 assumed"


def with_model_defaults(cfg: TrainSettings, native: int) -> TrainSettings:
    """Resolution 0 → `native`; bucket bounds 0 → (resolution / 2, resolution × 2) on the 64-px step."""
    resolution = cfg.resolution or native
    low, high = default_buckets(resolution)
    changes = {k: v for k, v in (("resolution", resolution), ("min_bucket", cfg.min_bucket or min(low, resolution)),
                                 ("max_bucket", cfg.max_bucket or max(high, resolution)))
               if getattr(cfg, k) != v}
    return cfg.replace(**changes) if changes else cfg


def check_writable(folder: Path, what: str) -> None:
    """The folder (or, if it does not exist yet, its nearest existing parent) accepts a new file."""
    folder = Path(folder).expanduser()
    probe_in = folder
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise UserError(f"the {what} {folder} cannot be created: {probe_in} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_in, prefix=".sdtrain-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"the {what} {folder} is not writable ({e.strerror or e} in {probe_in}); choose another "
                        "output folder or fix its permissions") from None
    if not os.access(probe_in, os.W_OK | os.X_OK):   # a probe can pass as root where the user's run would not
        raise UserError(f"the {what} {folder} is not writable (no write permission on {probe_in})")


def contains_word(text: str, word: str) -> bool:
    """Whether `word` occurs in `text` as the tokenizer sees words: case-insensitive, not inside a longer run of
    letters (CLIP splits letters from digits and punctuation, so 'zwx,' and 'zwx2' hold 'zwx', 'zwxy' does not)."""
    return re.search(r"(?<![^\W\d_])" + re.escape(word.lower()) + r"(?![^\W\d_])", text.lower()) is not None


def _captions(cfg: TrainSettings) -> tuple[list[str], list[str]]:
    """The instance captions (prefix/suffix applied) and what the run will not use (the scan's folder notes that
    say so, and the files of types it does not read), without opening a picture."""
    from ..data.scan import LINKED_FOLDER_NOTE, scan_dataset, shown

    if not cfg.data:
        raise UserError("no dataset folder given (data)")
    reg = cfg.reg_data if cfg.reg_data and Path(cfg.reg_data).expanduser().is_dir() else None
    report = scan_dataset(cfg.data, reg_path=reg, caption_ext=cfg.caption_ext, check=False)
    # and the links that train a folder's pictures a second time ("2_more -> 1_dog": kohya trains both)
    unused = [shown(n) for n in report.notes if "not used" in n or LINKED_FOLDER_NOTE in n]
    if report.skipped:
        names = [report.name(p) for p, _ in report.skipped]
        unused.append(f"{len(names)} files in the picture folders are not a picture type Training Lab reads and are "
                      f"not used: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''} (convert pictures to PNG, "
                      "JPEG or WebP)")
    return [with_affixes(cfg, rec.caption) for rec in report.instance], unused


def with_affixes(cfg: TrainSettings, caption: str) -> str:
    """A caption with the run's caption_prefix and caption_suffix, as every training prompt has them."""
    if cfg.caption_prefix:
        caption = cfg.caption_prefix + " " + caption
    if cfg.caption_suffix:
        caption = caption + " " + cfg.caption_suffix
    return caption


def draws_class_pictures(cfg: TrainSettings) -> bool:
    """Whether the run is a DreamBooth run that draws class pictures (a class prompt), into its reg_data."""
    dreambooth = getattr(cfg, "dreambooth", None) if cfg.method == "dreambooth" else None
    return bool(str(getattr(dreambooth, "class_prompt", "") or "").strip())


def draws_with_sample_sampler(cfg: TrainSettings) -> bool:
    """Whether the run draws pictures with `sample_sampler`: control pictures (prompts and a frequency), or a
    DreamBooth run's class pictures."""
    control = bool(cfg.sample_prompts or cfg.control_prompts) and bool(cfg.sample_every_n_epochs
                                                                       or cfg.sample_every_n_steps)
    return control or draws_class_pictures(cfg)


def preflight(cfg: TrainSettings, host: Any) -> Checked:
    """Run every check (see the module docstring); returns the settings with the model's defaults filled in."""
    from ..data.templates import load_template

    cfg.validate()
    native, source = native_size(cfg, host)
    notes = check_model_unet(cfg, host)
    out = Checked(with_model_defaults(cfg, native), native, source, warnings=notes)
    cfg = out.cfg
    out.warnings.extend(rate_warnings(cfg))   # allowed, but far from the method's usual rates

    from ..methods import create_method, method_spec
    from .checkpoints import RunFiles

    kind = method_spec(cfg.method).output_kind
    method = create_method(cfg)          # its file suffixes; builds nothing heavy, imports no torch
    out_dir = Path(cfg.output).expanduser() if cfg.output else Path(host.output_dir(kind))
    run_dir = Path(host.output_dir("runs")) / cfg.name
    check_writable(out_dir, "output folder")
    check_writable(run_dir, "run folder")
    if kind == "checkpoint":   # a taken name may be overwritten, the base model never: refused here, up front
        from ..methods.fullmodel import refuse_base_output

        refuse_base_output(out_dir, cfg.name, method.file_suffix, base_model_file(cfg, host))
    if cfg.resume:       # a missing, damaged or half-written state (verified again by the loop, hashed once)
        from .state import read_manifest

        state_dir, manifest = read_manifest(cfg.resume)   # (an older version's provably complete state is converted)
        if manifest.get("migrated"):
            out.warnings.append(manifest["migrated"])
        RunFiles(out_dir, state_dir.parent, cfg.name, method.file_suffix, method.same_name_suffixes,
                 method.side_suffixes).check_resume_target(manifest["config"], Path(host.output_dir(kind)),
                                                           cfg.overwrite)
    else:                # a taken output name (the loop checks again, with the resumed run's own folder)
        RunFiles(out_dir, run_dir, cfg.name, method.file_suffix, method.same_name_suffixes,
                 method.side_suffixes).check_free(cfg.overwrite)

    check_sampler = getattr(host, "check_sampler", None)   # a sampler the host has none of: refused up front
    if callable(check_sampler) and draws_with_sample_sampler(cfg):
        try:
            check_sampler(cfg.sample_sampler)
        except UserError as e:
            raise UserError(f"sample_sampler: {e}") from None
    host_notes = getattr(host, "training_notes", None)   # the host's own word on how it will use the output
    if callable(host_notes):
        out.warnings.extend(host_notes(cfg))
    if not cfg.data and cfg.resume:
        return out                # the run's settings come from its state; the loop checks them again
    check_inputs(cfg)
    captions, unused = _captions(cfg)
    out.warnings.extend(unused)

    out.template = load_template(cfg.prompt_template)
    if out.template is not None and cfg.method not in TEMPLATE_METHODS:
        raise UserError(f"prompt templates are for {', '.join(TEMPLATE_METHODS)} runs; a {cfg.method} run uses "
                        "its captions (or instance prompts)")
    out.template_name = cfg.embedding.token if cfg.method == "embedding" else cfg.name

    check_token_in_captions(cfg, out.template, captions)
    return out


def check_model_unet(cfg: TrainSettings, host: Any) -> list[str]:
    """What the model file's header says about its UNet, before the dataset is scanned; notes for the run.

    - A LoRA run that trains the UNet of an SD1/SD2 model whose layout A1111 would misplace its layers on is
      refused (attaching the adapters refuses the same, but only after the model has loaded).
    - Standalone, a UNet of other than its family's stock widths whose attention heads nothing gives (no
      `.yaml` beside it, no metadata) gets a note: shapes cannot tell head counts, so the stock rule is assumed.
      (A1111 builds its own model from its own config; what it assumes is its business.)
    Files the header cannot describe are left to the loader, which names what is wrong."""
    path = base_model_file(cfg, host)
    if path is None or not Path(path).is_file():
        return []
    from ..models import detect, ldm_unet
    from ..models.native import read_model_header
    from ..models.targets import a1111_misplaced_module, stock_layout_refusal

    path = Path(path)
    shapes, metadata = read_model_header(path)
    family = detect.detect_family(shapes)
    hints = detect.unet_hints({**detect.read_yaml_hints(path), **detect.read_metadata_hints(metadata)})
    unet = {k[len(ldm_unet.PREFIX):]: v for k, v in shapes.items() if k.startswith(ldm_unet.PREFIX)}
    try:
        config = ldm_unet.unet_config_from_ldm(unet, family, hints)
    except (KeyError, StopIteration, IndexError, ValueError):
        return []      # a damaged UNet: the loader names what is missing
    if cfg.method == "lora" and cfg.lora.train_unet and family in ("sd1", "sd2"):
        groups, _ = cfg.lora.groups()
        misplaced = a1111_misplaced_module(config, conv="unet_conv" in groups)
        if misplaced:
            raise stock_layout_refusal(family, *misplaced)
    assumed = ldm_unet.assumed_heads(family, hints)
    widths = config["block_out_channels"]
    if assumed and getattr(host, "name", "") == "standalone" and widths != ldm_unet.STOCK_LAYOUTS[family]["widths"]:
        note = (f"{path.name}: {assumed}. Its UNet is not {family.upper()}'s stock width ({widths} channels), so "
                "if it was trained with other head counts it will not work as it should: put its .yaml beside it "
                f"({path.with_suffix('.yaml').name}, A1111's convention) with num_heads or num_head_channels")
        return [note]
    return []


def check_inputs(cfg: TrainSettings) -> None:
    """The bucket bounds against the resolution, and the other folders and files the run reads besides its
    dataset; the loop found these only once the job had started (the API had answered 200)."""
    if cfg.enable_buckets:
        from ..data.buckets import check_bucket_settings

        check_bucket_settings(cfg.resolution, cfg.min_bucket, cfg.max_bucket)
    if cfg.reg_data and not draws_class_pictures(cfg) and not Path(cfg.reg_data).expanduser().is_dir():
        raise UserError(f"regularization folder not found: {cfg.reg_data} (reg_data)")
    if cfg.masked_loss and cfg.mask_dir and not Path(cfg.mask_dir).expanduser().is_dir():
        raise UserError(f"mask_dir: {cfg.mask_dir} is not a folder")
    if cfg.start_from and not cfg.resume and not Path(cfg.start_from).expanduser().is_file():
        raise UserError(f"start_from: {cfg.start_from} is not a file")


def check_token_in_captions(cfg: TrainSettings, template: Any, captions: list[str], held_out: int = 0) -> None:
    """An embedding run must meet its token in a training prompt (caption, or template line), else its vectors
    never change; UserError before any work. `held_out`: how many pictures validation_split keeps out of
    `captions` (the loop checks again after the split, with the training captions only)."""
    if cfg.method != "embedding":
        return
    token = cfg.embedding.token
    prompts = template.prompts(token, captions) if template is not None else captions
    if any(contains_word(p, token) for p in prompts):
        return
    where = f"the prompt template {template.source!r} has no [name] and " if template is not None else ""
    which, held = "", ""
    if held_out:
        which = "training "
        held = (f" (validation_split holds out {held_out} pictures, among them all whose captions contain it: "
                "lower validation_split, or another seed holds out others)")
    raise UserError(
        f"embedding: {where}none of the {len(captions)} {which}captions contains the token {token!r}{held}, so its "
        f"vectors would never be trained. Put the token into the captions (e.g. 'a photo of {token}'), set "
        "caption_prefix to it, or choose a prompt template such as 'subject' (prompt_template)")
