"""The Training Lab Blocks built with the standalone host on a tiny model; handlers called directly."""

import re
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from lib_sdtrain.config import load_config  # noqa: E402
from lib_sdtrain.errors import UserError  # noqa: E402
from lib_sdtrain.hosts.standalone import StandaloneHost  # noqa: E402
from lib_sdtrain.jobs import JobManager  # noqa: E402
from lib_sdtrain.testing.tiny import make_tiny_checkpoint  # noqa: E402
from lib_sdtrain.train.settings import TrainSettings  # noqa: E402
from lib_sdtrain.ui import compat, monitor_tab, tabs, widgets  # noqa: E402
from lib_sdtrain.ui.context import UiContext  # noqa: E402
from lib_sdtrain.ui.presets import PRESETS  # noqa: E402
from a1111_ui_config import repeated_keys, ui_config_keys
from conftest import make_dataset


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny.safetensors", "sd1")


@pytest.fixture
def ui(tmp_path, model):
    def host_factory():
        return StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")

    ctx = UiContext(host_factory=host_factory, jobs=JobManager(host_factory), default_model=str(model))
    demo = tabs.build(ctx)
    yield ctx, demo
    ctx.jobs.shutdown()


def values_for(train, data):
    """Widget values for a settings dict (the rest at their defaults)."""
    return widgets.dict_to_values(train.fields, data)


def small(model, data, tmp_path, **extra):
    return {"model": str(model), "data": str(data), "output": str(tmp_path / "lora"), "name": "ui",
            "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 2, "epochs": 2,
            "learning_rate": 1e-3, "tensorboard": False, "lora": {"network_dim": 2, "network_alpha": 2.0}, **extra}


def test_blocks_hold_every_setting_and_every_section(ui, model):
    ctx, demo = ui
    assert isinstance(demo, gr.Blocks)
    train = ctx.components["train.tab"]
    keys = {f.key for f in train.fields}
    assert {s.name for s in TrainSettings.settings()} <= keys
    for name, cls in TrainSettings.sections().items():   # sections added by any method show up on their own
        assert {f"{name}.{s.name}" for s in cls.settings()} <= keys
    # element ids are unique and stable (A1111 stores widget values under them in ui-config.json)
    ids = [f.component.elem_id for f in train.fields]
    assert len(ids) == len(set(ids)) and "training_lab_train_lora_network_dim" in ids
    # untouched widgets give exactly the default settings (plus the model the context names)
    cfg = train.settings([f.component.value for f in train.fields])
    assert cfg.to_dict() == TrainSettings(model=str(model)).to_dict()
    # polling is set up the way this gradio version supports
    if compat.HAS_TIMER:
        assert any(isinstance(b, gr.Timer) for b in demo.blocks.values())


def test_class_pictures_default_to_the_models_size(ui):
    """The Dataset tab's class pictures start at 0 = the model's native size when drawn (session 21, real A1111
    with the 64-px toy model: a fixed 512 x 512; a size taken when the tab is built would stay in A1111's
    ui-config.json for every later model)."""
    ctx, _ = ui
    assert ctx.components["dataset.class_width"].value == ctx.components["dataset.class_height"].value == 0


def test_bucket_fields_default_to_the_models_size_when_clicked(ui):
    """The Buckets sub-tab keeps its resolution and bounds empty and fills them when a report is made, from
    the model then loaded: A1111 stores a widget's first value in ui-config.json, so a size taken when the tab
    was built (the first start's model) stayed for every later model (session 21, real A1111: 512 and
    256-1024 for the 64-px toy model)."""
    from lib_sdtrain.ui.dataset_tab import bucket_settings

    ctx, _ = ui
    assert ctx.components["dataset.bucket_resolution"].value == ""
    assert ctx.components["dataset.bucket_min"].value == ctx.components["dataset.bucket_max"].value == 0
    assert bucket_settings("", 0, 0, 64) == ("64", 64, 128)
    assert bucket_settings(None, None, None, 1024) == ("1024", 512, 2048)
    assert bucket_settings("768x512", 0, 1024, 64) == ("768x512", 256, 1024)
    assert bucket_settings("512", 320, 0, 64) == ("512", 320, 1024)


def test_widget_kinds_follow_the_declarations():
    infos = {s.name: s for s in TrainSettings.settings()}
    assert widgets.widget_kind(infos["optimizer"]) == "dropdown"
    assert widgets.widget_kind(infos["overwrite"]) == "checkbox"
    assert widgets.widget_kind(infos["resolution"]) == "slider"        # 64..4096 step 64
    assert widgets.widget_kind(infos["batch_size"]) == "number"        # 1..1024: too many steps for a slider
    assert widgets.widget_kind(infos["unet_lr"]) == "text"             # optional: empty = learning_rate
    assert widgets.widget_kind(infos["sample_prompts"]) == "lines"
    assert widgets.from_widget_value(infos["unet_lr"], " ") is None
    assert widgets.from_widget_value(infos["batch_size"], 3.0) == 3
    assert widgets.label_for(infos["unet_lr"]) == "Unet LR"


def test_widget_values_round_trip_and_errors_name_the_widget(ui, tmp_path, model):
    ctx, _ = ui
    train = ctx.components["train.tab"]
    data = {"batch_size": 4, "unet_lr": 5e-5, "sample_prompts": ["zwx toy, red square", "zwx toy on grass"],
            "lora": {"network_dim": 8, "targets": "attn"}}
    cfg = train.settings(values_for(train, data))
    assert cfg.batch_size == 4 and cfg.unet_lr == 5e-5 and cfg.text_encoder_lr is None
    assert cfg.sample_prompts == ["zwx toy, red square", "zwx toy on grass"]   # commas inside prompts survive
    assert cfg.lora.network_dim == 8 and cfg.lora.targets == "attn"
    bad = values_for(train, {"lora": {"network_dim": 0}})
    with pytest.raises(UserError, match=r"Network dim \(lora.network_dim\): 0 is below the minimum 1"):
        train.settings(bad)
    assert "Settings problem" in train.plan_text(bad)
    bad = values_for(train, {"min_bucket": 1024, "max_bucket": 256})
    with pytest.raises(UserError, match="min_bucket cannot be larger"):
        train.settings(bad)


def test_method_sections_show_only_for_their_method(ui):
    ctx, _ = ui
    train = ctx.components["train.tab"]
    names = list(TrainSettings.sections())
    methods = [s.choices for s in TrainSettings.settings() if s.name == "method"][0]
    for method in methods:
        shown = [n for n, v in zip(names, train.section_visibility(method)) if v]
        assert method in shown and not (set(shown) & set(methods)) - {method}


def test_live_arithmetic_follows_data_batch_accumulation_and_epochs(ui, tmp_path, model):
    ctx, _ = ui
    train = ctx.components["train.tab"]
    data = make_dataset(tmp_path / "data")
    text = train.plan_text(values_for(train, small(model, data, tmp_path)))
    # 4 pictures × 3 repeats = 12 samples per epoch; batch 2 → 6 steps; 2 epochs → 12 steps
    assert "**12 steps** · 6 per epoch" in text and "12 samples per epoch" in text and "64×64 (12)" in text
    text = train.plan_text(values_for(train, small(model, data, tmp_path, batch_size=4, grad_accum=3, epochs=5)))
    assert "**5 steps** · 1 per epoch" in text and "effective batch 12" in text
    text = train.plan_text(values_for(train, small(model, data, tmp_path, batch_size=5)))
    assert "not a multiple of the effective batch 5" in text
    # a validation split: 1 of the 4 pictures held out, 3 × 3 = 9 samples → 5 steps an epoch at batch 2
    text = train.plan_text(values_for(train, small(model, data, tmp_path, validation_split=0.25)))
    assert "**10 steps** · 5 per epoch" in text and "1 instance pictures are held out" in text
    assert "not found" in train.plan_text(values_for(train, small(model, tmp_path / "nope", tmp_path)))
    # a new picture in the folder is seen (the scan cache is keyed by the folders' modification times)
    time.sleep(0.01)
    Image.new("RGB", (64, 64)).save(data / "3_zwx toy" / "extra.png")
    assert "15 samples per epoch" in train.plan_text(values_for(train, small(model, data, tmp_path)))
    # a picture that cannot be used, with two errors (empty, and a caption that is not text): one picture of six
    # skipped, where the count was of problems ("2 pictures will be skipped")
    time.sleep(0.01)
    (data / "3_zwx toy" / "broken.png").write_bytes(b"")
    (data / "3_zwx toy" / "broken.txt").write_bytes(b"\xff\xfe\x00\xd8")
    assert "\n1 of 6 pictures will be skipped" in train.plan_text(values_for(train, small(model, data, tmp_path)))
    est = train.estimate_text(values_for(train, small(model, data, tmp_path)))
    assert "GPU memory" in est and "sd1" in est and "guessed" not in est   # family read from the model file


def test_memory_estimate_of_a_distilled_sdxl_file_is_its_own(ui, tmp_path):
    # was: any SDXL file got stock SDXL's figure (2.6 B UNet, its activations), a distilled one's too
    from safetensors.torch import save_file

    from lib_sdtrain.models import checkpoint as ckpt
    from lib_sdtrain.testing.tiny import build_tiny
    from lib_sdtrain.train.estimate import estimate_vram, model_sizes

    ctx, _ = ui
    train = ctx.components["train.tab"]
    tiny = build_tiny("sdxl", layout="distilled")
    path = tmp_path / "distilled.safetensors"
    sd = ckpt.ldm_state_dict(tiny.arch, tiny.unet, tiny.vae, tiny.text_encoders)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    values = values_for(train, {"model": str(path), "resolution": 1024})
    text = train.estimate_text(values)
    cfg = train.settings(values)
    own = estimate_vram(cfg, "sdxl", sizes=model_sizes(path)).text.splitlines()[0]
    assert own in text and estimate_vram(cfg, "sdxl").text.splitlines()[0] not in text
    assert "sizes read from the model file" in text and "small model file" not in text
    # resolution 0: the model's native size, as the run fills it in (64 px for this small UNet), not SDXL's 1024
    assert estimate_vram(cfg.replace(resolution=64), "sdxl", sizes=model_sizes(path)).text.splitlines()[0] in \
        train.estimate_text(values_for(train, {"model": str(path), "resolution": 0}))


def test_presets_apply_and_validate(ui, tmp_path, model):
    ctx, _ = ui
    train = ctx.components["train.tab"]
    mine = values_for(train, {"data": "/my/data", "name": "mine"})
    for name, preset in PRESETS.items():
        cfg = train.settings(train.preset_values(name, mine))
        assert cfg.data == "/my/data" and cfg.name == "mine"          # the user's own entries stay
        assert cfg.resolution == preset["resolution"] and cfg.lora.network_dim == preset["lora"]["network_dim"]
    with pytest.raises(UserError):
        train.preset_values("no such preset", mine)


def test_config_files_save_and_load(ui, tmp_path, model):
    ctx, _ = ui
    train = ctx.components["train.tab"]
    values = values_for(train, {"name": "saved", "epochs": 7, "lora": {"network_dim": 12}})
    path = tmp_path / "run.toml"
    assert "Saved" in train.save_config_file(str(path), False, values)
    assert load_config(TrainSettings, path).lora.network_dim == 12
    with pytest.raises(UserError, match="exists"):
        train.save_config_file(str(path), False, values)
    loaded, message = train.load_config_values(str(path), values_for(train, {}))
    cfg = train.settings(loaded)
    assert cfg.name == "saved" and cfg.epochs == 7 and cfg.lora.network_dim == 12 and "Loaded" in message
    assert 'name = "saved"' in train.toml_text(values)
    with pytest.raises(UserError, match="not found"):
        train.load_config_values(str(tmp_path / "missing.toml"), values)


def test_start_then_monitor_shows_losses_pictures_and_files(ui, tmp_path, model):
    ctx, _ = ui
    train, monitor = ctx.components["train.tab"], ctx.components["monitor.tab"]
    data = make_dataset(tmp_path / "data")
    values = values_for(train, small(model, data, tmp_path, sample_prompts=["zwx toy"],
                                     control_prompts=["toy"], sample_steps=2, sample_size=64))
    empty = monitor.snapshot(None)
    assert empty["job"] == "" and "No training job" in empty["progress"]
    message, job_id = train.start(values)
    assert job_id and job_id in message
    assert ctx.jobs.wait(job_id, timeout=120) == "finished", ctx.jobs.status(job_id)["error"]
    snap = monitor.snapshot(job_id)
    assert snap["state"] == "finished" and snap["losses"] == 12
    assert snap["chart"].startswith("<svg") and snap["chart"].count("<polyline") == 2
    assert "ui.safetensors` (final)" in snap["saved"] and "ui-000001.safetensors" in snap["saved"]
    assert snap["rounds"] == ["latest", "step 12", "step 6", "step 0"]
    assert len(snap["gallery_a"]) == 1 and len(snap["gallery_b"]) == 1
    assert snap["gallery_a"][0][1] == "step 12: zwx toy" and Path(snap["gallery_a"][0][0]).is_file()
    assert monitor.snapshot(job_id, "step 0")["gallery_b"][0][0].endswith("step000000-00.png")
    assert "Set B mean pixel change" in snap["bleeding"]
    assert Path(snap["run_dir"]).is_dir() and "12/12" in snap["progress"]
    # polling: the first poll sends everything, the next one only what changed (nothing)
    first = monitor.poll(job_id, "latest", {})
    assert first[2] == snap["chart"] and first[4] == snap["gallery_a"]
    again = monitor.poll(job_id, "latest", first[-1])
    unchanged = compat.update()
    assert again[2] == unchanged and again[4] == unchanged and again[5] == unchanged
    # a poll that read the dropdown before a new job was selected must not write the old job back
    assert again[0] == unchanged
    listed = monitor.poll(job_id, "latest", {**first[-1], "choices": []})[0]
    assert listed != unchanged and "value" not in listed and job_id in listed["choices"]
    assert monitor.poll(None, "latest", {})[0]["value"] == job_id   # nothing chosen: the latest job is shown
    # the same output name again: refused before anything is queued, with the reason (the preflight checks the
    # output files), and no job is added
    jobs_before = monitor.job_choices()
    message, second = train.start(values)
    assert second == "" and "Not started" in message and "taken" in message
    assert monitor.job_choices() == jobs_before


def test_stop_from_the_tabs(ui, tmp_path, model):
    ctx, _ = ui
    train, monitor = ctx.components["train.tab"], ctx.components["monitor.tab"]
    data = make_dataset(tmp_path / "data")
    _, job_id = train.start(values_for(train, small(model, data, tmp_path, epochs=500, name="long")))
    deadline = time.time() + 60
    while ctx.jobs.status(job_id)["step"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert train.stop(job_id) == f"Job {job_id}: stopping after the current step; a resumable state is kept"
    assert ctx.jobs.wait(job_id, timeout=60) == "stopped"
    assert "stopped" in monitor.snapshot(job_id)["progress"]
    assert train.stop("") == "No job is running."


def test_the_monitors_stop_says_the_job_is_stopping(ui, tmp_path, model):
    """The Monitor's Stop answered "job-...: running" (the job's state at the click), which read as if the stop had
    been ignored (session 21, real A1111); it says what the Train tab's Stop says."""
    ctx, _ = ui
    monitor = ctx.components["monitor.tab"]
    data = make_dataset(tmp_path / "data")
    job_id = ctx.jobs.start(small(model, data, tmp_path, epochs=500, name="long"))
    deadline = time.time() + 60
    while ctx.jobs.status(job_id)["step"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert monitor.stop(job_id) == f"Job {job_id}: stopping after the current step; a resumable state is kept"
    assert ctx.jobs.wait(job_id, timeout=60) == "stopped"
    assert monitor.stop(job_id) == f"Job {job_id}: stopped"


def test_resume_with_only_the_run_folder_uses_the_runs_settings(ui, tmp_path, model):
    """The stop message says to resume with "the resume setting in the Train tab"; a fresh tab has no dataset and
    the default name, so the run started and failed at once with "no dataset folder given (data)" (session 21,
    real A1111). With the dataset empty, the tab resumes with the run's own settings, as the API does."""
    ctx, _ = ui
    train = ctx.components["train.tab"]
    data = make_dataset(tmp_path / "data")
    _, job_id = train.start(values_for(train, small(model, data, tmp_path, epochs=500, name="long")))
    deadline = time.time() + 60
    while ctx.jobs.status(job_id)["step"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    train.stop(job_id)
    assert ctx.jobs.wait(job_id, timeout=60) == "stopped"
    stopped_at, run_dir = ctx.jobs.status(job_id)["step"], ctx.jobs.status(job_id)["run_dir"]
    message, again = train.start(values_for(train, {"resume": run_dir}))
    assert again and "settings it was trained with" in message, message
    deadline = time.time() + 60
    while ctx.jobs.status(again)["step"] <= stopped_at and ctx.jobs.status(again)["state"] in ("queued", "running") \
            and time.time() < deadline:
        time.sleep(0.05)
    status = ctx.jobs.status(again)
    assert status["state"] in ("queued", "running"), status["error"]
    assert status["name"] == "long" and status["run_dir"] == run_dir and status["step"] > stopped_at
    train.stop(again)
    assert ctx.jobs.wait(again, timeout=60) == "stopped"
    # the Monitor's chart of the resumed job shows the whole run, not only the steps after the resume (the
    # validation history was carried over; the loss was not: a resumed chart began at the stop's step + 1)
    losses = ctx.jobs.status(again)["losses"]
    assert [row[0] for row in losses[:stopped_at + 1]] == list(range(1, stopped_at + 2))
    assert [row[1] for row in losses[:stopped_at]] == [row[1] for row in ctx.jobs.status(job_id)["losses"]]


def test_stop_before_the_first_step_says_so(tmp_path):
    """A job stopped while it has taken no step yet (loading, caching, waiting for the host's queue) has no step
    to finish and no state to resume from: the Train tab and the job's phase say "stopping", not "after the
    current step"."""
    begun, release = threading.Event(), threading.Event()

    def train_fn(cfg, host, events, stop):
        begun.set()
        release.wait(10)

    def host_factory():
        return StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")

    ctx = UiContext(host_factory=host_factory, jobs=JobManager(host_factory, train_fn=train_fn))
    try:
        tabs.build(ctx)
        job = ctx.jobs.start({"name": "early", "data": "x"})
        assert begun.wait(10)
        assert ctx.components["train.tab"].stop(job) == f"Job {job}: stopping before its first step"
        assert ctx.jobs.status(job)["phase"] == "stopping"
        release.set()
        assert ctx.jobs.wait(job, timeout=10) == "stopped"
    finally:
        release.set()
        ctx.jobs.shutdown()


def test_compare_button_hands_the_run_folder_over(tmp_path, model):
    def host_factory():
        return StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")

    # 1. a plain hook (e.g. the A1111 script's) with no Compare outputs registered
    seen = []
    ctx = UiContext(host_factory=host_factory, jobs=JobManager(host_factory, train_fn=lambda *a: None))
    monkey_tabs = [t for t in tabs.TABS if t[0] != "compare"]
    original = tabs.TABS
    tabs.TABS = monkey_tabs
    try:
        tabs.build(ctx)
    finally:
        tabs.TABS = original
    ctx.open_compare = seen.append
    monitor = ctx.components["monitor.tab"]
    assert "start a training job" in monitor.compare(None)[0]
    job = ctx.jobs.start({"name": "cmp", "data": "x"})
    ctx.jobs.wait(job, timeout=10)
    run = str(tmp_path / "outputs" / "runs" / "cmp")
    assert run in monitor.compare(job)[0] and seen == [run]
    ctx.jobs.shutdown()

    # 2. the Compare tab's protocol: open_compare returns updates for ctx.components["compare.open_outputs"]
    if tabs.load_tab("compare_tab") is None:
        return
    ctx = UiContext(host_factory=host_factory, jobs=JobManager(host_factory, train_fn=lambda *a: None))
    tabs.build(ctx)
    outputs = ctx.components["compare.open_outputs"]
    job = ctx.jobs.start({"name": "cmp2", "data": "x"})
    ctx.jobs.wait(job, timeout=10)
    result = ctx.components["monitor.tab"].compare(job)
    assert len(result) == 1 + len(outputs) and "cmp2" in result[0]
    assert result[1] == compat.update(selected="compare")      # switches to the Compare tab
    ctx.jobs.shutdown()


def test_the_compare_tab_has_a_status_line_its_buttons_write(ui):
    """The Compare tab's status line is an output of its Compare button (streamed while the comparison runs:
    waiting, picture k/n, done / stopped) and of its Stop button."""
    ctx, demo = ui
    if tabs.load_tab("compare_tab") is None:
        pytest.skip("no Compare tab")
    status = ctx.components["compare.status"]
    writers = [d for d in demo.config["dependencies"] if status._id in d["outputs"]]
    assert len(writers) == 2


def test_saving_a_caption_updates_the_tag_table_and_a_bulk_write_the_caption_box(ui, tmp_path):
    """Save caption wrote the file but left the Tags table at the scan's captions; a bulk Write left the Caption box
    at the old text, which a later Save wrote back over the bulk edit (session 21, real A1111)."""
    ctx, demo = ui
    C = ctx.components
    deps = demo.config["dependencies"]

    def by(button):
        return [d for d in deps if any((t[0] if isinstance(t, (list, tuple)) else t) == button._id
                                       for t in d["targets"])]

    assert any(C["dataset.tags"]._id in d["outputs"] for d in by(C["dataset.save_caption"]))
    writes = by(C["dataset.bulk_write"])
    chained = [d for d in deps if d.get("trigger_after") in [deps.index(w) for w in writes]] or \
        [d for d in deps if any(w.get("id") is not None and d.get("trigger_after") == w.get("id") for w in writes)]
    assert any(C["dataset.caption"]._id in d["outputs"] for d in writes + chained)


def test_missing_tab_module_shows_a_note(monkeypatch, tmp_path):
    monkeypatch.setattr(tabs, "TABS", [("later", "Later", "not_written_yet_tab")])
    ctx = UiContext(host_factory=lambda: None, jobs=JobManager(lambda: None))
    demo = tabs.build(ctx)
    notes = [b for b in demo.blocks.values() if isinstance(b, gr.Markdown) and "not installed" in str(b.value)]
    assert len(notes) == 1
    assert tabs.load_tab("not_written_yet_tab") is None
    # an import error inside an existing tab module is a bug and is not hidden
    def broken(name):
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")

    monkeypatch.setattr(tabs.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="torchvision"):
        tabs.load_tab("monitor_tab")


def test_chart_and_progress_rendering():
    svg = monitor_tab.loss_chart_svg([[1, 0.5, 0.5], [2, 0.3, 0.48], [3, float("nan"), None], [4, 0.2, 0.4]],
                                     saved_steps=[2], sample_steps=[0, 4])
    assert svg.count("<polyline") == 2 and "saved at step 2" in svg and svg.count('class="tl-sample"') == 1
    assert monitor_tab.loss_chart_svg([]) == ""
    with_held = monitor_tab.loss_chart_svg([[1, 0.5, 0.5], [4, 0.2, 0.4]], validation=[[2, 0.9], [4, 0.7]])
    assert with_held.count('class="tl-validation-point"') == 2 and "validation loss 0.9 at step 2" in with_held
    # the y axis of losses near zero starts at 0, not at a padded negative value ("-0.00682")
    near_zero = monitor_tab.loss_chart_svg([[1, 0.004, 0.004], [2, 0.2, 0.1], [3, 0.03, 0.05]])
    labels = [float(t) for t in re.findall(r'text-anchor="end" font-size="11" fill="currentColor">([^<]+)<',
                                           near_zero)]
    assert len(labels) == 3 and min(labels) == 0.0 and max(labels) > 0.2
    assert "validation 0.7" in with_held                               # the last one in the chart's legend line
    html = monitor_tab.progress_html({"state": "running", "fraction": 0.25, "progress_text": "a <b>"})
    assert 'width:25.0%' in html and "a &lt;b&gt;" in html


def test_standalone_app_builds(tmp_path, model):
    import argparse

    from lib_sdtrain.commands import app

    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    args = parser.parse_args(["--model", str(model), "--output-root", str(tmp_path / "o"), "--device", "cpu"])
    demo, ctx, launch = app.make_app(args)
    try:
        assert isinstance(demo, gr.Blocks) and ctx.default_model == str(model)
        assert ctx.components["train.tab"].settings(
            [f.component.value for f in ctx.components["train.fields"]]).model == str(model)
        css = launch["css"] if compat.VERSION >= (6,) else demo.css
        assert "training-lab-progress" in css
        # the page asks no font server on the internet for its fonts: gradio's default theme names a Google
        # font, which every page load fetched from fonts.googleapis.com
        from gradio.themes.utils.fonts import GoogleFont

        theme = launch["theme"] if compat.VERSION >= (6,) else demo.theme
        fonts = list(theme._font) + list(theme._font_mono)
        assert fonts and not [f for f in fonts if isinstance(f, GoogleFont)]
        assert "googleapis" not in theme._get_theme_css()
    finally:
        ctx.jobs.shutdown()


def dropdowns(tmp_path, host_cls, builders):
    """{elem_id: (choices, value)} of every drop-down the tab builders make for a context on a `host_cls` host."""
    def factory():
        return host_cls(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")

    ctx = UiContext(host_factory=factory, jobs=JobManager(factory))
    with gr.Blocks() as demo:
        for build in builders:
            build(ctx)
    ctx.jobs.shutdown()
    return {b.elem_id: ([c[0] if isinstance(c, (tuple, list)) else c for c in b.choices], b.value)
            for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and getattr(b, "elem_id", None)}


def test_the_compare_tab_shows_the_hosts_names_of_our_samplers(tmp_path):
    """Inside A1111 the tab offered "euler" / "ddim" where A1111's own lists say "Euler" / "DDIM". A host that
    names our samplers (`sampler_label`, as WebUIHost does) now gets its names shown; standalone keeps ours.
    Either name is taken by the sampler setting and stored as ours."""
    from lib_sdtrain.ui import compare_tab

    class NamingHost(StandaloneHost):
        def sampler_label(self, name):
            return {"euler": "Euler", "ddim": "DDIM"}[name]

    def shown(host_cls):
        return dropdowns(tmp_path, host_cls, [compare_tab.build])["training_lab_compare_sampler"]

    assert shown(NamingHost) == (["Euler", "DDIM"], "Euler")
    assert shown(StandaloneHost) == (["euler", "ddim"], "euler")
    form = ("a red circle", "", "", "1", "1", "", 20, 7.0)
    assert compare_tab.settings_from_form(*form, "DDIM", 64, True, "none").sampler == "ddim"
    assert compare_tab.settings_from_form(*form, "euler", 64, True, "none").sampler == "euler"


def test_the_monitor_moves_to_a_job_started_after_the_shown_one_ended(ui, tmp_path, model):
    """Session 22, real A1111: once the Monitor's drop-down named a job, a job started later from the API (or a
    tab the Monitor did not hear from) was never shown. A poll now moves to it when the shown job has ended, and
    leaves a job the user picks alone."""
    ctx, _ = ui
    train, monitor = ctx.components["train.tab"], ctx.components["monitor.tab"]
    data = make_dataset(tmp_path / "data")
    _, done = train.start(values_for(train, small(model, data, tmp_path, name="first")))
    assert ctx.jobs.wait(done, timeout=120) == "finished"
    sig = monitor.poll(done, "latest", {})[-1]
    assert monitor.poll(done, "latest", sig)[0] == compat.update()          # nothing new: it stays
    _, running = train.start(values_for(train, small(model, data, tmp_path, epochs=500, name="second")))
    try:
        moved = monitor.poll(done, "step 0", sig)
        assert moved[0]["value"] == running and running in moved[0]["choices"]
        assert moved[-1]["job"] == running and moved[-1]["round"] == "latest"
        # the user goes back to the finished job while the second runs: the Monitor shows what was picked
        picked = monitor.poll(done, "latest", moved[-1])
        assert picked[-1]["job"] == done and "value" not in picked[0]
    finally:
        ctx.jobs.stop(running)
        ctx.jobs.wait(running, timeout=60)


def test_the_monitor_moves_to_a_queued_job_when_it_starts_running(ui, tmp_path, model):
    """A job started while another ran waits in the queue; the Monitor listed it then, so when the first ended
    and the queued one began to run, the Monitor stayed on the finished first job (noticed in session 22). A poll
    now moves to a job that was queued at the last poll and runs now, once the shown job has ended."""
    ctx, _ = ui
    train, monitor = ctx.components["train.tab"], ctx.components["monitor.tab"]
    data = make_dataset(tmp_path / "data")
    _, first = train.start(values_for(train, small(model, data, tmp_path, epochs=500, name="first")))
    _, second = train.start(values_for(train, small(model, data, tmp_path, epochs=500, name="second")))
    try:
        assert ctx.jobs.job(second).state == "queued"
        sig = monitor.poll(first, "latest", {})[-1]
        stays = monitor.poll(first, "latest", sig)          # the first still runs: the Monitor stays on it
        assert stays[-1]["job"] == first and "value" not in stays[0]
        sig = stays[-1]
        ctx.jobs.stop(first)
        assert ctx.jobs.wait(first, timeout=60) == "stopped"
        deadline = time.monotonic() + 60
        while ctx.jobs.job(second).state == "queued" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ctx.jobs.job(second).state == "running"
        moved = monitor.poll(first, "latest", sig)
        assert moved[0]["value"] == second and moved[-1]["job"] == second
        # the user goes back to the first job while the second runs: it stays shown
        picked = monitor.poll(first, "latest", moved[-1])
        assert picked[-1]["job"] == first and "value" not in picked[0]
    finally:
        for job_id in (first, second):
            ctx.jobs.stop(job_id)
            ctx.jobs.wait(job_id, timeout=60)


def test_control_and_class_picture_samplers_offer_the_hosts_samplers(tmp_path):
    """Control pictures and class pictures draw with any sampler of the host, but their drop-downs offered only
    our two, by our names (session 22, real A1111). A host that lists its samplers (`sampler_names`, as WebUIHost
    does from A1111's visible samplers) now gets them offered, the default spelled as the host spells it;
    standalone keeps ours."""
    from lib_sdtrain.ui import dataset_tab, train_tab

    class ListingHost(StandaloneHost):
        def sampler_names(self):
            return ["DPM++ 2M", "Euler a", "Euler", "DDIM"]

    def shown(host_cls):
        return dropdowns(tmp_path, host_cls, [train_tab.build, dataset_tab.build])

    listed = shown(ListingHost)
    assert listed["training_lab_train_sample_sampler"] == (["Euler", "DPM++ 2M", "Euler a", "DDIM"], "Euler")
    assert listed["training_lab_ds_cg_sampler"] == (["DPM++ 2M", "Euler a", "Euler", "DDIM"], "Euler")
    ours = shown(StandaloneHost)
    assert ours["training_lab_train_sample_sampler"] == (["euler", "ddim"], "euler")
    assert ours["training_lab_ds_cg_sampler"] == (["euler", "ddim"], "euler")


def a1111_first_start(block, path="training_lab"):
    """What A1111's ui-config.json does to the tab's values on a first start (tests/a1111_ui_config.py): the first
    component of a key writes its value into the config, and every later component of that key is given the
    config's value when one is there. Returns [(key, component, value it ends with)]."""
    config, out = {}, []
    for key, x, field in ui_config_keys(block, path):
        if field != "value":
            continue
        if config.get(key) is None:
            config[key] = x.value
            out.append((key, x, x.value))
        else:
            out.append((key, x, config[key]))
    return out


def test_no_widget_takes_another_widgets_default_in_a1111(ui):
    """A1111 gives every widget of one label the value the first widget of that label saved. LoRA's "Train text
    encoder" (on) thereby turned the fine-tune's (off by default) on inside A1111 from its first start. Method
    sections now label such settings with their own name; no widget of the whole tab ends a first start with
    another widget's value."""
    _, demo = ui
    changed = [(key, comp.value, value) for key, comp, value in a1111_first_start(demo)
               if comp.value is not None and value != comp.value]
    assert not changed
    labels = {comp.label for _, comp, _ in a1111_first_start(demo)}
    assert {"Train text encoder (lora)", "Train text encoder (finetune)", "Train text encoder (dreambooth)"} <= labels


def test_no_two_widgets_share_an_a1111_ui_config_key(ui):
    """A1111 keys a widget's saved default by tab and label only: the Sampler, Steps, CFG scale and Negative prompt
    of the class pictures and of Compare, the three Batch sizes, two Epochs, two Class prompts and four Stop
    buttons were one key each, so Settings → Defaults listed only the first, whose saved value (and a slider's
    range) every other one then took. A repeated label now puts its sub-tab in the key (A1111's
    `custom_script_source`); the labels shown stay as they were."""
    ctx, demo = ui
    assert not repeated_keys(demo)
    keys = {key for key, _, _ in ui_config_keys(demo)}
    assert len(keys) == len(ui_config_keys(demo))
    # the first widget of a label keeps the key it always had, so a default saved for it stays with it
    assert "training_lab/Steps/value" in keys and "training_lab/Sampler/value" in keys
    steps = {comp.elem_id: key for key, comp, field in ui_config_keys(demo)
             if field == "value" and comp.label == "Steps"}
    assert steps["training_lab_compare_steps"] == "customscript/training_lab/Compare/training_lab/Steps/value"
    assert len(steps) == 2 and "training_lab/Steps/value" in steps.values()
    train = {f.component.elem_id: f.component for f in ctx.components["train.tab"].fields}
    assert train["training_lab_train_batch_size"].label == "Batch size"           # what the page shows: unchanged


def test_repeated_labels_in_one_sub_tab_get_their_own_keys_too():
    from lib_sdtrain.ui.tabs import scope_repeated_labels

    with gr.Blocks() as demo:
        with gr.Tab("A"):
            a = [gr.Number(label="Steps"), gr.Number(label="Steps"), gr.Button("Stop")]
        with gr.Tab("B"):
            b = [gr.Number(label="Steps"), compat.not_saved(gr.Textbox(label="Log")), gr.Textbox(label="Log")]
    assert repeated_keys(demo) and len(scope_repeated_labels(demo)) == 2
    assert not repeated_keys(demo)
    assert [getattr(x, "custom_script_source", None) for x in a + b] == [
        None, "training_lab/A", None, "training_lab/B", None, None]   # a view kept out of the config takes no key
    with gr.Blocks() as demo:
        with gr.Tab("A"):
            xs = [gr.Number(label="Steps") for _ in range(3)]
        with gr.Tab("B"):
            xs.append(gr.Number(label="Steps"))
    scope_repeated_labels(demo)
    assert not repeated_keys(demo)                          # a third in one sub-tab is numbered
    assert [getattr(x, "custom_script_source", None) for x in xs] == [
        None, "training_lab/A", "training_lab/A#2", "training_lab/B"]


def test_views_of_a_run_are_not_kept_in_a1111s_ui_config(ui):
    """A1111 keeps each widget's value in ui-config.json and puts it back at the next start (and lists it under
    Settings → Defaults): the Monitor's run folder, TensorBoard line, log and job, the Train tab's job id and TOML
    view, and Compare's saved path would come back stale. They carry A1111's `do_not_save_to_config`; the
    settings the user chooses do not."""
    _, demo = ui
    marked = {b.elem_id for b in demo.blocks.values() if getattr(b, "do_not_save_to_config", False)}
    assert {"training_lab_monitor_run_dir", "training_lab_monitor_tensorboard", "training_lab_monitor_log",
            "training_lab_monitor_job", "training_lab_monitor_round", "training_lab_train_job",
            "training_lab_train_toml"} <= marked
    assert not marked & {"training_lab_train_learning_rate", "training_lab_train_data", "training_lab_ds_cg_sampler"}
    kept = {key for key, _, _ in a1111_first_start(demo)}
    assert "training_lab/Status and warnings/value" not in kept and "training_lab/Learning rate/value" in kept
