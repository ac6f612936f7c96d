"""The one training loop, for every method, read top to bottom.

    settings → dataset scan → model from the host → method.attach → optimizer, schedule → (resume) →
    for each step: batch → text conditioning → noise → UNet → loss → backward → step → log / save / samples
    → final save → method.detach (always) → host.release (always)

Every random draw is derived from (seed, position in the run): the data order from (seed, epoch), the noise,
timesteps and dropout of a batch from (seed, batch number). A run stopped at any save and resumed therefore
produces the same weights as one that never stopped, and several processes (torchrun) agree on the order.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import save_config
from ..data.captions import SIDES
from ..errors import DiskError, UserError
from ..events import Events, StopToken
from ..formats.files import atomic_write
from ..hosts import Host, SampleRequest
from . import noise as N
from . import state as S
from .checkpoints import RunFiles, resume_hint
from .distributed import Dist, launch_warnings
from .monitor import LossLog, LossMonitor
from .optim import make_optimizer
from .plan import plan_data, plan_record, resumed_total, step_plan  # noqa: F401 - step_plan: part of this module's interface
from .preflight import base_model_file, check_token_in_captions, preflight, with_affixes
from .schedules import make_scheduler, resumed_schedule_note
from .settings import TrainSettings
from .speed import Speed, fixed_captions


@dataclass
class TrainResult:
    final: Path | None = None
    saved: list[Path] = field(default_factory=list)
    steps: int = 0
    epochs_done: int = 0
    stopped: str = ""                 # "" finished | "stopped" | "diverged"
    losses: list[float] = field(default_factory=list)
    run_dir: Path | None = None
    bleeding: list[float] = field(default_factory=list)   # set-B change per control round
    validation: list[tuple[int, float]] = field(default_factory=list)   # (step, held-out loss) per measurement
    read_only_kept: list[Path] = field(default_factory=list)   # saves keep_last spared: the user made them read-only


def make_method(cfg: TrainSettings):
    from ..methods import create_method

    return create_method(cfg)


def train(cfg: TrainSettings, host: Host, events: Events | None = None, stop: StopToken | None = None
          ) -> TrainResult:
    """Run one training job. Raises UserError for bad settings or data; always gives the model back."""
    from ..data.captions import CaptionOptions
    from ..data.dataset import TrainData
    from ..data.masks import attach_mask_dir, check_masks
    from ..data.scan import scan_dataset, shown
    from .validation import Validation, measure_changes, split_validation

    events, stop = events or Events(), stop or StopToken()
    dist = Dist.setup()
    for text in launch_warnings(dist.launch, cfg):
        events.warning(text)
    method = make_method(cfg)
    checked = preflight(cfg, host)           # model, output, data folders, template, token: before any work
    cfg = checked.cfg                        # with the model's native size and bucket bounds filled in
    events.status(f"resolution {cfg.resolution} px, buckets {cfg.min_bucket}-{cfg.max_bucket} "
                  f"(model: {checked.native_source})")
    for note in checked.warnings:
        events.warning(note)

    # ---- output files (checked before any work, so nothing the user owns is replaced) -------------------
    out_dir = Path(cfg.output) if cfg.output else host.output_dir(method.output_kind)
    resuming = bool(cfg.resume)
    if resuming:      # a missing, damaged or half-written state is refused before any work
        state_dir, resumed = S.read_manifest(cfg.resume)
    run_dir = state_dir.parent if resuming else host.output_dir("runs") / cfg.name   # a resumed run stays put
    files = RunFiles(out_dir, run_dir, cfg.name, method.file_suffix, method.same_name_suffixes,
                     method.side_suffixes)
    files.check_free(overwrite=cfg.overwrite or resuming)
    if resuming:      # its own files are replaced; under another name or in another folder, none are its own
        files.check_resume_target(resumed["config"], host.output_dir(method.output_kind), cfg.overwrite)
    # with overwrite on, an epoch or step save of this name as the start would be replaced by the run's own save
    # of that name part-way, and pruned by keep_last. (The final file is another matter: training it further in
    # place, as A1111 trains an existing embedding, replaces it once, at the end.)
    if cfg.start_from and not resuming and files.is_intermediate(Path(cfg.start_from).expanduser().resolve()):
        raise UserError(f"start_from {cfg.start_from} is an epoch or step save of this run's name: the run's own "
                        "saves would replace it part-way (and keep_last delete it). Copy it elsewhere first, or "
                        "give the run another name")
    if dist.main:
        stale = S.clean_stale_temp_files(files.out_dir, cfg.name, (method.file_suffix, *files.same_name_suffixes,
                                                                   *files.side_suffixes), files.run_dir)
        if stale:
            events.status(f"removed {len(stale)} temporary file(s) an interrupted save left behind")

    if resuming:   # the base, checked once before anything uses it (Dreambooth's class pictures are drawn with
        # it and kept for later runs) by its file; again below on the loaded model (the hash is read once)
        early = S.file_identity(base_model_file(cfg, host))
        if early is not None:
            S.check_base(resumed, early)       # UserError on another model; an unchecked state's note comes below

    # Dreambooth draws missing class pictures and makes them the reg data (the other methods: no-op)
    if not dist.main:
        dist.barrier()                # the main process draws them once; the others then find them all
    cfg = method.prepare_data(cfg, host, events, stop)
    if dist.main:
        dist.barrier()
    if dist.agree_stop(stop):     # several processes: all of them return here, or none
        return TrainResult(stopped="stopped")

    # ---- data ---------------------------------------------------------------------------------------
    if not cfg.data:
        raise UserError("no dataset folder given (data)")
    if cfg.start_from and not resuming and not Path(cfg.start_from).is_file():   # resuming: the state decides
        raise UserError(f"start_from: {cfg.start_from} is not a file")
    events.status(f"scanning {cfg.data}")
    report = scan_dataset(cfg.data, reg_path=cfg.reg_data or None, caption_ext=cfg.caption_ext)
    method.prepare_records(report.records)   # Dreambooth: instance / class prompts replace the captions
    records = report.usable
    for rec in report.records:   # one line per picture left out, then how many of how many
        if not rec.usable:
            why = "; ".join(shown(p.message) for p in rec.problems if p.severity == "error")
            events.warning(f"skipped {report.name(rec.path)}: {why}")
    summary = report.skipped_summary()
    if summary:
        events.warning(summary)
    records, held = split_validation(records, cfg.validation_split, cfg.seed)
    if held:
        events.status(f"validation: {len(held)} instance pictures held out of training "
                      f"(e.g. {report.name(held[0].path)}); their loss is measured as the run goes")
        check_token_in_captions(cfg, checked.template, [with_affixes(cfg, r.caption) for r in records
                                                        if not r.is_regularization], len(held))
    plan, sampler, plan_info = plan_data(cfg, records, dist.world)
    per_step = cfg.grad_accum * dist.world   # batches an optimizer step takes, all processes together
    events.status(plan_info["text"])
    if resuming:   # another dataset, batch size or accumulation: the state's batches in the new epochs
        plan_info["total_steps"], moved = resumed_total(resumed.get("plan"), plan_record(plan_info, per_step), cfg,
                                                        resumed["step"], resumed["batch_no"])
        if moved:
            events.warning(moved)
    total_steps = plan_info["total_steps"]
    if "hint" in plan_info:
        events.warning(plan_info["hint"])
    captions = CaptionOptions(shuffle=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens,
                              dropout_rate=cfg.caption_dropout, tag_dropout_rate=cfg.tag_dropout,
                              prefix=cfg.caption_prefix, suffix=cfg.caption_suffix,
                              keep_tokens_separator=cfg.keep_tokens_separator, wildcards=cfg.caption_wildcards,
                              dropout_every_n_epochs=cfg.caption_dropout_every_n_epochs)
    captions.validate()
    data = TrainData(records, plan, captions, seed=cfg.seed, max_steps=total_steps, template=checked.template,
                     name=checked.template_name, flip=cfg.flip_aug, masked=cfg.masked_loss,
                     swap_sides=cfg.flip_swap_sides)
    if cfg.flip_aug:
        sided = [r for r in records if SIDES.search(r.caption or "")]   # captions mirroring would contradict
        if sided and cfg.flip_swap_sides:
            events.status(f"flip_swap_sides: {len(sided)} of {len(records)} captions name a side; mirrored, they "
                          "say the other one")
        elif sided:
            events.warning(f"flip_aug is on and {len(sided)} of {len(records)} captions name a side (left/right, "
                           f"e.g. {report.name(sided[0].path)}): mirrored, those pictures contradict their captions. On "
                           "the toy subject, whose captions say where the heart is, mirroring lowered fidelity, and "
                           "flip_swap_sides, which swaps left and right in the captions of mirrored pictures, won "
                           "it back (bench/README.md, \"Session 18\" and \"Session 21\")")
    if cfg.masked_loss:
        if cfg.mask_dir:
            roots = [Path(cfg.data).expanduser(), *([Path(cfg.reg_data).expanduser()] if cfg.reg_data else [])]
            found = attach_mask_dir(records + held, cfg.mask_dir, roots)
            events.status(f"mask_dir: masks for {found} of {len(records) + len(held)} pictures")
        blank_ids = {id(r) for r in check_masks(records + held)}
        if not any(r.mask is not None or r.transparent for r in records):
            events.warning(f"masked_loss is on, but none of the {len(records)} pictures has transparency or a mask "
                           "file: every picture trains whole")
        else:   # where each picture's weights come from (a mask file wins over the picture's own alpha)
            files_n = sum(r.mask is not None for r in records)
            alpha_n = sum(r.mask is None and bool(r.transparent) for r in records)
            events.status(f"masked_loss: {files_n} of {len(records)} training pictures weighted by a mask file, "
                          f"{alpha_n} by their alpha channel, {len(records) - files_n - alpha_n} whole")
        blank = [r for r in records if id(r) in blank_ids]
        why = "(fully transparent, or a mask file black all over)"
        if blank and len(blank) == len(records):
            raise UserError(f"masked_loss: every picture's loss weight is 0 everywhere {why}, e.g. "
                            f"{report.name(blank[0].path)}: the run would train nothing. White in a mask (opaque in "
                            "alpha) marks what trains")
        if blank:
            events.warning(f"masked_loss: {len(blank)} of {len(records)} pictures weigh 0 everywhere {why}, e.g. "
                           f"{report.name(blank[0].path)}: they train nothing")
        blank_held = [r for r in held if id(r) in blank_ids]
        if blank_held:
            events.warning(f"masked_loss: {len(blank_held)} of the {len(held)} held-out pictures weigh 0 "
                           f"everywhere {why}, e.g. {report.name(blank_held[0].path)}: their validation loss is always 0")
    elif any(r.mask is not None for r in records):
        events.status(f"{sum(r.mask is not None for r in records)} pictures have a mask file beside them "
                      "(\"-masklabel\"); it weights the loss only with masked_loss on")

    parts = host.load(cfg.model or None)
    result = TrainResult(run_dir=files.run_dir)
    log, modes, speed = None, {}, None
    try:
        if cfg.zero_terminal_snr and parts.prediction != "v":
            raise UserError("zero_terminal_snr is for v-prediction models: this model predicts the noise "
                            f"({parts.prediction}), and at the last step its input would be that noise itself")
        # ---- the base model: recorded in every state, the same one on resuming --------------------------
        base = S.base_identity(parts.info) if (cfg.save_state or resuming) else None
        if resuming:
            note = S.check_base(resumed, base)   # UserError when another model is loaded / given
            if note:
                events.warning(note)

        # ---- model and optimizer ----------------------------------------------------------------------
        torch.manual_seed(cfg.seed)   # adapter initialisation is random: the same seed, the same start
        groups = method.attach(parts, unet_lr=cfg.unet_lr or cfg.learning_rate,
                               text_encoder_lr=cfg.text_encoder_lr or cfg.learning_rate)
        trainable = [p for g in groups for p in g["params"]]
        if cfg.start_from and not resuming:   # another file's weights are the start
            missing = method.load_weights(cfg.start_from, strict=False)
            bad = S.nonfinite(method.training_state())   # they would make the first step's loss NaN
            if bad:
                raise UserError(f"start_from: {Path(cfg.start_from).name} holds weights that are not finite (NaN "
                                f"or inf, e.g. in {bad[0]}): no run can go on from them; start from an earlier "
                                "save of that run, or fresh")
            events.status(f"starting from the weights of {Path(cfg.start_from).name}")
            if missing:
                events.warning(f"{len(missing)} parts of this network are not in {Path(cfg.start_from).name} "
                               f"(e.g. {', '.join(map(str, missing[:3]))}): they start fresh")
        if cfg.adapter_ema:   # saves and states carry an average of the trained weights (train/average.py)
            from .average import AveragedMethod

            method = AveragedMethod(method, trainable, cfg.adapter_ema_decay)
        # networks with trained parts run in train mode (adapter dropout on), as kohya does; restored after
        modes = {m: m.training for net in (parts.unet, *parts.text_encoders) for m in net.modules()}
        for net in (parts.unet, *parts.text_encoders):
            if any(p.requires_grad for p in net.parameters()):
                net.train()
        speed = Speed(cfg, parts, method, events).apply()   # attention, VAE precision, layout, compile, text cache
        # FSDP (several processes): the trained UNet weights become sharded tensors, so before the optimizer
        groups = dist.shard(parts, method, groups, cfg.distributed, mixed_precision=cfg.mixed_precision,
                            torch_compile=cfg.torch_compile)
        trainable = [p for g in groups for p in g["params"]]
        optimizer = make_optimizer(cfg.optimizer, groups, cfg.learning_rate, cfg.weight_decay,
                                   kernel=cfg.optimizer_kernel)
        scheduler = make_scheduler(optimizer, cfg.lr_scheduler, total_steps, cfg.lr_warmup_steps, cfg.lr_cycles,
                                   cfg.lr_power)
        device = parts.device
        amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
        if cfg.gradient_checkpointing and hasattr(parts, "set_gradient_checkpointing"):
            parts.set_gradient_checkpointing(True)
        dist.wrap(parts, trainable, find_unused=cfg.ddp_find_unused_parameters,
                  trains_text=method.trains_text_encoder())
        if dist.world > 1:
            events.status(dist.describe())
        speed.check_estimate()   # CUDA: warn before the first step when the estimate nears the GPU's memory
        step, batch_no = 0, 0

        def save_state(**how: Any) -> None:   # the run state at the current step; how: write=, final=
            S.save_run_state(files.state_dir, method, optimizer, scheduler, scaler, step=step, batch_no=batch_no,
                             losses=result.losses, cfg=cfg, saved=result.saved, base=base,
                             validation=result.validation, plan=plan_record(plan_info, per_step), **how)

        def weights_bad() -> list[str]:   # non-finite trained tensors, the same answer in every process
            return dist.nonfinite(trainable, lambda: S.nonfinite(method.training_state()))   # FSDP: each its part

        if resuming:
            state = S.load_run_state(cfg.resume, method, optimizer, scheduler, scaler)
            dist.shard_optimizer_state(optimizer)   # FSDP: the whole saved moments → this process's part
            step, batch_no = state["step"], state["batch_no"]
            result.losses = state["losses"]
            changed = measure_changes(state["config"], cfg)
            if held and not changed:
                result.validation = list(state["validation"])   # the same held-out pictures: the history goes on
            elif held and state["validation"]:
                events.status(f"the validation loss starts a new history: {', '.join(changed)} differ from the "
                              "state's, so its measurements cannot be compared with the new ones (other pictures, "
                              "noise levels or loss)")
            if held and step and {"validation_split", "seed"} & set(changed):
                was = state["config"]
                events.warning(f"validation: the state's {step} steps were trained with validation_split "
                               f"{was.get('validation_split')} and seed {was.get('seed')}, which held out other "
                               "pictures (or none), so some of the pictures held out now were trained on: their "
                               "loss reads lower than an unseen picture's would, and over-training shows less")
            # --keep-last counts them; a path the manifest lists that is not this run's save is left alone
            result.saved = [p for p in map(Path, state["saved"])
                            if p.is_file() and (p == files.final or files.is_intermediate(p))]
            final = Path(state["final"]) if state.get("final") else None
            if final is not None and final.is_file() and step >= total_steps:
                events.status(f"this run already finished at step {step} (final file {final}); nothing to do: "
                              "raise max_steps or epochs to continue it")
                result.final, result.steps, result.epochs_done = final, step, batch_no // len(sampler)
                return result
            events.status(f"resumed at step {step}")
            if state.get("rates_were") and dist.main:
                events.warning(f"the learning rate changed: the state was trained at {_rates(state['rates_were'])}, "
                               f"and the run goes on at this run's {_rates(scheduler.base_lrs)} (under its "
                               f"{cfg.lr_scheduler} schedule)")
            changed = S.changed_settings(state.get("config") or {}, cfg.to_dict())
            if changed and dist.main:   # a schedule, optimizer, loss or caption option set anew for the resume
                listed = "; ".join(f"{name} {was!r} → {now!r}" for name, was, now in changed[:8])
                more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
                events.warning(f"this resume changes settings the run was trained with: {listed}{more}. They "
                               f"apply from step {step + 1} on; the {step} steps before were trained under the old "
                               "ones. To train under the new settings from the start, begin a new run from the last "
                               "save instead (start_from; Dreambooth and finetune: that save as the model)")
            planned = (state.get("plan") or {}).get("total_steps") or (step if state.get("final") else None)
            if planned and dist.main:   # a changed total stretches (or squeezes) the rest of the schedule
                note = resumed_schedule_note(cfg.lr_scheduler, scheduler.base_lrs[0], step, planned, total_steps,
                                             cfg.lr_warmup_steps, cfg.lr_cycles, cfg.lr_power,
                                             finished=final is not None and final == files.final)
                if note:
                    events.warning(note)
            if final is not None and final == files.final:   # a finished run, continued to more steps
                # its final file is replaced at the new end: its weights (the state's) are kept first, under the
                # epoch save's name when it ended an epoch, else the step save's, as a save of this run
                result.saved = [p for p in result.saved if p != files.final]
                done_epochs, in_epoch = divmod(batch_no, len(sampler))
                keep = files.step_file(step) if in_epoch else files.epoch_file(done_epochs)
                label = done_epochs + (1 if in_epoch else 0)   # the epoch its saves are labelled with
                if dist.main:
                    events.status(f"continuing the finished run from step {step}: its final file's weights are "
                                  f"kept as {keep.name}, and {files.final.name} is replaced at the new end")
                    save_intermediate(cfg, method, files, result, events, keep, step, label, run_info(
                        cfg, parts, report, plan, step, label, plan_info, optimizer))
                elif dist.sharded:
                    with dist.joining():
                        method.state_dict()
        elif dist.main:
            S.discard_state(files.run_dir)   # an overwritten run's old state must never be resumed into this one
        if dist.main:
            files.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, files.run_dir / "config.toml")
            S.trim_loss_csv(files.run_dir / "loss.csv", step)   # rows after the state are written again
            log = LossLog(files.run_dir, cfg.tensorboard, resume=resuming, purge_step=step + 1 if step else None)
        monitor = LossMonitor()
        for past_step, value in enumerate(result.losses, 1):
            monitor.update(value)
            if dist.main:   # resumed: the Monitor's chart shows the whole run, as the validation history below
                events.loss(past_step, value, ema=monitor.ema)

        # ---- latent cache -------------------------------------------------------------------------------
        use_cache = cfg.cache_latents
        if use_cache:
            events.status("caching latents")
            disk = files.run_dir / "latent_cache" if cfg.cache_latents_to_disk else None
            data.build_cache(lambda px: parts.encode_images(px.to(device), mode="mean"),
                             model_id=f"{parts.info.name}:{parts.family}", disk_dir=disk,
                             progress=lambda n, t: events.progress(n, t, phase="cache"), stop=stop)

        # ---- control pictures before training: the reference for the bleeding signal ------------------
        # under FSDP a picture needs every process (the UNet's weights are gathered per block): not drawn
        controls = ControlPictures(cfg, host, parts, files.run_dir, events, log) if dist.main and not dist.sharded \
            else None
        if dist.sharded and dist.main and (cfg.sample_prompts or cfg.control_prompts):
            events.warning("control pictures are not drawn under distributed = 'fsdp' (each process holds only "
                           "part of the UNet); compare the saved checkpoints instead")
        if controls and controls.enabled and step == 0:
            controls.render(0, 0)
        validation = Validation(cfg, parts, held, template=checked.template, name=checked.template_name) \
            if held else None
        if validation is not None and result.validation:   # resumed: the rise check and the chart see the past
            validation.restore(result.validation)
            if dist.main:
                for past_step, value in result.validation:
                    events.validation(past_step, value)
        if speed.text_cache is not None and fixed_captions(cfg):
            events.status("caching text-encoder outputs")
            sided = [data.caption(i, 1, 0, mirrored=True) for i in range(len(data))] if cfg.flip_swap_sides else []
            speed.precompute_text([data.caption(i, 1, 0) for i in range(len(data))] + sided +
                                  (validation.captions() if validation is not None else []), amp_dtype,
                                  offload=not (controls and controls.enabled))

        # ---- the loop -----------------------------------------------------------------------------------
        batches_per_epoch = len(sampler)
        ac = N.zero_terminal_snr(parts.alphas_cumprod) if cfg.zero_terminal_snr else parts.alphas_cumprod
        encode_text = speed.encode_text if speed is not None else parts.encode_text
        t_start, step_start = time.time(), step
        events.status(f"training {total_steps} steps")
        order_epoch, order = -1, []
        diverged_at = 0   # the step of the first divergence alarm, warned once when the run does not stop on it
        # a stop is agreed between the processes at the top of each step (one small all-reduce), so all of them
        # stop after the same step and join the same saves; a request that arrives later counts at the next check
        while step < total_steps and not dist.agree_stop(stop):
            epoch, in_epoch = divmod(batch_no, batches_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, sampler.batches(epoch)
            used = min(per_step, batches_per_epoch - in_epoch)   # an epoch's last group may be short
            losses = []
            mine = list(range(dist.rank, used, dist.world))   # this process's micro-batches of the step
            divide = dist.loss_scale(used)
            # a process without a micro-batch (short group at an epoch's end) still joins DDP's all-reduce, with a
            # zero-weighted pass over the group's first batch; under FSDP every forward pass gathers weights from
            # all processes, so each runs as many passes as the busiest one (zero-weighted ones to fill up)
            passes = max(1, len(mine), -(-used // dist.world) if dist.sharded else 0)
            for k in range(passes):
                real = k < len(mine)
                micro = mine[k] if real else 0
                with dist.accumulate(last=k == passes - 1):
                    loss_k = train_batch(cfg, parts, method, data, order[in_epoch + micro], epoch + 1, step,
                                         batch_no + micro, ac, amp_dtype, scaler, divide if real else math.inf,
                                         speed=speed, forward=dist.forward)
                if real:
                    losses.append(loss_k)
            batch_no += used
            dist.after_backward(trainable)   # what DDP / FSDP do not average themselves
            scaler.unscale_(optimizer)
            if cfg.max_grad_norm:
                dist.clip_grad_norm(trainable, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]   # the rate this step trained at, for its row (not the next one's)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            method.after_step(step)   # EMA updates: full-model methods, adapter_ema
            loss = dist.mean_loss(losses)
            if step == 2:
                speed.check_memory()   # the measured peak, once the optimizer state exists
            result.losses.append(loss)
            alarm = monitor.update(loss)
            epoch_done = batch_no % batches_per_epoch == 0
            epoch_now = batch_no // batches_per_epoch if epoch_done else epoch + 1
            if dist.main:
                log.write(step, epoch_now, loss, monitor.ema, lr)
                rate = (step - step_start) / max(1e-9, time.time() - t_start)
                events.loss(step, loss, ema=monitor.ema, lr=lr, epoch=epoch_now)
                extra = method.step_figures()   # LoRA's scale_weight_norms: kohya's three figures
                log.scalars(step, {f"method/{k}": v for k, v in extra.items()})
                events.progress(step, total_steps, loss=loss, ema=monitor.ema, lr=lr, epoch=epoch_now,
                                steps_per_s=rate, eta_s=(total_steps - step) / rate if rate else None, **extra)
            if alarm == "diverged" and cfg.stop_on_divergence:
                smoothed = "no finite loss yet" if monitor.ema is None else f"smoothed {monitor.ema:.4g}"
                events.warning(f"loss diverged at step {step} ({loss:.4g}, {smoothed}); stopped, "
                               + last_good(result))
                result.stopped = "diverged"
                break
            if alarm == "diverged" and not diverged_at:   # stop_on_divergence off: trains on, but says so once
                diverged_at = step
                smoothed = "no finite loss yet" if monitor.ema is None else f"smoothed {monitor.ema:.4g}"
                events.warning(f"loss diverged at step {step} ({loss:.4g}, {smoothed}); training goes on "
                               "(stop_on_divergence is off): saves whose weights are not finite are not written")
            if alarm == "overtraining":
                events.warning(f"over-training likely at step {step}: the average loss fell below "
                               f"{monitor.collapse_ratio:g} × its level at step {step // 2} ({monitor.reference:.4g}) "
                               "and keeps falling; compare earlier epochs' saves")
            last = step >= total_steps
            if validation is not None and validation.due(step, epoch_done, last):   # every process: FSDP gathers
                value = validation.measure(ac, encode_text, amp_dtype, step)
                result.validation.append((step, value))
                if dist.main:
                    log.scalars(step, {"loss/validation": value})
                    events.validation(step, value)
                    events.status(f"validation loss {value:.4g} at step {step} (epoch {epoch_now}, {len(validation)} "
                                  "held-out pictures)")
                    rising = validation.rise()
                    if rising:
                        events.warning(rising)
            path = save_path(cfg, files, step, epoch_now, epoch_done, last)
            state_due = cfg.save_state and not last and (
                epoch_done or bool(cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0))
            if path is not None or state_due:   # every process checks, so all stop together
                bad = weights_bad()
                if bad:
                    events.warning(f"the trained weights are not finite (NaN/inf in {bad[0]}) at step {step}: "
                                   f"nothing is saved; " + last_good(result))
                    if cfg.stop_on_divergence:
                        result.stopped = "diverged"
                        break
                    path, state_due = None, False
            if dist.main:
                if path is not None:
                    save_intermediate(cfg, method, files, result, events, path, step, epoch_now, run_info(
                        cfg, parts, report, plan, step, epoch_now, plan_info, optimizer))
                if controls and controls.due(step, epoch_now, epoch_done) and not last:
                    controls.render(step, epoch_now)
                if state_due:
                    save_state()
            elif dist.sharded:   # FSDP: join the gathering of each save rank 0 writes, in the same order
                with dist.joining():
                    if path is not None:
                        method.state_dict()
                    if state_due:
                        save_state(write=False)
        result.steps = step
        result.epochs_done = batch_no // batches_per_epoch
        gather = dist.main or dist.sharded   # under FSDP every process joins each gathering of the weights
        stopping = dist.agree_stop(stop)     # every process gets here after the same step: one verdict for all
        if stopping and not result.stopped:
            result.stopped = "stopped"
            if gather:
                bad = weights_bad()
                if bad and dist.main:
                    events.warning(f"stopped at step {step}; the weights are not finite, so no state is saved; "
                                   + last_good(result))
                elif not bad:
                    with dist.joining():     # FSDP, ranks > 0: gather along, keep nothing
                        save_state(write=dist.main)
                    if dist.main:
                        events.status(f"stopped at step {step}; " + resume_hint(files.run_dir))
        elif not result.stopped and gather and (bad := weights_bad()):
            result.stopped = "diverged"   # also with --no-stop-on-divergence: a NaN file is never written
            if dist.main:
                events.warning(f"the trained weights are not finite (NaN/inf in {bad[0]}) after step {step}: the "
                               "final file is not written; " + last_good(result))
        elif not result.stopped and not dist.main and dist.sharded:   # FSDP: join rank 0's final gatherings
            with dist.joining():
                method.state_dict()
                if cfg.save_state:
                    save_state(final=files.final, write=False)
        elif not result.stopped and dist.main:
            # ss_epoch of the final file is the planned epoch count, ceil(total steps / steps per epoch), as
            # sd-scripts writes it (its last save_model gets num_train_epochs): the epochs the run started, not
            # those it completed. A max_steps run that ends in its first epoch (0.75 epochs) is labelled epoch 1,
            # as are its progress and saved entries ("epoch 1" = in the first epoch); how much of an epoch was
            # trained is in ss_steps and ss_num_batches_per_epoch. A deliberate convention: kohya-reading tools
            # take the file's ss_epoch as that count.
            info = run_info(cfg, parts, report, plan, step, plan_info["epochs"], plan_info, optimizer)
            try:
                method.save(files.final, info)
            except DiskError:    # keep the work: the state goes to the run folder (often another disk)
                if cfg.save_state:
                    save_state()
                raise
            result.final = files.final
            result.saved.append(files.final)
            if cfg.save_state:   # a finished run resumes as finished, or continues to a larger step count
                save_state(final=files.final)
            events.saved(str(files.final), step=step, final=True)
            if controls and controls.enabled:   # labelled with the epoch the final file's ss_epoch says
                controls.render(step, plan_info["epochs"])
            host.refresh(method.output_kind)
        if controls:
            result.bleeding = controls.bleeding
        return result
    except DiskError as e:
        kept = ("the last state is kept; " + resume_hint(files.run_dir) if S.has_state(files.run_dir)
                else "no state had been saved yet")
        raise DiskError(f"{e}; {kept}") from None
    except OSError as e:
        from ..formats.files import disk_error

        friendly = disk_error(e, e.filename or files.run_dir)
        if friendly is None:
            raise
        kept = ("the last state is kept; " + resume_hint(files.run_dir) if S.has_state(files.run_dir)
                else "no state had been saved yet")
        raise DiskError(f"{friendly}; {kept}") from None
    finally:
        if log is not None:
            log.close()
        dist.close()
        if speed is not None:
            speed.restore()
        if cfg.gradient_checkpointing and hasattr(parts, "set_gradient_checkpointing"):
            parts.set_gradient_checkpointing(False)
        for module, mode in modes.items():
            module.training = mode
        method.detach()
        host.release(parts)


def train_batch(cfg: TrainSettings, parts, method, data, indices: list[int], epoch: int, step: int, batch_no: int,
                ac: torch.Tensor, amp_dtype, scaler, divide: float, *, speed=None, forward=None) -> float:
    """Forward and backward for one batch; returns its loss. Randomness comes from (seed, batch_no).

    `speed` (train.speed.Speed) supplies cached text conditioning and the memory layout; `forward(fn)` runs
    the forward pass (through DistributedDataParallel under torchrun)."""
    device = parts.device
    gen = torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + batch_no)
    torch.manual_seed(cfg.seed * 7_919 + batch_no)   # adapter dropout draws from the global generator
    batch = data.batch(indices, epoch, step, use_cache=bool(data.cache))
    with torch.no_grad():
        if "latents" in batch:
            latents = batch["latents"].to(device)
        else:
            latents = parts.encode_images(batch["pixels"].to(device), generator=gen).float()
    noise = N.make_noise(latents, gen, cfg.noise_offset, random_strength=cfg.noise_offset_random_strength,
                         adaptive=cfg.adaptive_noise_scale)
    t = N.sample_timesteps(latents.shape[0], gen, len(ac), cfg.min_timestep, min(cfg.max_timestep, len(ac))).to(device)
    if cfg.multires_noise_iterations:
        noise = N.pyramid_noise(noise, gen, cfg.multires_noise_iterations, cfg.multires_noise_discount)
    if cfg.ip_noise_gamma:
        noisy = N.add_noise(latents, N.perturb(noise, gen, cfg.ip_noise_gamma,
                                               random_strength=cfg.ip_noise_gamma_random_strength), t, ac)
    else:
        noisy = N.add_noise(latents, noise, t, ac)
    if speed is not None:
        noisy = speed.latents(noisy)
    encode = speed.encode_text if speed is not None else parts.encode_text

    def step_forward() -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            with torch.set_grad_enabled(method.trains_text_encoder()):
                cond = encode(batch["captions"])
            return parts.predict(noisy, t, cond, batch["sizes"] if parts.family == "sdxl" else None)

    pred = forward(step_forward) if forward is not None else step_forward()
    target = N.target(latents, noise, t, ac, parts.prediction)
    # masked_loss: the alpha channel or mask file, one weight per latent cell
    masks = N.fit_masks(batch["masks"], pred) if "masks" in batch else None
    per_sample = N.step_elementwise(cfg, pred, target, t, ac, masks).mean(dim=(1, 2, 3))
    if masks is not None and cfg.masked_loss_normalize:   # each picture's loss over its weighted area only
        per_sample = per_sample / masks.mean(dim=(1, 2, 3)).clamp_min(1e-6)
    if cfg.min_snr_gamma:
        per_sample = per_sample * N.min_snr_weights(t, ac, cfg.min_snr_gamma, parts.prediction)
    if cfg.debiased_estimation_loss:
        per_sample = per_sample * N.debiased_weights(t, ac, parts.prediction)
    weights = torch.where(batch["is_reg"].to(device), cfg.prior_loss_weight, 1.0)
    loss = (per_sample * weights).mean()
    scaler.scale(loss / divide).backward()
    return float(loss.detach())


def _rates(rates: list[float]) -> str:
    return ", ".join(dict.fromkeys(f"{r:.2e}" for r in rates))


def last_good(result: TrainResult) -> str:
    return (f"the last good save is kept ({result.saved[-1].name})" if result.saved
            else "no file had been saved yet")


def save_path(cfg: TrainSettings, files: RunFiles, step: int, epoch: int, epoch_done: bool, last: bool
              ) -> Path | None:
    """The intermediate save due after this step, or None: after every N-th epoch (N, 2N, ... as kohya counts,
    the epochs the control pictures of `sample_every_n_epochs` = N fall on) from epoch Y on, and/or every N steps."""
    if last:
        return None  # the final save happens after the loop, under the plain name
    if epoch_done and cfg.save_every_n_epochs and epoch >= cfg.save_from_epoch \
            and epoch % cfg.save_every_n_epochs == 0:
        return files.epoch_file(epoch)
    if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
        return files.step_file(step)
    return None


def save_intermediate(cfg: TrainSettings, method, files: RunFiles, result: TrainResult, events: Events, path: Path,
                      step: int, epoch: int, info: dict[str, str]) -> None:
    """One intermediate save (its weights already checked finite), then keep the last K."""
    if path == files.step_file(step):
        info = {**info, "ss_epoch": str(epoch - 1)}     # kohya's step saves carry the 0-based epoch index
    method.save(path, info)
    if path in result.saved:     # written again after a resume from an earlier state
        result.saved.remove(path)
    result.saved.append(path)
    events.saved(str(path), step=step, epoch=epoch)
    if cfg.keep_last:
        for old in files.prune(result.saved, cfg.keep_last):
            result.saved.remove(old)
        for kept in files.read_only_saves(result.saved):   # said once per file and run
            if kept not in result.read_only_kept:
                result.read_only_kept.append(kept)
                events.status(f"keep_last: {kept.name} is read-only, so it is kept and not counted among the last "
                              f"{cfg.keep_last} saves")


def run_info(cfg: TrainSettings, parts, report, plan, step: int, epoch: int, plan_info: dict,
             optimizer: Any = None) -> dict[str, str]:
    """What the method writes into its file's metadata besides its own keys (kohya `ss_*` names).

    Values are written as sd-scripts' train_network.py writes them for the same setting: `str()` of its argument,
    "None" where the argument is unset (a learning rate that falls back to `learning_rate`, clip skip, the bucket
    limits without buckets), the optimizer's class path. `ss_epoch` is the caller's: kohya writes the 1-based
    epoch for epoch saves, the planned epoch count for the last file and the 0-based epoch for step saves.
    """
    from ..config import config_to_text
    from ..data.captions import tag_frequency
    from ..data.scan import dataset_dirs_info
    from ..formats.kohya import clip_skip_value, kohya_value, model_name_value, optimizer_value

    parts.info.fill_hashes()
    buckets = cfg.enable_buckets
    return {
        "ss_output_name": cfg.name,
        "ss_sd_model_name": model_name_value(parts.info),
        "ss_new_sd_model_hash": parts.info.sha256,
        "ss_sd_model_hash": parts.info.legacy_hash,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_clip_skip": clip_skip_value(getattr(parts, "clip_skip", 1)),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": kohya_value(cfg.unet_lr),
        "ss_text_encoder_lr": kohya_value(cfg.text_encoder_lr),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_optimizer": optimizer_value(optimizer) if optimizer is not None else cfg.optimizer,
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_max_train_steps": str(plan_info["total_steps"]),
        "ss_num_epochs": str(plan_info["epochs"]),
        "ss_total_batch_size": str(plan_info["effective_batch"]),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_cache_latents": str(cfg.cache_latents),
        "ss_flip_aug": str(cfg.flip_aug),
        "ss_masked_loss": str(cfg.masked_loss),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_num_train_images": str(plan_info["samples_per_epoch"]),
        "ss_num_reg_images": str(len(report.regularization)),
        "ss_num_batches_per_epoch": str(plan_info["batches_per_epoch"]),
        "ss_seed": str(cfg.seed),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma or None),
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_c": str(cfg.huber_c),
        "ss_huber_scale": str(cfg.huber_scale),
        "ss_noise_offset": str(cfg.noise_offset or None),
        "ss_noise_offset_random_strength": str(cfg.noise_offset_random_strength),
        "ss_adaptive_noise_scale": str(cfg.adaptive_noise_scale or None),
        "ss_multires_noise_iterations": str(cfg.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(cfg.multires_noise_discount),
        "ss_ip_noise_gamma": str(cfg.ip_noise_gamma or None),
        "ss_ip_noise_gamma_random_strength": str(cfg.ip_noise_gamma_random_strength),
        "ss_debiased_estimation": str(cfg.debiased_estimation_loss),
        "ss_zero_terminal_snr": str(cfg.zero_terminal_snr),
        "ss_validation_split": str(cfg.validation_split),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_shuffle_caption": str(cfg.shuffle_tags),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_caption_dropout_rate": str(cfg.caption_dropout),
        "ss_caption_dropout_every_n_epochs": str(cfg.caption_dropout_every_n_epochs),
        "ss_caption_tag_dropout_rate": str(cfg.tag_dropout),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_enable_bucket": str(cfg.enable_buckets),
        "ss_min_bucket_reso": kohya_value(cfg.min_bucket if buckets else None),
        "ss_max_bucket_reso": kohya_value(cfg.max_bucket if buckets else None),
        "ss_bucket_no_upscale": str(cfg.bucket_no_upscale and buckets),
        "ss_bucket_info": json.dumps(plan.bucket_info() if buckets else None),
        "ss_tag_frequency": json.dumps(tag_frequency(report.instance)),
        "ss_dataset_dirs": json.dumps(dataset_dirs_info(report.records)),
        "ss_v2": str(parts.family == "sd2"),
        "lab.config": json.dumps({"version": cfg.VERSION, **cfg.to_dict()}),
        "lab.config_toml": config_to_text(cfg),
    }


class ControlPictures:
    """Set A (prompts with the concept: should converge) and set B (class prompts: must not move).

    Each round is drawn with a stop token of its own, so a picture the host's own controls cut short is left
    out rather than saved half-drawn: A1111's Skip gives None in that picture's place (the rest of the round is
    drawn), its Interrupt ends the round's list there (the host also requests the run's stop through its job).
    The run's own stop is not passed: a Stop pressed meanwhile ends the run after the round, as it always did.
    Set B's change from the first round (the bleeding figure) is measured over the pictures present in both."""

    def __init__(self, cfg: TrainSettings, host: Host, parts, run_dir: Path, events: Events, log) -> None:
        self.cfg, self.host, self.parts, self.events, self.log = cfg, host, parts, events, log
        self.folder = run_dir / "samples"
        size = cfg.sample_size or cfg.resolution
        self.requests = {
            label: [SampleRequest(p, "", cfg.sample_seed + i, cfg.sample_steps, cfg.sample_cfg, size, size,
                                  cfg.sample_sampler, zero_terminal_snr=cfg.zero_terminal_snr)
                    for i, p in enumerate(prompts)]
            for label, prompts in (("A", cfg.sample_prompts), ("B", cfg.control_prompts)) if prompts}
        self.enabled = bool(self.requests) and bool(cfg.sample_every_n_epochs or cfg.sample_every_n_steps)
        if self.enabled and cfg.zero_terminal_snr and not getattr(host, "draws_zero_terminal_snr", True):
            events.warning("this WebUI has no 'Zero Terminal SNR' noise schedule (A1111 1.8+): the control "
                           "pictures are drawn on the model's stored schedule, not the one this run trains on")
        self.reference: dict[int, Any] | None = None      # set B's first round: request index → pixels
        self.bleeding: list[float] = []

    def due(self, step: int, epoch: int, epoch_done: bool) -> bool:
        if not self.enabled:
            return False
        by_step = self.cfg.sample_every_n_steps and step % self.cfg.sample_every_n_steps == 0
        by_epoch = epoch_done and self.cfg.sample_every_n_epochs and epoch % self.cfg.sample_every_n_epochs == 0
        return bool(by_step or by_epoch)

    @torch.no_grad()
    def render(self, step: int, epoch: int) -> None:
        modules = [self.parts.unet, *self.parts.text_encoders]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        cut = StopToken()         # this round's: ends its lists where the host's Interrupt cut a picture short
        try:
            for label, requests in self.requests.items():
                images = list(self.host.sample(self.parts, requests, stop=cut))
                folder = self.folder / label
                folder.mkdir(parents=True, exist_ok=True)
                for i, img in enumerate(images):
                    if img is None:       # cut short by the host's skip control (A1111's Skip): not saved
                        continue
                    atomic_write(folder / f"step{step:06d}-{i:02d}.png",
                                 lambda tmp, img=img: img.save(tmp, format="PNG"))
                    if self.log is not None:
                        self.log.image(f"samples_{label}/{i}", img, step)
                skipped = [i for i, im in enumerate(images) if im is None]
                if skipped:
                    self.events.warning(f"control pictures, set {label}: {_pictures(skipped)} skipped while drawn "
                                        f"at step {step} (the WebUI's Skip): not saved"
                                        + (", and left out of the bleeding figure" if label == "B" else ""))
                drawn = {i: im for i, im in enumerate(images) if im is not None}
                info: dict[str, Any] = {"set": label, "epoch": epoch, "indices": list(drawn)}
                if label == "B":
                    change = self._change(step, drawn, len(images) == len(requests), len(requests))
                    if change is not None:
                        self.bleeding.append(change)
                        info["change"] = change
                if drawn:
                    self.events.samples(step, list(drawn.values()), label, **info)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    def _change(self, step: int, drawn: dict[int, Any], whole: bool, count: int) -> float | None:
        """Set B's mean pixel change from its first round, over the pictures present in both rounds (a picture
        the host skipped is missing from its round), or None. A round cut short (the host's Interrupt ends the
        list) neither becomes the reference nor gives a figure: the run is stopping."""
        import numpy as np

        if not whole:
            self.events.warning(f"control pictures, set B: {len(drawn)} of {count} drawn at step {step} "
                                "(interrupted?): no bleeding figure this time")
            return None
        pixels = {i: np.asarray(im, dtype=np.float32) / 255.0 for i, im in drawn.items()}
        if self.reference is None:
            self.reference = pixels
        both = [i for i in sorted(pixels) if i in self.reference and pixels[i].shape == self.reference[i].shape]
        if not both:
            self.events.warning(f"control pictures, set B: no picture drawn at step {step} is also in the first "
                                "round (skipped in one of them): no bleeding figure this time")
            return None
        now, first = np.stack([pixels[i] for i in both]), np.stack([self.reference[i] for i in both])
        return float(np.abs(now - first).mean())


def _pictures(indices: list[int]) -> str:
    """The pictures of request indices, numbered from 1 as the prompts are listed: picture 2, pictures 1, 3."""
    numbers = ", ".join(str(i + 1) for i in indices)
    return f"picture {numbers}" if len(indices) == 1 else f"pictures {numbers}"
