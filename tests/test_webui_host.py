"""WebUIHost on the fake A1111 (tests/fake_webui): lend the live model, train, give it back bit-identical.

The fake builds A1111's LDM/SGM module trees (same class names and state-dict keys) from real tiny
checkpoints; its UNet/VAE/text outputs equal the standalone (diffusers) host's on the same file, which the
first tests check, so everything after runs on a faithful model.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_webui  # noqa: E402

from lib_sdtrain.errors import UserError  # noqa: E402
from lib_sdtrain.events import Events, StopToken  # noqa: E402
from lib_sdtrain.hosts import SampleRequest, SizeConditioning  # noqa: E402
from lib_sdtrain.testing.tiny import make_tiny_checkpoint  # noqa: E402
from lib_sdtrain.train.settings import TrainSettings  # noqa: E402
from conftest import fail_on_batch, make_dataset as _make_dataset, press_at_step

sys.path.remove(str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    with fake_webui.installed(root) as dirs:
        for fam in ("sd1", "sd2", "sdxl"):
            make_tiny_checkpoint(dirs["checkpoint"] / f"tiny-{fam}.safetensors", fam)
        from modules import sd_models

        sd_models.list_models()
        networks = fake_webui.load_lora_extension()
        import lib_sdtrain.hosts.webui as webui_mod

        yield {"dirs": dirs, "networks": networks, "mod": webui_mod, "root": root}


@pytest.fixture
def sd1(webui):
    """SD1 loaded and the fake's global state reset around each test."""
    from modules import call_queue, sd_hijack, sd_models, sd_unet, shared

    model = load_family("sd1")
    shared.cmd_opts.lowvram = shared.cmd_opts.medvram = shared.cmd_opts.medvram_sdxl = False
    shared.opts.data["fp8_storage"] = "Disable"
    shared.opts.data["training_xattention_optimizations"] = False
    shared.state.begin("test")
    yield model
    sd_unet.current_unet = None
    assert not call_queue.queue_lock.locked(), "the GPU lock was left taken"
    sd_hijack.model_hijack.apply_optimizations()
    _ = sd_models


def load_family(fam):
    from modules import sd_models, shared

    current = sd_models.model_data.sd_model
    if current is None or not current.sd_model_checkpoint.endswith(f"tiny-{fam}.safetensors"):
        sd_models.load_model(sd_models.checkpoint_aliases[f"tiny-{fam}"])
    return shared.sd_model


def make_dataset(root, n=2, size=64):
    return _make_dataset(root, n, size, repeats=2)


def settings(tmp_path, name="t", **extra):
    lora = {"network_dim": 2, "network_alpha": 2, **extra.pop("lora", {})}
    return TrainSettings.from_dict({
        "data": str(make_dataset(tmp_path / f"data-{name}")), "name": name, "resolution": 64, "min_bucket": 64,
        "max_bucket": 64, "batch_size": 1, "epochs": 1, "max_steps": 3, "learning_rate": 1e-3,
        "save_every_n_epochs": 0, "save_state": False, "tensorboard": False, "sample_every_n_epochs": 0,
        "lora": lora, **extra})


def snapshot(model):
    import ldm.modules.attention

    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "flags": {(n, a): getattr(m, a) for n, m in model.named_modules() for a in ("use_checkpoint", "checkpoint")
                  if isinstance(m.__dict__.get(a), bool)},
        "forwards": sum("forward" in m.__dict__ for m in model.modules()),
        "attention": ldm.modules.attention.CrossAttention.forward,
        "types": {n: type(m) for n, m in model.named_modules()},
    }


def assert_same(before, model):
    after = snapshot(model)
    assert set(after["tensors"]) == set(before["tensors"])
    changed = [k for k in before["tensors"] if not torch.equal(before["tensors"][k], after["tensors"][k])]
    assert not changed, changed[:5]
    assert after["grads"] == before["grads"]
    assert after["modes"] == before["modes"]
    assert after["flags"] == before["flags"]
    assert after["forwards"] == before["forwards"]
    assert after["attention"] is before["attention"]
    assert after["types"] == before["types"]


# ---- the lent model ----------------------------------------------------------------------------------
def test_load_lends_the_live_modules_in_place(webui, sd1):
    host = webui["mod"].WebUIHost()
    parts = host.load()
    try:
        assert parts.unet is sd1.model.diffusion_model and parts.vae is sd1.first_stage_model
        assert parts.text_encoders[0] is sd1.cond_stage_model.wrapped.transformer
        assert parts.module_naming == "ldm" and parts.family == "sd1" and parts.prediction == "eps"
        live = {p.data_ptr() for p in sd1.parameters()}
        assert {p.data_ptr() for p in parts.unet.parameters()} <= live      # no copy: memory not doubled
        assert torch.equal(parts.alphas_cumprod, sd1.alphas_cumprod_original.float())
        assert parts.info.name == "tiny-sd1" and parts.info.path.endswith("tiny-sd1.safetensors")
        assert not any(p.requires_grad for p in sd1.parameters())            # frozen while lent
    finally:
        host.release(parts)
    assert any(p.requires_grad for p in sd1.model.diffusion_model.parameters())   # A1111 leaves the UNet unfrozen


@pytest.mark.parametrize("fam", ["sd1", "sd2", "sdxl"])
def test_outputs_equal_the_standalone_host_on_the_same_file(webui, sd1, fam):
    from lib_sdtrain.hosts.standalone import StandaloneHost

    model = load_family(fam)
    host = webui["mod"].WebUIHost()
    parts = host.load()
    try:
        ref = StandaloneHost(device="cpu", dtype="fp32").load(model.sd_model_checkpoint)
        assert parts.family == fam and parts.prediction == ref.prediction
        torch.manual_seed(0)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 800])
        with torch.no_grad():
            prompts = ["a (red:1.3) square, zwx", "dog <lora:x:1>"]
            cond, cond_ref = parts.encode_text(prompts), ref.encode_text(prompts)
            assert torch.allclose(cond.context, cond_ref.context, atol=1e-5)
            if fam == "sdxl":
                assert torch.allclose(cond.pooled, cond_ref.pooled, atol=1e-5)
            sizes = [SizeConditioning((64, 64), (0, 8)), SizeConditioning((64, 48))] if fam == "sdxl" else None
            out, out_ref = parts.predict(x, t, cond, sizes), ref.predict(x, t, cond_ref, sizes)
            # float32 rounding, amplified by large CLIP activations in attention (1e-6 on random contexts)
            assert torch.allclose(out, out_ref, rtol=1e-3, atol=1e-3), (out - out_ref).abs().max()
            px = torch.rand(1, 3, 64, 64) * 2 - 1
            lat = parts.encode_images(px, mode="mean")
            assert torch.allclose(lat, ref.encode_images(px, mode="mean"), atol=1e-5)
            g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            assert torch.equal(parts.encode_images(px, g1), parts.encode_images(px, g2))
            assert torch.allclose(parts.decode_latents(lat), ref.decode_latents(lat), atol=1e-4)
    finally:
        host.release(parts)
    load_family("sd1")


def test_lora_targets_are_the_kohya_names_a1111_loads(webui, sd1):
    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.methods.lora import LoraMethod, LoraSettings

    host = webui["mod"].WebUIHost()
    parts = host.load()
    try:
        ref = StandaloneHost(device="cpu", dtype="fp32").load(sd1.sd_model_checkpoint)
        for preset in ("attn_mlp", "full"):
            method = LoraMethod(LoraSettings(targets=preset))
            names = [t.name for t in method.plan(parts)]
            # same names (LDM registers attn1, ff, attn2 in that order, so only the order differs)
            assert sorted(names) == sorted(t.name for t in method.plan(ref)) and len(set(names)) == len(names) > 20
    finally:
        host.release(parts)


def test_checkpoint_state_dict_is_the_stock_layout(webui, sd1):
    from safetensors.torch import load_file

    host = webui["mod"].WebUIHost()
    parts = host.load()
    try:
        sd = parts.checkpoint_state_dict()
        assert not any(".wrapped." in k for k in sd)
        assert "cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight" in \
            sd1.state_dict()                   # the hijacked names it undoes
        stock = load_file(sd1.sd_model_checkpoint)
        held = set(stock) - {k for k in stock if k.endswith("position_ids")}   # non-persistent in this transformers
        assert set(sd) == held
        assert all(torch.equal(sd[k], stock[k]) for k in held)
    finally:
        host.release(parts)
    model = load_family("sdxl")
    parts = host.load()
    try:
        sd = parts.checkpoint_state_dict()
        assert not any(k.startswith("cond_stage_model.") for k in sd)   # the hijack's alias is folded back
        stock = load_file(model.sd_model_checkpoint)
        assert set(sd) == set(stock) - {k for k in stock if k.endswith("position_ids")}
    finally:
        host.release(parts)
    load_family("sd1")


# ---- training and giving back ------------------------------------------------------------------------
def test_finished_run_saves_to_models_lora_refreshes_and_restores(webui, sd1, tmp_path):
    from lib_sdtrain.train.loop import train

    host = webui["mod"].WebUIHost()
    before = snapshot(sd1)
    calls = webui["networks"].list_calls
    result = train(settings(tmp_path, "done"), host)
    assert result.stopped == "" and result.steps == 3
    assert result.final == webui["dirs"]["lora"] / "done.safetensors" and result.final.is_file()
    assert result.run_dir == webui["dirs"]["outputs"] / "training-lab" / "runs" / "done"
    assert webui["networks"].list_calls == calls + 1 and "done" in webui["networks"].available_networks
    assert_same(before, sd1)


def test_failed_run_restores_everything_and_frees_the_lock(webui, sd1, tmp_path, monkeypatch):
    import lib_sdtrain.train.loop as loop

    host = webui["mod"].WebUIHost()
    before = snapshot(sd1)
    fail_on_batch(monkeypatch, 2, "simulated failure mid-run")
    with pytest.raises(RuntimeError, match="simulated"):
        loop.train(settings(tmp_path, "fail"), host)
    assert_same(before, sd1)


class FakeJob:
    def __init__(self, job_id="job-x"):
        self.id, self.events, self.stop = job_id, Events(), StopToken()


def test_interrupt_button_stops_the_run_and_progress_reaches_shared_state(webui, sd1, tmp_path):
    from modules import call_queue, progress, shared

    from lib_sdtrain.train.loop import train

    host = webui["mod"].WebUIHost()
    before = snapshot(sd1)
    job = FakeJob("job-int")
    seen = []
    cfg = settings(tmp_path, "intr", max_steps=6)
    with host.job_context(job):
        assert call_queue.queue_lock.locked() and progress.current_task == "task(training-lab-job-int)"

        def watch(event):
            if event.kind == "progress" and event.data.get("phase") != "cache":
                seen.append((shared.state.job, shared.state.job_no, shared.state.job_count, shared.state.textinfo))
                if event.data["step"] == 2:
                    shared.state.interrupt()       # what A1111's Interrupt button does

        job.events.subscribe(watch)
        result = train(cfg, host, job.events, job.stop)
    assert result.stopped == "stopped" and 2 <= result.steps < 6
    assert job.stop.reason == "interrupted in the WebUI"
    assert seen[0][:3] == ("training-lab", 1, 6) and seen[0][3].startswith("Training Lab: step 1/6, loss ")
    assert shared.state.job == "" and not call_queue.queue_lock.locked()
    assert "task(training-lab-job-int)" in progress.finished_tasks and progress.current_task is None
    assert_same(before, sd1)


def test_job_manager_runs_jobs_under_the_gpu_lock(webui, sd1, tmp_path):
    from modules import call_queue, shared

    from lib_sdtrain.jobs import JobManager

    host = webui["mod"].WebUIHost()
    before = snapshot(sd1)
    jobs = JobManager(lambda: host, around_job=host.job_context)
    cfg = settings(tmp_path, "queued")
    job_id = jobs.start(cfg.to_dict())
    assert jobs.wait(job_id, timeout=120) == "finished", jobs.status(job_id)["error"]
    st = jobs.status(job_id)
    assert st["step"] == st["total"] == 3 and st["saved"][0]["path"].endswith("queued.safetensors")
    assert "training-lab" in shared.state.history and not call_queue.queue_lock.locked()
    jobs.shutdown()
    assert_same(before, sd1)


def test_the_job_end_clears_a1111s_total_progress_bar_and_the_progress_it_set(webui, sd1):
    """Pictures drawn during a job (class pictures, control pictures) start A1111's console "Total progress" bar
    with the job's counts; the job's end closes it, so the next generation does not continue "981/1200"."""
    from modules import shared

    host = webui["mod"].WebUIHost()
    for outcome in ("finished", "failed"):
        job = FakeJob(f"job-bar-{outcome}")
        with pytest.raises(RuntimeError) if outcome == "failed" else contextlib.nullcontext():
            with host.job_context(job):
                job.events.progress(3, 60, job="classgen")     # the class-drawing count reaches job_count
                parts = host.load()
                try:
                    host.sample(parts, [SampleRequest("a toy", seed=1, steps=2, width=64, height=64)])
                finally:
                    host.release(parts)
                assert shared.total_tqdm.bar == {"n": 2, "total": 60 * 2}
                if outcome == "failed":
                    raise RuntimeError("simulated failure")
        assert shared.total_tqdm.bar is None, outcome
        assert (shared.state.job_no, shared.state.job_count, shared.state.textinfo) == (0, 0, None)
    had = shared.total_tqdm
    try:
        del shared.total_tqdm                                  # a WebUI without the bar: nothing to clear
        with host.job_context(FakeJob("job-no-bar")):
            pass
    finally:
        shared.total_tqdm = had


def test_resume_refuses_when_another_checkpoint_is_loaded(webui, sd1, tmp_path):
    """model = "" trains the loaded checkpoint: a run started on tiny-sd1 does not go on with tiny-sd2."""
    from modules import call_queue

    from lib_sdtrain.train.loop import train

    host = webui["mod"].WebUIHost()
    stop = StopToken()
    events = Events(lambda e: stop.request() if e.kind == "loss" and e.data["step"] == 2 else None)
    cfg = settings(tmp_path, "base-check", max_steps=4, save_state=True)
    part = train(cfg, host, events, stop)
    assert part.stopped == "stopped" and part.steps == 2
    try:
        before = snapshot(load_family("sd2"))
        with pytest.raises(UserError) as refused:
            train(cfg.replace(resume=str(part.run_dir)), host)
        assert "trained from the base model 'tiny-sd1'" in str(refused.value)
        assert "'tiny-sd2'" in str(refused.value) and "choose it at the top of the page" in str(refused.value)
        assert not call_queue.queue_lock.locked()
        assert_same(before, load_family("sd2"))
    finally:
        load_family("sd1")
    done = train(cfg.replace(resume=str(part.run_dir)), host)
    assert done.stopped == "" and done.steps == 4


def test_generation_waits_for_training(webui, sd1):
    """A generation (any wrap_gradio_gpu_call) started while a model is lent waits for the queue lock."""
    from modules import call_queue

    host = webui["mod"].WebUIHost()
    parts = host.load()
    done = threading.Event()
    t = threading.Thread(target=call_queue.wrap_gradio_gpu_call(lambda *a: done.set()), args=("task(gen)",))
    t.start()
    t.join(0.3)
    assert not done.is_set()
    host.release(parts)
    t.join(5)
    assert done.is_set()


@contextlib.contextmanager
def queue_taken():
    """A1111's queue lock held by another thread (another generation or job runs) until the block ends."""
    from modules import call_queue

    taken, release = threading.Event(), threading.Event()

    def hold():
        with call_queue.queue_lock:
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold, name="other-a1111-job")
    holder.start()
    assert taken.wait(5)
    try:
        yield
    finally:
        release.set()
        holder.join(5)


def wait_for(condition, timeout=10.0):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_job_waiting_for_the_queue_says_so_then_loads_the_model(webui, sd1, tmp_path):
    """Class pictures started while another A1111 job holds the queue lock: until the lock is free the runner's
    status reads "waiting for A1111's queue (another job is running)", not "loading the model", and A1111's
    progress API lists the task as queued; then it loads the model and draws. With the lock free a job goes in
    without a waiting message."""
    from modules import progress

    from lib_sdtrain.ui.dataset_tab import ClassGenRequest, ClassGenRunner

    host = webui["mod"].WebUIHost()
    statuses = []
    job = FakeJob("job-free-queue")
    job.events.subscribe(lambda e: statuses.append(e.data["text"]) if e.kind == "status" else None)
    with host.job_context(job):
        job.events.status("working")
    assert statuses == ["working"]                                   # the lock was free: no waiting

    runner = ClassGenRunner(lambda: host)
    req = ClassGenRequest(str(tmp_path / "class"), "a toy", count=1, width=64, height=64, steps=2)
    try:
        with queue_taken():
            runner.start(req)
            assert wait_for(lambda: "waiting" in runner.state()["status"])
            time.sleep(0.3)                                          # still waiting, not loading
            assert runner.state()["status"] == "waiting for A1111's queue (another job is running)"
            assert runner.state()["running"] and runner.state()["done"] == 0
            assert [t for t in progress.pending_tasks if t.startswith("task(training-lab-classgen-")]
    finally:
        runner.join(60)                                              # the job has the lock once it is free
    st = runner.state()
    assert st["error"] == "" and st["result"]["generated"] == 1 and st["status"].startswith("done: 1 rendered")
    assert not [t for t in progress.pending_tasks if t.startswith("task(training-lab-classgen-")]


def test_a_training_job_waiting_for_the_queue_shows_it_in_its_phase(webui, sd1):
    """A training job (the job manager, around_job = the host's job_context) queued behind another A1111 job:
    its phase reads the waiting text until the lock is free, then the run starts."""
    from lib_sdtrain.jobs import JobManager

    host = webui["mod"].WebUIHost()
    started = threading.Event()

    def train_fn(cfg, host, events, stop):
        events.status("training")
        started.set()

    jobs = JobManager(lambda: host, around_job=host.job_context, train_fn=train_fn)
    try:
        with queue_taken():
            job_id = jobs.start({"data": str(make_dataset(Path(webui["root"]) / "data-queued-job")),
                                 "name": "queued-job", "lora": {"network_dim": 2}})
            assert wait_for(lambda: "waiting" in jobs.status(job_id)["phase"])
            assert jobs.status(job_id)["phase"] == "waiting for A1111's queue (another job is running)"
            assert not started.is_set()
        assert jobs.wait(job_id, timeout=30) == "finished" and started.is_set()
        assert "waiting for A1111's queue (another job is running)" in jobs.status(job_id)["log"][0]
    finally:
        jobs.shutdown()


def test_class_pictures_stopped_while_waiting_for_the_queue_end_without_starting(webui, sd1, tmp_path):
    """The Dataset tab's Stop pressed while its class-picture job waits for A1111's queue lock (another job holds
    it): the job ends at once as stopped with nothing drawn, not when the lock is free. It never began as an A1111
    job (no state.begin / end, no Interrupt set), its task leaves A1111's queue, the other job keeps the lock, and
    the place the job held in the queue is passed on (the lock is free once the other job ends). A1111's
    Interrupt pressed meanwhile is the running job's: it does not end the wait."""
    from modules import call_queue, progress, shared

    from lib_sdtrain.ui.dataset_tab import ClassGenRequest, ClassGenRunner

    host = webui["mod"].WebUIHost()
    runner = ClassGenRunner(lambda: host)
    out = tmp_path / "class-stopped"
    req = ClassGenRequest(str(out), "a toy", count=2, width=64, height=64, steps=2)
    history = list(shared.state.history)
    with queue_taken():
        runner.start(req)
        assert wait_for(lambda: "waiting" in runner.state()["status"])
        shared.state.interrupt()                                     # for the generation that runs
        time.sleep(0.5)
        assert runner.state()["running"] and runner.state()["status"].startswith("waiting for A1111's queue")
        shared.state.interrupted = False                             # that generation ended it
        assert runner.stop() == "stopping: nothing was drawn yet (it was waiting for its turn)"
        runner.join(5)
        st = runner.state()
        assert not st["running"] and st["error"] == "" and st["done"] == 0
        assert st["status"] == "stopped while waiting for A1111's queue: nothing rendered"
        assert st["result"]["stopped"] and st["result"]["generated"] == 0 and not list(out.glob("*.png"))
        assert shared.state.history == history and not shared.state.interrupted
        assert call_queue.queue_lock.locked()                        # still the other job's
        task = [t for t in progress.finished_tasks if t.startswith("task(training-lab-classgen-")][-1]
        assert task not in progress.pending_tasks and progress.current_task != task
    assert wait_for(lambda: not call_queue.queue_lock.locked())      # taken in turn and passed on at once


def test_a_training_job_stopped_while_waiting_for_the_queue_is_stopped_with_nothing_written(webui, sd1):
    """The Monitor's Stop for a training job that waits for A1111's queue lock: the job ends as "stopped" while
    the other job still runs, its training never started and it has no run folder; the lock is passed on."""
    from modules import call_queue, shared

    from lib_sdtrain.jobs import JobManager

    host = webui["mod"].WebUIHost()
    started = threading.Event()

    def train_fn(cfg, host, events, stop):
        started.set()

    jobs = JobManager(lambda: host, around_job=host.job_context, train_fn=train_fn)
    history = list(shared.state.history)
    try:
        with queue_taken():
            job_id = jobs.start({"data": str(make_dataset(Path(webui["root"]) / "data-stopped-waiting")),
                                 "name": "stopped-waiting", "lora": {"network_dim": 2}})
            assert wait_for(lambda: "waiting" in jobs.status(job_id)["phase"])
            jobs.stop(job_id)
            # until the wait notices the stop (up to 0.2 s) the job reads as stopping, with no step to finish
            assert jobs.status(job_id)["phase"] in ("stopping", "stopped by the user")
            assert jobs.wait(job_id, timeout=5) == "stopped"
            st = jobs.status(job_id)
            assert st["error"] == "" and st["run_dir"] == "" and st["phase"] == "stopped by the user"
            assert not started.is_set() and shared.state.history == history
            assert call_queue.queue_lock.locked()
        assert wait_for(lambda: not call_queue.queue_lock.locked())
        assert not (Path(host.output_dir("runs")) / "stopped-waiting").exists()
    finally:
        jobs.shutdown()


def test_sdxl_and_sd2_train_with_gradient_checkpointing(webui, sd1, tmp_path):
    from lib_sdtrain.train.loop import train

    host = webui["mod"].WebUIHost()
    for fam in ("sdxl", "sd2"):
        model = load_family(fam)
        assert any(isinstance(m.__dict__.get("use_checkpoint"), bool) and m.use_checkpoint
                   for m in model.modules())         # SD2/SDXL yamls turn LDM checkpointing on
        before = snapshot(model)
        result = train(settings(tmp_path, f"gc-{fam}", max_steps=2, gradient_checkpointing=True,
                                lora={"train_text_encoder": False}), host)
        assert result.stopped == "" and result.final.is_file() and all(np.isfinite(result.losses))
        assert_same(before, model)
    load_family("sd1")


# ---- A1111 state around a run ------------------------------------------------------------------------
def test_lora_merges_are_removed_and_stay_removed(webui, sd1):
    from modules import processing

    networks = webui["networks"]
    keys = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_up_blocks_3_resnets_0_conv1"]
    fake_webui.write_lora(webui["dirs"]["lora"] / "style.safetensors", sd1, keys)
    layers = [sd1.network_layer_mapping[networks._resolve(k, sd1)] for k in keys]
    base = [m.weight.detach().clone() for m in layers]
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt="<lora:style:1> toy", steps=1, width=64, height=64,
        override_settings={"sd_model_checkpoint": sd1.sd_checkpoint_info.name})
    processing.process_images(p)                     # A1111 merges in place and keeps CPU backups
    assert all(not torch.equal(m.weight, b) for m, b in zip(layers, base)) and networks.loaded_networks
    host = webui["mod"].WebUIHost()
    parts = host.load()
    try:
        assert all(torch.equal(m.weight, b) for m, b in zip(layers, base))
        assert all(m.network_weights_backup is None and m.network_current_names == () for m in layers)
        assert networks.loaded_networks == []
    finally:
        host.release(parts)
    assert all(torch.equal(m.weight, b) for m, b in zip(layers, base))


def test_dora_file_merged_by_a1111_gives_the_trained_deltas(webui, sd1):
    """A DoRA network trained on A1111's own LDM modules (targets = full: attention, ResNet convolutions),
    saved into models/Lora and merged by the Lora extension (its name resolution, A1111's DoRA formula) at
    strength 0.5: every UNet weight changes by half the trained W_new − W."""
    from lib_sdtrain.methods import lora as lora_mod
    from lib_sdtrain.methods.lora import LoraMethod, LoraSettings

    networks = webui["networks"]
    host = webui["mod"].WebUIHost()
    parts = host.load()
    method = LoraMethod(LoraSettings(network_type="dora", network_dim=2, network_alpha=1, targets="full",
                                     train_text_encoder=False, save_dtype="fp32"))
    try:
        method.attach(parts)
        torch.manual_seed(0)
        with torch.no_grad():            # a trained-looking network: non-zero LoRA, magnitudes moved off the norms
            for a in method._layers.values():
                for leaf, param in lora_mod._adapter_params(a.layer):
                    param.mul_(1 + 0.2 * torch.randn_like(param)) if leaf == "dora_scale" else param.normal_(0, 0.1)
        deltas = method.delta_weights()
        method.save(webui["dirs"]["lora"] / "dora-check.safetensors", {})
    finally:
        method.detach()
        host.release(parts)
    assert any("resnets" in n for n in deltas) and any("attn1_to_q" in n for n in deltas)
    networks.list_available_networks()
    networks.load_networks(["dora-check"], [0.5], [0.5])
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                layer = sd1.network_layer_mapping[networks._resolve(name, sd1)]
                base = layer.weight.detach().clone()
                networks.network_apply_weights(layer)
                assert torch.allclose(layer.weight - base, 0.5 * delta, atol=1e-6), name
                networks.loaded_networks.clear()
                networks.network_apply_weights(layer)           # puts the backup back
                networks.network_reset_cached_weight(layer)
                assert torch.equal(layer.weight, base)
                networks.load_networks(["dora-check"], [0.5], [0.5])
    finally:
        networks.load_networks([])


def test_a_dora_run_warns_when_the_webui_would_apply_it_the_old_way(webui, sd1, tmp_path):
    # A1111's Lora "old method" (Settings → Compatibility, lora_functional) adds up·down only and ignores
    # dora_scale (seen in A1111 v1.10.1: a DoRA file then renders as the same file without its magnitudes), so a
    # DoRA trained with it on warns at the preflight; a plain LoRA, or the option off, does not.
    from modules import shared

    from lib_sdtrain.train.preflight import preflight

    host = webui["mod"].WebUIHost()
    dora = settings(tmp_path, "dora-old", lora={"network_type": "dora"})
    plain = settings(tmp_path, "lora-old")
    try:
        shared.opts.data["lora_functional"] = True
        warned = preflight(dora, host).warnings
        assert any("DoRA" in w and "lora_functional" in w for w in warned)
        assert not any("lora_functional" in w for w in preflight(plain, host).warnings)
        shared.opts.data["lora_functional"] = False
        assert not any("lora_functional" in w for w in preflight(dora, host).warnings)
    finally:
        shared.opts.data.pop("lora_functional", None)


def test_attention_optimisation_off_while_training_unless_asked(webui, sd1):
    import ldm.modules.attention
    from modules import sd_hijack, shared

    optimized = ldm.modules.attention.CrossAttention.forward
    assert optimized is sd_hijack.scaled_dot_product_attention_forward
    host = webui["mod"].WebUIHost()
    parts = host.load()
    assert ldm.modules.attention.CrossAttention.forward is sd_hijack.attention_CrossAttention_forward
    host.release(parts)
    assert ldm.modules.attention.CrossAttention.forward is optimized
    shared.opts.data["training_xattention_optimizations"] = True
    parts = host.load()
    assert ldm.modules.attention.CrossAttention.forward is optimized
    host.release(parts)


def test_conditioning_caches_are_cleared(webui, sd1):
    from modules import processing

    processing.StableDiffusionProcessing.cached_c[:] = ["key", "stale cond"]
    processing.StableDiffusionProcessing.cached_uc[:] = ["key", "stale uncond"]
    host = webui["mod"].WebUIHost()
    parts = host.load()
    host.release(parts)
    assert processing.StableDiffusionProcessing.cached_c == [None, None]
    assert processing.StableDiffusionProcessing.cached_uc == [None, None]


def test_sample_uses_a1111_processing_in_eval_mode(webui, sd1, caplog):
    from modules import shared

    host = webui["mod"].WebUIHost()
    parts = host.load()
    try:
        parts.unet.train()
        shared.state.job_no, shared.state.job_count = 7, 10
        with caplog.at_level("WARNING"):
            images = host.sample(parts, [SampleRequest("zwx toy", seed=1, steps=3, width=128, height=64),
                                         SampleRequest("zwx toy", seed=1, steps=3, width=128, height=64)])
        assert not [r for r in caplog.records if "autocorrection" in r.getMessage()]   # scheduler given
        assert [im.size for im in images] == [(128, 64), (128, 64)]
        assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))     # same seed, same picture
        assert parts.unet.training                                               # mode given back
        assert (shared.state.job_no, shared.state.job_count) == (7, 10)          # training's progress kept
    finally:
        host.release(parts)


def test_our_sampler_names_reach_a1111_as_its_own(webui, monkeypatch):
    """Settings store "euler" / "ddim"; A1111 draws them as its "Euler" / "DDIM" (its samplers_map: lower-case
    names and aliases). The display names settings accept are exactly A1111's names of those samplers, and
    A1111's other names (control pictures may use any) go through unchanged."""
    from modules import sd_samplers

    from lib_sdtrain.sample_settings import A1111_NAMES, SAMPLERS

    name = webui["mod"].WebUIHost._sampler_name
    host = webui["mod"].WebUIHost()
    for ours in SAMPLERS:
        assert name(ours) == A1111_NAMES[ours] and A1111_NAMES[ours] in sd_samplers.all_samplers_names
        assert name(A1111_NAMES[ours].upper()) == A1111_NAMES[ours]
        assert host.sampler_label(ours) == A1111_NAMES[ours]          # what the Compare tab shows inside A1111
    assert (name("Euler a"), name("k_euler"), name("dpm++ 2m")) == ("Euler a", "Euler", "DPM++ 2M")
    # the drop-downs of control and class pictures offer every sampler txt2img lists, by A1111's names
    assert host.sampler_names() == sd_samplers.visible_sampler_names() == sd_samplers.all_samplers_names
    monkeypatch.setattr(sd_samplers, "visible_sampler_names", lambda: ["Euler", "LCM"])   # some hidden in settings
    assert host.sampler_names() == ["Euler", "LCM"]
    monkeypatch.delattr(sd_samplers, "visible_sampler_names")   # an older WebUI: the names of its map
    assert set(host.sampler_names()) == set(sd_samplers.all_samplers_names)
    monkeypatch.setattr(sd_samplers, "samplers_map", {})       # a WebUI without the map: ours by our table
    assert (name("euler"), name("DDIM"), name("Euler a")) == ("Euler", "DDIM", "Euler a")
    assert host.sampler_names() == []                          # nothing to list: the drop-downs offer ours


def test_class_picture_progress_reads_as_class_pictures(webui, sd1):
    from modules import shared

    host = webui["mod"].WebUIHost()
    job = FakeJob("job-classgen-text")
    with host.job_context(job):
        job.events.progress(3, 60, job="classgen")
        assert (shared.state.job_no, shared.state.job_count) == (3, 60)
        assert shared.state.textinfo == "Training Lab: class pictures 3/60"
        job.events.progress(2, 12, phase="compare", row="epoch 1")
        assert shared.state.textinfo == "Training Lab: comparing, picture 2/12 (epoch 1)"
    assert (shared.state.job, shared.state.textinfo) == ("", None)


def test_an_interrupt_during_a_picture_leaves_it_out_where_the_caller_can_stop(webui, sd1, monkeypatch):
    """A1111's Interrupt ends the picture being drawn early (its sampler returns a half-drawn picture). Callers
    with a stop token (class pictures, comparisons) get a short list and the stop requested at once; control
    pictures (no token) keep every picture as before."""
    from modules import shared

    host = webui["mod"].WebUIHost()
    parts = host.load()

    # picture 2 of 3 steps each, after its first step
    steps = press_at_step(monkeypatch, 4, "interrupt")
    reqs = [SampleRequest("a toy", seed=s, steps=3, width=64, height=64) for s in (1, 2, 3)]
    try:
        shared.state.begin("test")
        stop = StopToken()
        assert len(host.sample(parts, reqs, stop=stop)) == 1
        assert stop.requested and stop.reason == "interrupted in the WebUI"
        steps.clear()
        shared.state.begin("test")
        assert len(host.sample(parts, reqs[:2])) == 2   # no token: the cut picture is kept, as A1111 shows it
    finally:
        host.release(parts)
        shared.state.begin("test")


def test_a_skip_during_a_picture_leaves_it_out_where_the_caller_can_stop(webui, sd1, monkeypatch):
    """A1111's Skip ends the picture being drawn early and decodes it half-drawn, for that picture only. Callers
    with a stop token get None in its place (not the half-drawn picture), the skip flag cleared and the next
    pictures drawn in full; nothing is stopped. Control pictures (no token) keep the half-drawn picture as
    A1111 shows it, and A1111 itself forgets the skip when the next picture starts."""
    from modules import shared

    host = webui["mod"].WebUIHost()
    parts = host.load()
    reqs = [SampleRequest("a toy", seed=s, steps=3, width=64, height=64) for s in (1, 2, 3)]
    try:
        full = [np.asarray(im) for im in host.sample(parts, reqs)]
        # picture 2 of 3 steps each, after its first step
        steps = press_at_step(monkeypatch, 4, "skip")
        stop = StopToken()
        pictures = host.sample(parts, reqs, stop=stop)
        assert [im is None for im in pictures] == [False, True, False]
        assert np.array_equal(np.asarray(pictures[0]), full[0]) and np.array_equal(np.asarray(pictures[2]), full[2])
        assert not stop.requested and shared.state.skipped is False and len(steps) == 3 + 1 + 3
        steps.clear()
        kept = host.sample(parts, reqs)                   # no token: every picture, the skipped one half-drawn
        assert len(kept) == 3 and not np.array_equal(np.asarray(kept[1]), full[1])
        assert np.array_equal(np.asarray(kept[2]), full[2]) and len(steps) == 3 + 1 + 3
    finally:
        host.release(parts)
        shared.state.begin("test")


def _press_after_the_last_step(monkeypatch, sd1, button: str, when: str) -> list:
    """Press A1111's `button` ("skip" or "interrupt") after picture 2's last sampling step of three: at that
    step's tick (the ticks are returned) or while picture 2 is decoded (an empty list is returned)."""
    from modules import shared

    if when == "at the last step's tick":
        return press_at_step(monkeypatch, 6, button)
    decoded, real_decode = [], sd1.decode_first_stage

    def decode(x):
        decoded.append(1)
        if len(decoded) == 2:
            getattr(shared.state, button)()
        return real_decode(x)

    monkeypatch.setattr(sd1, "decode_first_stage", decode)
    return []


@pytest.mark.parametrize("when", ["at the last step's tick", "during the decode"])
def test_a_skip_after_the_last_sampling_step_keeps_the_finished_picture(webui, sd1, monkeypatch, when):
    """Skip pressed after a picture's last sampling step (at that step's tick, or while the picture is decoded)
    cuts nothing short: A1111's sampler reads the flag only when it calls the model, so the whole picture is
    decoded, and a caller with a stop token gets it (not None). The flag is cleared, nothing is stopped, and
    the next picture is drawn in full."""
    from modules import shared

    host = webui["mod"].WebUIHost()
    parts = host.load()
    reqs = [SampleRequest("a toy", seed=s, steps=3, width=64, height=64) for s in (1, 2, 3)]
    try:
        full = [np.asarray(im) for im in host.sample(parts, reqs)]
        steps = _press_after_the_last_step(monkeypatch, sd1, "skip", when)
        stop, bar_update = StopToken(), vars(shared.total_tqdm).get("update")
        pictures = host.sample(parts, reqs, stop=stop)
        assert [im is None for im in pictures] == [False, False, False]
        assert all(np.array_equal(np.asarray(im), ref) for im, ref in zip(pictures, full))
        assert not stop.requested and shared.state.skipped is False
        assert len(steps) in (0, 9)                            # every step drawn (the tick case counts them)
        assert vars(shared.total_tqdm).get("update") is bar_update   # the console bar as it was
    finally:
        host.release(parts)
        shared.state.begin("test")


@pytest.mark.parametrize("when", ["at the last step's tick", "during the decode"])
def test_an_interrupt_after_the_last_sampling_step_keeps_the_finished_picture(webui, sd1, monkeypatch, when):
    """Interrupt pressed after a picture's last sampling step (at that step's tick, or while it is decoded): A1111
    decodes and returns that picture whole, so a caller with a stop token gets it, as the list's last picture,
    and the stop is requested; nothing after it is drawn."""
    from modules import shared

    host = webui["mod"].WebUIHost()
    parts = host.load()
    reqs = [SampleRequest("a toy", seed=s, steps=3, width=64, height=64) for s in (1, 2, 3)]
    try:
        full = [np.asarray(im) for im in host.sample(parts, reqs)]
        steps = _press_after_the_last_step(monkeypatch, sd1, "interrupt", when)
        stop = StopToken()
        pictures = host.sample(parts, reqs, stop=stop)
        assert len(pictures) == 2 and all(np.array_equal(np.asarray(im), ref) for im, ref in zip(pictures, full))
        assert stop.requested and stop.reason == "interrupted in the WebUI"
        assert len(steps) in (0, 6)                            # picture 3 was not drawn
    finally:
        host.release(parts)
        shared.state.begin("test")


def test_a_skip_during_a_control_picture_does_not_stop_the_run(webui, sd1, tmp_path, monkeypatch):
    """Skip pressed while a training run draws its control pictures: A1111's sampler ends that picture early; the
    half-drawn picture is not saved (a warning says which was skipped), the next pictures are drawn in full and
    the run goes on to its end."""
    from modules import shared

    from lib_sdtrain.train.loop import train

    host = webui["mod"].WebUIHost()
    before = snapshot(sd1)

    # the first control picture (before training), after its first step
    steps = press_at_step(monkeypatch, 2, "skip")
    cfg = settings(tmp_path, "skip", sample_every_n_epochs=1, sample_prompts=["zwx toy", "zwx toy red"],
                   control_prompts=["a toy"], sample_steps=3)
    job = FakeJob("job-skip")
    warnings = []
    job.events.subscribe(lambda e: warnings.append(e.data["text"]) if e.kind == "warning" else None)
    with host.job_context(job):
        result = train(cfg, host, job.events, job.stop)
    assert result.stopped == "" and result.steps == 3 and not job.stop.requested
    pictures_a = sorted(p.name for p in (result.run_dir / "samples" / "A").glob("step*.png"))
    assert pictures_a == ["step000000-01.png", "step000003-00.png", "step000003-01.png"]   # the cut one: not saved
    assert len(sorted((result.run_dir / "samples" / "B").glob("step*.png"))) == 2
    assert [w for w in warnings if "skipped" in w] == \
        ["control pictures, set A: picture 1 skipped while drawn at step 0 (the WebUI's Skip): not saved"]
    assert len(steps) == 2 + 3 * 5 and shared.state.skipped is False   # one picture cut after 2 of 3 steps
    assert_same(before, sd1)


@pytest.mark.parametrize("tick", [7, 16], ids=["in the first round", "in the last round"])
def test_a_skipped_set_b_picture_is_left_out_of_the_bleeding_figure(webui, sd1, tmp_path, monkeypatch, tick):
    """Skip pressed while set B's second picture is drawn, in the first round (the reference) or in the last:
    that picture is not saved, and that round's change figure is measured over the picture drawn in both rounds
    (set B's first), not over a half-drawn one. A warning says it was skipped; the run ends normally."""
    from PIL import Image

    from lib_sdtrain.train.loop import train

    # a round: set A's picture (ticks 1-3), set B's two (4-6, 7-9); the second round's start at tick 10
    steps = press_at_step(monkeypatch, tick, "skip")
    cfg = settings(tmp_path, f"bleed{tick}", sample_every_n_epochs=1, sample_prompts=["zwx toy"],
                   control_prompts=["a toy", "a red toy"], sample_steps=3)
    job = FakeJob(f"job-bleed-{tick}")
    warnings = []
    job.events.subscribe(lambda e: warnings.append(e.data["text"]) if e.kind == "warning" else None)
    host = webui["mod"].WebUIHost()
    with host.job_context(job):
        result = train(cfg, host, job.events, job.stop)
    assert result.stopped == "" and result.steps == 3 and not job.stop.requested and len(steps) == 2 * 9 - 2
    step = 0 if tick < 10 else 3
    folder = result.run_dir / "samples" / "B"
    assert sorted(p.name for p in folder.glob("step*.png")) == sorted(
        {"step000000-00.png", "step000000-01.png", "step000003-00.png", "step000003-01.png"}
        - {f"step{step:06d}-01.png"})

    def pixels(s):
        with Image.open(folder / f"step{s:06d}-00.png") as im:
            return np.asarray(im, dtype=np.float32) / 255.0

    first, last = pixels(0), pixels(3)
    assert result.bleeding == [0.0, pytest.approx(float(np.abs(last - first).mean()), abs=1e-7)]
    assert [w for w in warnings if "skipped" in w] == [(f"control pictures, set B: picture 2 skipped while drawn at "
                                                        f"step {step} (the WebUI's Skip): not saved, and left out "
                                                        "of the bleeding figure")]


def test_an_interrupt_during_the_control_pictures_stops_the_run_cleanly(webui, sd1, tmp_path, monkeypatch):
    """Interrupt pressed while the first control set is drawn: A1111 ends the picture and draws nothing more, so
    set B comes back empty. The run stops as stopped (it used to fail on measuring an empty set B), with a warning
    that set B gave no figure, and the model is given back exactly."""
    from lib_sdtrain.train.loop import train

    host = webui["mod"].WebUIHost()
    before = snapshot(sd1)

    # the first control picture (before training), after its first step
    press_at_step(monkeypatch, 2, "interrupt")
    cfg = settings(tmp_path, "interrupt", sample_every_n_epochs=1, sample_prompts=["zwx toy", "zwx toy red"],
                   control_prompts=["a toy"], sample_steps=3)
    job = FakeJob("job-interrupt")
    warnings = []
    job.events.subscribe(lambda e: warnings.append(e.data["text"]) if e.kind == "warning" else None)
    with host.job_context(job):
        result = train(cfg, host, job.events, job.stop)
    assert result.stopped and job.stop.requested and result.steps < 3
    assert any("set B: 0 of 1 drawn" in w for w in warnings), warnings
    assert result.bleeding == []
    assert_same(before, sd1)


def test_the_jobs_own_stop_ends_a_control_picture_being_drawn(webui, sd1, tmp_path, monkeypatch):
    """The tab's Stop (the job's stop token) pressed while a control picture is drawn ends that picture as A1111's
    Interrupt does, instead of drawing the round's remaining pictures first (real A1111 v1.10.1, session 21: a
    stop during a 512-px control round waited more than 4 minutes on the CPU). The run stops cleanly and the
    model is given back exactly."""
    from lib_sdtrain.train.loop import train

    host = webui["mod"].WebUIHost()
    before = snapshot(sd1)
    job = FakeJob("job-own-stop")
    ticks = []

    def tick():             # each sampling step of the fake takes 20 ms; the stop comes at the third
        ticks.append(1)
        if len(ticks) == 3:
            job.stop.request("stopped by the user")
        time.sleep(0.02)

    from modules import shared

    monkeypatch.setattr(shared.total_tqdm, "update", tick)
    cfg = settings(tmp_path, "ownstop", sample_every_n_epochs=1, sample_prompts=["zwx toy", "zwx toy red"],
                   control_prompts=["a toy"], sample_steps=150)
    warnings = []
    job.events.subscribe(lambda e: warnings.append(e.data["text"]) if e.kind == "warning" else None)
    with host.job_context(job):
        result = train(cfg, host, job.events, job.stop)
    # without the fix the three pictures take all their 450 steps (9 s) before the stop is seen
    assert len(ticks) < 100, len(ticks)
    assert result.stopped and result.steps == 0
    assert any("drawn" in w for w in warnings), warnings
    assert_same(before, sd1)


def test_scheduler_is_passed_only_where_the_webui_has_schedulers(webui):
    host_cls = webui["mod"].WebUIHost

    class Before19:                       # A1111 < 1.9: no scheduler argument
        def __init__(self, prompt="", sampler_name=None, **kwargs):
            pass

    class Since19(Before19):              # 1.9+ (a dataclass there: every field is an __init__ argument)
        def __init__(self, prompt="", sampler_name=None, scheduler=None, **kwargs):
            super().__init__(prompt, sampler_name)

    class Subclass(Since19):
        def __init__(self, enable_hr=False, **kwargs):
            super().__init__(**kwargs)

    assert host_cls._scheduler_arg(Before19) == {}
    assert host_cls._scheduler_arg(Since19) == host_cls._scheduler_arg(Subclass) == {"scheduler": "Automatic"}


def test_refusals_are_clear_and_release_the_lock(webui, sd1):
    from modules import call_queue, sd_models, sd_unet, shared

    host = webui["mod"].WebUIHost()
    shared.cmd_opts.lowvram = True
    with pytest.raises(UserError, match="--lowvram"):
        host.load()
    shared.cmd_opts.lowvram = False
    shared.cmd_opts.medvram = True
    with pytest.raises(UserError, match="--medvram.*restart the WebUI without|Restart the WebUI without --medvram"):
        host.load()
    shared.cmd_opts.medvram = False
    shared.opts.data["fp8_storage"] = "Enable"
    with pytest.raises(UserError, match="FP8"):
        host.load()
    shared.opts.data["fp8_storage"] = "Disable"
    sd_unet.current_unet = object()
    with pytest.raises(UserError, match="replacement UNet"):
        host.load()
    sd_unet.current_unet = None
    with pytest.raises(UserError, match="not in the WebUI's list"):
        host.load("no-such-model")
    saved = sd_models.model_data.sd_model
    sd_models.model_data.sd_model = None
    try:
        with pytest.raises(UserError, match="no model is loaded"):
            host.load()
    finally:
        sd_models.model_data.sd_model = saved
    assert not call_queue.queue_lock.locked()


def test_fp8_weights_are_refused(webui, sd1):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("torch without float8")
    host = webui["mod"].WebUIHost()
    lin = next(m for m in sd1.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear))
    old = lin.weight.data
    lin.weight.data = old.to(torch.float8_e4m3fn)
    try:
        with pytest.raises(UserError, match="FP8"):
            host.load()
    finally:
        lin.weight.data = old


def test_load_named_checkpoint_switches_and_switches_back(webui, sd1):
    from modules import shared

    host = webui["mod"].WebUIHost()
    parts = host.load("tiny-sd2")
    try:
        assert parts.family == "sd2" and shared.sd_model.is_sd2
    finally:
        host.release(parts)
    assert shared.sd_model.is_sd1 and shared.sd_model.sd_model_checkpoint.endswith("tiny-sd1.safetensors")


def test_output_folders_and_refresh(webui, sd1, tmp_path):
    from modules import sd_hijack, sd_models, shared

    host = webui["mod"].WebUIHost()
    assert host.max_grid_megapixels == 200.0           # A1111's default "Maximum image size, in megapixels"
    shared.opts.data["img_max_size_mp"] = 50
    try:
        assert host.max_grid_megapixels == 50.0
    finally:
        shared.opts.data["img_max_size_mp"] = 200
    d = webui["dirs"]
    assert host.output_dir("lora") == d["lora"] and host.output_dir("embedding") == d["embedding"]
    assert host.output_dir("hypernetwork") == d["hypernetwork"] and host.output_dir("checkpoint") == d["checkpoint"]
    assert host.output_dir("runs") == d["outputs"] / "training-lab" / "runs"
    shared.opts.data["training_lab_outputs_dir"] = str(tmp_path / "mine")
    try:
        assert host.output_dir("class") == tmp_path / "mine" / "class_images"
    finally:
        shared.opts.data["training_lab_outputs_dir"] = ""
    with pytest.raises(ValueError):
        host.output_dir("nonsense")
    (d["embedding"] / "newtoken.safetensors").write_bytes(b"x")
    loads = sd_hijack.model_hijack.embedding_db.loads
    host.refresh("embedding")
    assert sd_hijack.model_hijack.embedding_db.loads == loads + 1
    assert "newtoken" in sd_hijack.model_hijack.embedding_db.word_embeddings
    (d["hypernetwork"] / "hn.pt").write_bytes(b"x")
    host.refresh("hypernetwork")
    assert "hn" in shared.hypernetworks
    n = sd_models.list_calls
    host.refresh("checkpoint")
    assert sd_models.list_calls == n + 1


def test_native_size_and_prompt_templates_through_the_host(webui, sd1, tmp_path):
    """Issue 15: the loaded model's native size (and a named checkpoint's, header only), a checkpoint that is
    not in the list refused before any work, and A1111's textual_inversion_templates offered by the Train tab."""
    import types

    from modules import shared

    from lib_sdtrain.ui.train_tab import template_choices

    host = webui["mod"].WebUIHost()
    # the loaded checkpoint's own header decides, as for a named one (session 21: in a real A1111 the toy model,
    # which records 64 px, trained at SD1's 512 when no resolution was given)
    size, source = host.native_resolution()
    assert size == 64 and "loaded sd1" in source and "tiny-sd1.safetensors" in source
    info = shared.sd_model.sd_checkpoint_info
    shared.sd_model.sd_checkpoint_info = types.SimpleNamespace(filename=str(tmp_path / "gone.safetensors"))
    try:    # the file is gone (or says nothing): the family's stock size
        size, source = host.native_resolution()
        assert size == 512 and source == "the loaded sd1 model"
    finally:
        shared.sd_model.sd_checkpoint_info = info
    size, source = host.native_resolution("tiny-sdxl")      # a tiny model: a small UNet, 64 px
    assert size == 64 and "tiny-sdxl" in source
    with pytest.raises(UserError, match="not in the WebUI's list"):
        host.native_resolution("no-such-model")
    folder = tmp_path / "textual_inversion_templates"
    folder.mkdir()
    (folder / "subject.txt").write_text("a picture of [name]\n")
    (folder / "notes.md").write_text("not a template")
    before = getattr(shared.cmd_opts, "textual_inversion_templates_dir", None)
    shared.cmd_opts.textual_inversion_templates_dir = str(folder)
    try:
        assert host.prompt_template_dir() == folder
        choices = template_choices(types.SimpleNamespace(host=lambda: host))
        assert choices[:5] == ["", "subject", "subject_filewords", "style", "style_filewords"]
        assert choices[5:] == [str(folder / "subject.txt")]
    finally:
        shared.cmd_opts.textual_inversion_templates_dir = before


def test_a_zero_terminal_snr_picture_uses_a1111s_noise_schedule_for_that_picture(webui, sd1):
    """A request on the zero-terminal-SNR schedule is drawn with A1111's "Zero Terminal SNR" noise schedule
    (its sd_noise_schedule option, set for that picture and put back after); the user's choice is kept."""
    from modules import processing, shared

    from lib_sdtrain.hosts import SampleRequest

    host = webui["mod"].WebUIHost()
    parts = host.load()
    seen = []
    real = processing.process_images

    def spy(p):   # what the picture asked for, and the schedule's last alpha-bar it was drawn with
        out = real(p)
        seen.append((p.override_settings.get("sd_noise_schedule"), float(shared.sd_model.alphas_cumprod[-1])))
        return out

    processing.process_images = spy
    saved = dict(shared.opts.data)
    # a fresh install: the option was never saved, so it is not in opts.data (A1111 loads config.json into it),
    # and A1111's process_images does not put back an override of such an option (session 21, real A1111)
    shared.opts.data.pop("sd_noise_schedule", None)
    try:
        req = {"prompt": "toy", "seed": 1, "steps": 2, "cfg_scale": 3.0, "width": 64, "height": 64}
        plain = host.sample(parts, [SampleRequest(**req)])[0]
        zero = host.sample(parts, [SampleRequest(**req, zero_terminal_snr=True)])[0]
        after = ("sd_noise_schedule" in shared.opts.data, shared.opts.sd_noise_schedule,
                 float(shared.sd_model.alphas_cumprod[-1]))
        again = host.sample(parts, [SampleRequest(**req)])[0]
    finally:
        processing.process_images = real
        host.release(parts)
        shared.opts.data.clear()
        shared.opts.data.update(saved)
    assert seen[0][0] is None and seen[0][1] > 1e-4                     # the stored schedule
    assert seen[1] == ("Zero Terminal SNR", pytest.approx(4.8973451890853435e-08))
    assert plain.tobytes() != zero.tobytes()
    # put back: the option is unsaved again (its default), the model's schedule is the stored one, and the
    # next picture is drawn as before
    assert after[:2] == (False, "Default") and after[2] == pytest.approx(seen[0][1])
    assert again.tobytes() == plain.tobytes()


def test_a_webui_without_the_zero_terminal_snr_schedule_is_named_when_a_run_needs_it(webui, sd1, tmp_path):
    """A1111 before 1.8 has no sd_noise_schedule option: a zero_terminal_snr run with control pictures warns that
    they are drawn on the stored schedule; with the option (1.8+) nothing is said."""
    from modules import shared

    from lib_sdtrain.events import EventLog, Events
    from lib_sdtrain.train import loop
    from lib_sdtrain.train.settings import TrainSettings

    host = webui["mod"].WebUIHost()
    cfg = TrainSettings.from_dict({"model": "m", "data": "d", "zero_terminal_snr": True,
                                   "sample_prompts": ["toy"], "sample_every_n_steps": 1})
    texts = []
    for present in (True, False):
        label = shared.opts.data_labels.pop("sd_noise_schedule") if not present else None
        try:
            log = EventLog()
            loop.ControlPictures(cfg, host, None, tmp_path / "run", Events(log), None)
            texts.append([e.data["text"] for e in log.since(0)[1] if e.kind == "warning"])
        finally:
            if label is not None:
                shared.opts.data_labels["sd_noise_schedule"] = label
    assert texts[0] == [] and len(texts[1]) == 1 and "no 'Zero Terminal SNR' noise schedule" in texts[1][0]
