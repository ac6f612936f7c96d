"""scripts/training_lab.py inside the fake A1111: callbacks registered at import, settings, the JSON API, auth,
a job running through Reload UI. The script is executed the way A1111 does it (module name = file name, not kept
in sys.modules)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import fake_webui  # noqa: E402

sys.path.remove(str(HERE))

from conftest import press_at_step  # noqa: E402
from lib_sdtrain.testing.tiny import make_tiny_checkpoint  # noqa: E402


def load_script():
    """`modules.script_loading.load_module`: exec the file as module 'training_lab.py'."""
    spec = importlib.util.spec_from_file_location("training_lab.py", ROOT / "scripts" / "training_lab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui-script")
    with fake_webui.installed(root) as dirs:
        make_tiny_checkpoint(dirs["checkpoint"] / "tiny-sd1.safetensors", "sd1")
        from modules import script_callbacks, sd_models

        sd_models.list_models()
        sd_models.load_model(sd_models.checkpoint_aliases["tiny-sd1"])
        script_callbacks.clear_callbacks()      # what load_scripts() does before executing scripts
        script = load_script()
        script_callbacks.before_ui_callback()   # then, before the UI is built
        from modules import shared

        # the Settings page's Reload UI button keeps the function it was built with
        yield {"dirs": dirs, "script": script, "root": root, "reload_button": shared.state.request_restart}
        script.stop_jobs()


def dataset(root, n=2):
    folder = root / "2_zwx toy"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.full((64, 64, 3), 40 * i, np.uint8)
        arr[16:48, 16:48] = [255, 0, 0]
        Image.fromarray(arr).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zwx toy {i}")
    return root


def job_settings(tmp_path, name, steps=3):
    return {"data": str(dataset(tmp_path / f"d-{name}")), "name": name, "resolution": 64, "min_bucket": 64,
            "max_bucket": 64, "batch_size": 1, "epochs": 1, "max_steps": steps, "save_every_n_epochs": 0,
            "save_state": False, "tensorboard": False, "sample_every_n_epochs": 0,
            "lora": {"network_dim": 2, "network_alpha": 2}}


def test_callbacks_are_registered_at_import(webui):
    from modules import script_callbacks

    script = webui["script"]
    registered = {cat: [c.callback for c in cbs] for cat, cbs in script_callbacks.callback_map.items()}
    assert registered["callbacks_ui_tabs"] == [script.on_ui_tabs]
    assert registered["callbacks_ui_settings"] == [script.on_ui_settings]
    assert registered["callbacks_app_started"] == [script.on_app_started]
    assert registered.get("callbacks_script_unloaded", []) == []       # nothing stops on Reload UI
    assert registered["callbacks_on_reload"] == [script.on_before_reload]
    assert registered["callbacks_before_ui"] == [script.on_before_ui]
    assert "training_lab.py" not in sys.modules


def test_import_is_light(webui):
    """Executing the script imports none of the heavy parts (host adapter, UI pages, FastAPI)."""
    from modules import script_callbacks

    heavy = ("lib_sdtrain.hosts.webui", "lib_sdtrain.ui.tabs", "lib_sdtrain.jobs")
    saved_modules = {m: sys.modules.pop(m) for m in heavy if m in sys.modules}
    saved_callbacks = {k: list(v) for k, v in script_callbacks.callback_map.items()}
    try:
        load_script()
        assert [m for m in heavy if m in sys.modules] == []
    finally:
        for k, v in saved_callbacks.items():
            script_callbacks.callback_map[k][:] = v
        sys.modules.update(saved_modules)


def test_settings_section(webui):
    from modules import script_callbacks, shared

    script_callbacks.ui_settings_callback()
    for key in ("training_lab_outputs_dir", "training_lab_memory_note"):
        assert shared.opts.data_labels[key].section == ("training_lab", "Training Lab")
    assert shared.opts.training_lab_outputs_dir == ""


def test_ui_context_uses_the_webui_host(webui):
    pytest.importorskip("gradio")   # the context module is gradio-free, the tab is not
    ctx = webui["script"].ui_context()
    assert ctx.in_webui and type(ctx.host()).__name__ == "WebUIHost" and ctx.jobs is webui["script"].manager()


def test_ui_tab_is_built_by_lib_sdtrain_ui(webui):
    pytest.importorskip("gradio")
    from modules import script_callbacks

    tabs = script_callbacks.ui_tabs_callback()
    assert [(label, elem) for _, label, elem in tabs] == [("Training Lab", "training_lab")]


def tab_handler(elem_id):
    """The handler of the button `elem_id` in the Training Lab tab as A1111 builds it (ui_tabs callback)."""
    from modules import script_callbacks

    (blocks, _, _), = script_callbacks.ui_tabs_callback()
    button = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    return next(f.fn for f in fns if any((t[0] if isinstance(t, (list, tuple)) else t) == button._id
                                          for t in f.targets))


def bucket_report(tmp_path):
    """The Dataset tab's Bucket report button inside the WebUI, on a 2-picture 64-px dataset: (resolution, smallest
    and largest bucket side, step) → (summary, table, status line)."""
    on_buckets = tab_handler("training_lab_ds_bucket_btn")
    data = str(dataset(tmp_path / "d-buckets"))

    def report(resolution, low=0, high=0, step=64):   # folder, reg, ext, resolution, min, max, step, ...
        return on_buckets(data, "", ".txt", resolution, low, high, step, False, False, 1)

    return report


def test_a_bucket_side_refused_after_rounding_is_named_as_typed(webui, tmp_path):
    """Dataset tab → Buckets in the WebUI (real A1111 v1.10.1, session 22): a smallest bucket side of 32 said
    "must be at least 64, got 0", the side after rounding down to the step, not the one typed."""
    pytest.importorskip("gradio")
    report = bucket_report(tmp_path)
    summary, rows, status = report("")                   # the model's 64 px: one bucket
    assert status == "" and [r[0] for r in rows] == ["64x64"] and "1 buckets used" in summary
    _, _, status = report("", low=32)
    assert "at least 64, got 32, rounded down to 0 at bucket step 64" in status, status
    _, _, status = report("", high=100)                   # 100 rounds up to 128, which the 64-px model fits
    assert status == ""
    _, _, status = report("512", high=100)
    assert "largest bucket side (100, rounded up to 128 at bucket step 64) must be at least the resolution (512)" \
        in status, status
    _, _, status = report("512", low=320, high=1024)      # nothing rounded: the side alone, as before
    assert status == ""
    _, _, status = report("256", low=320, high=1024)
    assert "smallest bucket side (320) must not exceed the resolution (256)" in status, status


def test_a_refused_bucket_report_clears_the_last_reports_table(webui, tmp_path):
    """Dataset tab → Buckets in the WebUI (real A1111 v1.10.1, session 22): after a refusal ("abc", 32, 99999 px,
    a bucket side) the summary was cleared but the table still showed the previous report's buckets beside the
    error. It is emptied now, headers kept (gradio 3.41 drops them for [])."""
    pytest.importorskip("gradio")
    report = bucket_report(tmp_path)
    empty = {"headers": ["bucket", "aspect", "pictures", "with repeats", "batches"], "data": []}
    for bad, low, why in [("abc", 0, "whole number or WxH"), ("32", 0, "from 64 to 4096"),
                          ("99999", 0, "from 64 to 4096"), ("", 32, "smallest bucket side")]:
        _, rows, status = report("768x512")
        assert status == "" and [r[0] for r in rows] == ["576x576"], (rows, status)
        summary, table, status = report(bad, low=low)
        assert why in status and summary == "" and table == empty, (bad, table, status)


def test_a_config_or_preset_shows_the_control_pictures_sampler_as_a1111_lists_it(webui, tmp_path):
    """Train tab → Config file → Load in the WebUI (real A1111 v1.10.1, session 22): a config saying "euler" (ours,
    as configs store it), "dpm++ 2m", or no sampler (the default) filled the drop-down with "euler" / "dpm++ 2m",
    no entry of A1111's list marked, where the tab opens on "Euler". They show as A1111 lists them now, and
    are stored as before."""
    pytest.importorskip("gradio")
    from lib_sdtrain.ui import tabs
    from lib_sdtrain.ui.presets import PRESETS
    from lib_sdtrain.ui.widgets import dict_to_values

    ctx = webui["script"].ui_context()      # what on_ui_tabs builds the tab with
    tabs.build(ctx)
    train = ctx.components["train.tab"]
    (at,) = [i for i, f in enumerate(train.fields) if f.key == "sample_sampler"]
    assert train.fields[at].component.value == "Euler"
    start = dict_to_values(train.fields, {})
    for written, shown, stored in [("euler", "Euler", "euler"), ("dpm++ 2m", "DPM++ 2M", "DPM++ 2M"),
                                   ("DDIM", "DDIM", "ddim"), ("k_euler_a", "k_euler_a", "k_euler_a"),
                                   (None, "Euler", "euler")]:
        path = tmp_path / "run.toml"
        path.write_text('method = "lora"\nname = "shown"\n' + (f'sample_sampler = "{written}"\n' if written else ""),
                        encoding="utf-8")
        values, message = train.load_config_values(str(path), list(start))
        assert values[at] == shown and "Loaded" in message, (written, values[at])
        assert train.settings(values).sample_sampler == stored
    values = list(start)
    values[at] = "euler"
    assert train.preset_values(next(iter(PRESETS)), values)[at] == "Euler"    # a preset keeps it, as listed


def test_api_start_watch_list_outputs(webui, tmp_path):
    script = webui["script"]
    started = script.api_start(job_settings(tmp_path, "api"))
    job_id = started["job_id"]
    assert script.manager().wait(job_id, timeout=120) == "finished"
    first = script.api_status(job_id, 0)
    assert first["state"] == "finished" and first["step"] == 3 and first["events"]
    later = script.api_status(job_id, first["cursor"])
    assert later["events"] == [] and later["cursor"] == first["cursor"]     # events since N
    assert any(j["id"] == job_id for j in script.api_jobs()["jobs"])
    finals = [o["path"] for o in script.api_outputs()["outputs"] if o["role"] == "final"]
    assert finals == [str(webui["dirs"]["lora"] / "api.safetensors")]
    # the Compare tab's job through the API: the final file at two strengths, on the same prompt and seed
    from lib_sdtrain.errors import UserError

    run_dir = first.get("run_dir") or str(webui["dirs"]["outputs"] / "training-lab" / "runs" / "api")
    compared = script.api_compare({"run": run_dir, "settings": {
        "prompts": ["zwx toy"], "control_prompts": [], "seeds": [3], "weights": [1.0, 0.5], "steps": 2,
        "include_base": True, "score": "none"}, "out": str(tmp_path / "cmp.png")})
    assert Path(compared["path"]).is_file() and Path(compared["json"]).is_file()
    assert [r["row"] for r in compared["rows"]] == ["base model (no lora)", "final · epoch 1 · step 3"]
    assert compared["rows"][1]["epoch"] == 1 and compared["rows"][1]["score_trigger"] is None   # score "none"
    saved = json.loads(Path(compared["json"]).read_text(encoding="utf-8"))
    assert saved["settings"]["weights"] == [1.0, 0.5] and saved["settings"]["seeds"] == [3]   # a column each
    boxes = saved["layout"]["cell_boxes"]                      # where each cell is, to crop it back out
    assert len(boxes) == 2 and len(boxes[0]) == 2 and Image.open(compared["path"]).size == tuple(saved["layout"]["size"])
    quiet = script.api_compare({"run": run_dir, "advice": False, "out": str(tmp_path / "quiet.png"), "settings": {
        "prompts": ["zwx toy"], "control_prompts": [], "seeds": [3], "steps": 2, "include_base": False,
        "score": "none"}})
    assert quiet["advice"] is None and len(quiet["rows"]) == 1
    with pytest.raises(UserError, match="request body"):
        script.api_compare(["not", "a", "dict"])
    with pytest.raises(UserError, match="choose a run"):
        script.api_compare({"settings": {}})


# ---- the compare route as an A1111 job ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compare_run(webui, tmp_path_factory):
    """A finished one-epoch LoRA run to compare (trained directly, not through the job manager)."""
    from lib_sdtrain.train.loop import train
    from lib_sdtrain.train.settings import TrainSettings

    root = tmp_path_factory.mktemp("compare-run")
    result = train(TrainSettings.from_dict(job_settings(root, "cmp")), webui["script"].host())
    return str(result.run_dir)


def compare_body(run, out, **settings):
    return {"run": run, "out": str(out), "advice": False, "settings": {
        "prompts": ["zwx toy"], "control_prompts": [], "seeds": [3, 4], "weights": [1.0], "steps": 2,
        "include_base": True, "score": "none", **settings}}


def model_snapshot():
    from modules import shared

    model = shared.sd_model
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()})


def assert_model_as(before):
    tensors, grads, modes = model_snapshot()
    assert set(tensors) == set(before[0])
    assert not [k for k in tensors if not torch.equal(tensors[k], before[0][k])]
    assert grads == before[1] and modes == before[2]


def assert_a1111_state_reset(task_prefix="task(training-lab-compare-"):
    from modules import call_queue, progress, shared

    st = shared.state
    assert (st.job, st.job_no, st.job_count, st.textinfo) == ("", 0, 0, None)
    assert not call_queue.queue_lock.locked() and progress.current_task is None
    assert progress.finished_tasks and progress.finished_tasks[-1].startswith(task_prefix)
    assert shared.total_tqdm.bar is None             # the console's total bar closed for the next generation


def spy_on_pictures(monkeypatch, each=None):
    """Record A1111's state as each picture of the compare starts (what /sdapi/v1/progress reads)."""
    from modules import call_queue, processing, progress, shared

    seen, real = [], processing.process_images

    def spy(p):
        st = shared.state
        seen.append({"job": st.job, "job_no": st.job_no, "job_count": st.job_count, "textinfo": st.textinfo,
                     "locked": call_queue.queue_lock.locked(), "task": progress.current_task,
                     "sampler": p.sampler_name})
        if each is not None:
            each(len(seen))
        return real(p)

    monkeypatch.setattr(processing, "process_images", spy)
    return seen


def test_api_compare_runs_as_an_a1111_job(webui, compare_run, tmp_path, monkeypatch):
    """A1111's progress API shows the compare while it runs (job, job_no / job_count, textinfo, a task id), under
    its queue lock, and the state is put back afterwards. A1111's display name "Euler" is taken and stored as
    ours; the pictures are drawn with A1111's "Euler"."""
    from modules import shared

    script = webui["script"]
    before = model_snapshot()
    seen = spy_on_pictures(monkeypatch)
    res = script.api_compare(compare_body(compare_run, tmp_path / "job.png", sampler="Euler"))
    assert res["stopped"] is False and len(seen) == 4                # base row + final row, two seeds each
    assert {s["job"] for s in seen} == {"training-lab-compare"} and all(s["locked"] for s in seen)
    assert len({s["task"] for s in seen}) == 1 and seen[0]["task"].startswith("task(training-lab-compare-")
    assert [(s["job_no"], s["job_count"]) for s in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert seen[0]["textinfo"] == "Training Lab: base model (no lora)"
    assert seen[2]["textinfo"] == "Training Lab: final · epoch 1 · step 3: weight 1"
    assert {s["sampler"] for s in seen} == {"Euler"}
    assert json.loads(Path(res["json"]).read_text(encoding="utf-8"))["settings"]["sampler"] == "euler"
    assert_a1111_state_reset()
    assert "training-lab-compare" in shared.state.history
    assert_model_as(before)


def test_a1111_interrupt_stops_a_compare_with_a_partial_grid(webui, compare_run, tmp_path, monkeypatch):
    """POST /sdapi/v1/interrupt (shared.state.interrupt()) in the middle of the second picture: the picture it cut
    short is left out, nothing more is drawn, the grid of what was drawn is saved as stopped, the model is
    given back exactly and A1111's state is reset."""
    script = webui["script"]
    before = model_snapshot()
    # picture 2 (two steps each), after its first step
    press_at_step(monkeypatch, 3, "interrupt")
    seen = spy_on_pictures(monkeypatch)
    res = script.api_compare(compare_body(compare_run, tmp_path / "stopped.png", sampler="DDIM"))
    assert len(seen) == 2 and res["stopped"] is True
    saved = json.loads(Path(res["json"]).read_text(encoding="utf-8"))
    assert saved["stopped"] is True and saved["settings"]["sampler"] == "ddim"
    assert {s["sampler"] for s in seen} == {"DDIM"}
    grid = np.asarray(Image.open(res["path"]).convert("RGB"))
    boxes = saved["layout"]["cell_boxes"]
    blank = [[bool((grid[y0 + 1:y1 - 1, x0 + 1:x1 - 1] == 255).all()) for x0, y0, x1, y1 in row] for row in boxes]
    assert blank == [[False, True], [True, True]]     # the first picture only; the cut one is not in the grid
    assert_a1111_state_reset()
    assert_model_as(before)
    # the next compare is not stopped by the old interrupt: state.begin() clears it, as for any A1111 job
    monkeypatch.undo()
    again = script.api_compare(compare_body(compare_run, tmp_path / "again.png"))
    assert again["stopped"] is False


def test_a_compare_stopped_while_waiting_for_the_queue_draws_nothing(webui, compare_run, tmp_path):
    """The Compare tab's Stop pressed while its job waits for A1111's queue lock (another job holds it): the
    comparison ends at once as stopped, with no grid and no file, its status line saying so; it never began as
    an A1111 job, and the lock is passed on once the other job ends."""
    import threading
    import time

    from modules import call_queue, shared

    from lib_sdtrain.evaluate.compare import CompareSettings
    from lib_sdtrain.ui import compare_tab

    script = webui["script"]
    settings = CompareSettings.from_dict(compare_body(compare_run, tmp_path / "x.png")["settings"])
    taken, release = threading.Event(), threading.Event()

    def other_job():
        with call_queue.queue_lock:
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=other_job)
    holder.start()
    assert taken.wait(5)
    history, lines, results = list(shared.state.history), [], []
    try:
        t0 = time.time()
        for res, line in compare_tab.compare_updates(script.ui_context(), compare_run, settings, every=0.05,
                                                     out=tmp_path / "waited.png"):
            lines.append(line)
            results.append(res)
            if line.startswith("waiting for A1111's queue") and compare_tab._STOP.get("token") is not None:
                compare_tab.stop_compare()
            assert time.time() - t0 < 10
        assert call_queue.queue_lock.locked() and shared.state.history == history
    finally:
        release.set()
        holder.join(5)
    assert "waiting for A1111's queue (another job is running)" in lines
    assert lines[-1] == "stopped while waiting for its turn: nothing drawn, no grid"
    assert results[-1]["stopped"] is True and results[-1]["comparison"] is None and results[-1]["image"] is None
    assert not (tmp_path / "waited.png").exists() and compare_tab._STOP.get("token") is None
    t0 = time.time()
    while call_queue.queue_lock.locked() and time.time() - t0 < 5:
        time.sleep(0.02)
    assert not call_queue.queue_lock.locked()


def test_a_compare_failing_inside_the_webui_puts_everything_back(webui, compare_run, tmp_path, monkeypatch):
    from lib_sdtrain.evaluate import apply

    script = webui["script"]
    before = model_snapshot()

    def fail_on_third(n):
        if n == 3:                       # the first picture of the trained file's row (the LoRA is applied)
            raise RuntimeError("sampler failed inside the WebUI")

    spy_on_pictures(monkeypatch, fail_on_third)
    with pytest.raises(RuntimeError, match="sampler failed"):
        script.api_compare(compare_body(compare_run, tmp_path / "failed.png"))
    assert_a1111_state_reset()
    assert_model_as(before)
    monkeypatch.undo()

    def no_applier(*args, **kwargs):     # fails after the model was lent, before anything is drawn
        raise RuntimeError("cannot apply")

    monkeypatch.setattr(apply, "make_applier", no_applier)
    with pytest.raises(RuntimeError, match="cannot apply"):
        script.api_compare(compare_body(compare_run, tmp_path / "no-applier.png"))
    assert_a1111_state_reset()
    assert_model_as(before)
    host = script.host()
    assert not host._loans                                 # nothing still lent out


def test_a1111_skip_leaves_one_compare_cell_empty(webui, compare_run, tmp_path, monkeypatch):
    """POST /sdapi/v1/skip (shared.state.skip()) in the middle of the second picture: A1111's sampler ends it early;
    that cell is left empty (not the half-drawn picture), the other pictures are drawn, the compare is not
    stopped, the grid and its JSON are written and the skip flag is cleared."""
    from modules import shared

    script = webui["script"]
    before = model_snapshot()

    # picture 2 (base model, seed 4), after its first step
    press_at_step(monkeypatch, 3, "skip")
    seen = spy_on_pictures(monkeypatch)
    res = script.api_compare(compare_body(compare_run, tmp_path / "skipped.png"))
    assert len(seen) == 4 and res["stopped"] is False and Path(res["path"]).is_file()
    saved = json.loads(Path(res["json"]).read_text(encoding="utf-8"))
    assert saved["stopped"] is False and [r["row"] for r in saved["summary"]] == [r["row"] for r in res["rows"]]
    grid = np.asarray(Image.open(res["path"]).convert("RGB"))
    boxes = saved["layout"]["cell_boxes"]
    blank = [[bool((grid[y0 + 1:y1 - 1, x0 + 1:x1 - 1] == 255).all()) for x0, y0, x1, y1 in row] for row in boxes]
    assert blank == [[False, True], [False, False]]   # only the skipped cell is empty
    assert shared.state.skipped is False
    assert_a1111_state_reset()
    assert_model_as(before)


@pytest.fixture
def nan_run(webui, tmp_path):
    """A finished one-epoch LoRA run whose (only, final) save was overwritten with NaN weights, its metadata kept
    (a run that diverged): (run folder, the file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lib_sdtrain.train.loop import train
    from lib_sdtrain.train.settings import TrainSettings

    result = train(TrainSettings.from_dict({**job_settings(tmp_path, "nan"), "output": str(tmp_path / "out"),
                                            "overwrite": True}),   # the run folder is shared by the tests
                   webui["script"].host())
    (saved,) = sorted((tmp_path / "out").glob("nan*.safetensors"))
    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
    tensors = {k: torch.full_like(v, float("nan")) if k.endswith(".weight") else v for k, v in load_file(saved).items()}
    save_file(tensors, str(saved), metadata=meta)
    return str(result.run_dir), saved


def test_a_save_with_nan_weights_is_named_in_the_compare_tab_and_the_api(webui, nan_run, tmp_path):
    """Compare tab in real A1111 v1.10.1 (session 22): a save whose weights hold NaN got its blank row, but the
    warning naming it reached neither the tab (status "done: 2 of 3 pictures, grid saved", nothing else) nor the
    API or the saved JSON. The tab's status line, the API's answer and the JSON now carry it."""
    from lib_sdtrain.evaluate.compare import CompareSettings
    from lib_sdtrain.ui import compare_tab

    script = webui["script"]
    run_dir, saved = nan_run
    before = model_snapshot()
    body = compare_body(run_dir, tmp_path / "api.png", seeds=[3])
    res = script.api_compare(body)
    assert [r["score_trigger"] for r in res["rows"]] == [None, None] and res["stopped"] is False
    (warned,) = res["warnings"]
    assert saved.name in warned and "not finite" in warned and "blank" in warned, warned
    assert json.loads(Path(res["json"]).read_text(encoding="utf-8"))["warnings"] == [warned]
    # the tab's Compare button streams compare_updates: its last status line names the file under "done"
    settings = CompareSettings.from_dict(body["settings"])
    updates = list(compare_tab.compare_updates(script.ui_context(), run_dir, settings, every=0.05, advice=False,
                                               out=tmp_path / "tab.png"))
    res, line = updates[-1]
    assert line.startswith("done: 1 of 2 pictures, grid saved"), line
    assert f"⚠ {saved.name} holds weights that are not finite" in line and "its row of the grid is blank" in line
    assert_model_as(before)
    assert_a1111_state_reset()


def test_the_advice_never_picks_a_save_left_blank_for_nan_weights(webui, nan_run, tmp_path):
    """Compare tab in real A1111 v1.10.1 (session 22): with the first of two saves NaN (row blank), the advice said
    "Use epoch 1 · step 3 or earlier", the save that could not be drawn. A blank row is not advised now; here
    the only save is NaN, and the advice had called it "the latest save with no warning above"."""
    script = webui["script"]
    run_dir, saved = nan_run
    res = script.api_compare({**compare_body(run_dir, tmp_path / "advice.png", seeds=[3]), "advice": True})
    assert saved.name in res["warnings"][0]
    label = res["rows"][1]["row"]                         # "final · epoch 1 · step 3": blank
    assert label not in (res["advice"] or ""), res["advice"]
    advice = json.loads(Path(res["json"]).read_text(encoding="utf-8"))["advice"]
    assert not [a for a in advice if label in a["message"]], advice


# ---- class pictures from the Dataset tab as an A1111 job ---------------------------------------------------------
def classgen_request(out, count):
    from lib_sdtrain.ui.dataset_tab import ClassGenRequest

    return ClassGenRequest(str(out), "a toy", count=count, seed=0, width=64, height=64, steps=2)


def render_class_pictures(script, req):
    """What the Dataset tab's "Render class pictures" button runs, on the script's UI context; waits for the end."""
    from lib_sdtrain.ui import dataset_tab

    runner = dataset_tab.classgen_runner(script.ui_context())
    runner.start(req)
    runner.join(120)
    st = runner.state()
    assert not st["running"], st
    return st


def class_seeds(out):
    return sorted(int(p.stem.rsplit("-", 1)[1]) for p in Path(out).glob("class-*.png"))


def test_dataset_tab_class_pictures_run_as_an_a1111_job(webui, tmp_path, monkeypatch):
    """The Dataset tab's class pictures in the WebUI: job "training-lab-class-pictures" under the queue lock, with
    a progress task, job_no / job_count and "class pictures N/M" for /sdapi/v1/progress while each picture is
    drawn; the state, the lock and the model are put back afterwards."""
    from modules import shared

    script = webui["script"]
    before = model_snapshot()
    seen = spy_on_pictures(monkeypatch)
    st = render_class_pictures(script, classgen_request(tmp_path / "reg", 3))
    assert st["error"] == "" and st["result"]["generated"] == 3 and len(seen) == 3
    assert {s["job"] for s in seen} == {"training-lab-class-pictures"} and all(s["locked"] for s in seen)
    assert len({s["task"] for s in seen}) == 1 and seen[0]["task"].startswith("task(training-lab-classgen-")
    assert [(s["job_no"], s["job_count"], s["textinfo"]) for s in seen] == \
        [(n, 3, f"Training Lab: class pictures {n}/3") for n in range(3)]
    assert_a1111_state_reset("task(training-lab-classgen-")
    assert "training-lab-class-pictures" in shared.state.history
    assert_model_as(before)


def test_a_sampler_a1111_does_not_have_is_refused_before_anything_is_drawn(webui, tmp_path, monkeypatch):
    """The control and class pictures' sampler drop-downs take any text (real A1111 v1.10.1, session 22): a typo
    such as "Eulr" was stored, and A1111's txt2img drew every picture with its first sampler (DPM++ 2M), saying so
    only in its console. A name A1111 has none of is refused now, by training's preflight (the API's start, the
    Train tab's Start) and by class pictures before any picture; any spelling of its names and aliases still
    works and is drawn with A1111's sampler of that name."""
    from lib_sdtrain.errors import UserError

    script = webui["script"]
    jobs_before = len(script.api_jobs()["jobs"])
    drawing = {**job_settings(tmp_path, "typo", steps=1), "sample_every_n_steps": 1, "control_prompts": ["a toy"],
               "sample_steps": 2}
    with pytest.raises(UserError, match=r"sample_sampler: unknown sampler 'Eulr': A1111 has no sampler of that "
                                        r"name .*its samplers are DPM\+\+ 2M, Euler a, Euler, DDIM"):
        script.api_start({**drawing, "sample_sampler": "Eulr"})
    assert len(script.api_jobs()["jobs"]) == jobs_before             # nothing queued
    script.api_start({**drawing, "sample_sampler": "Eulr", "sample_every_n_steps": 0, "sample_every_n_epochs": 0,
                      "name": "typo-quiet"})   # no control pictures: the sampler is not used, not checked
    seen = spy_on_pictures(monkeypatch)
    started = script.api_start({**drawing, "name": "typo-ok", "sample_sampler": "k_euler_a"})   # an alias
    assert script.manager().wait(started["job_id"], timeout=120) == "finished"
    assert seen and {s["sampler"] for s in seen} == {"Euler a"}
    seen.clear()      # A1111 1.9+ reads a scheduler after the name ("DPM++ 2M Karras"), in its own spelling only
    started = script.api_start({**drawing, "name": "typo-karras", "sample_sampler": "euler a karras"})
    assert script.manager().wait(started["job_id"], timeout=120) == "finished"
    assert seen and {s["sampler"] for s in seen} == {"Euler a Karras"}
    with pytest.raises(UserError, match="unknown sampler 'Eulr Karras'"):
        script.api_start({**drawing, "sample_sampler": "Eulr Karras"})
    # class pictures (the Dataset tab's button, and DreamBooth's class folder): refused before the first picture
    seen.clear()
    req = classgen_request(tmp_path / "reg", 2)
    req.sampler = "Eulr"
    st = render_class_pictures(script, req)
    assert "unknown sampler 'Eulr'" in st["error"] and seen == [] and class_seeds(tmp_path / "reg") == []
    req = classgen_request(tmp_path / "reg", 2)
    req.sampler = "euler a"
    st = render_class_pictures(script, req)
    assert st["error"] == "" and class_seeds(tmp_path / "reg") == [0, 1]
    assert {s["sampler"] for s in seen} == {"Euler a"}


def test_a1111_interrupt_stops_class_pictures_keeping_those_written(webui, tmp_path, monkeypatch):
    """Interrupt in the middle of the second picture: the cut picture is not saved, nothing more is drawn, the
    first picture stays (the next click resumes from it), the model and A1111's state are put back. A1111 keeps
    the interrupted flag after the job; the next click is not stopped by it."""
    from modules import shared

    script = webui["script"]
    before = model_snapshot()

    # picture 2 (two steps each), after its first step
    press_at_step(monkeypatch, 3, "interrupt")
    out = tmp_path / "reg"
    st = render_class_pictures(script, classgen_request(out, 4))
    assert st["error"] == "" and st["result"]["stopped"] and st["result"]["generated"] == 1
    assert class_seeds(out) == [0] and st["status"].startswith("stopped: 1 rendered")
    assert_a1111_state_reset("task(training-lab-classgen-")
    assert_model_as(before)
    assert shared.state.interrupted                 # left set, as A1111 leaves it after an API job
    monkeypatch.undo()
    again = render_class_pictures(script, classgen_request(out, 4))
    assert (again["result"]["generated"], again["result"]["skipped"], again["result"]["stopped"]) == (3, 1, False)
    assert class_seeds(out) == [0, 1, 2, 3]


def test_an_interrupt_left_from_an_earlier_job_does_not_blank_class_pictures(webui, tmp_path):
    """POST /sdapi/v1/interrupt while nothing runs (or after an API generation ended) leaves A1111's flag set until
    the next job begins; class pictures begin as a job, so they are all drawn."""
    from modules import shared

    shared.state.interrupt()
    st = render_class_pictures(webui["script"], classgen_request(tmp_path / "reg", 2))
    assert st["error"] == "" and (st["result"]["generated"], st["result"]["stopped"]) == (2, False)
    assert class_seeds(tmp_path / "reg") == [0, 1]


def test_class_pictures_failing_inside_the_webui_put_everything_back(webui, tmp_path, monkeypatch):
    script = webui["script"]
    before = model_snapshot()

    def fail_on_second(n):
        if n == 2:
            raise RuntimeError("sampler failed inside the WebUI")

    spy_on_pictures(monkeypatch, fail_on_second)
    st = render_class_pictures(script, classgen_request(tmp_path / "reg", 3))
    assert st["error"] == "RuntimeError: sampler failed inside the WebUI" and st["status"] == "failed"
    assert class_seeds(tmp_path / "reg") == [0]
    assert_a1111_state_reset("task(training-lab-classgen-")
    assert_model_as(before)
    assert not script.host()._loans


def test_a1111_skip_leaves_one_class_picture_out_and_draws_the_rest(webui, tmp_path, monkeypatch):
    """Skip in the middle of the second picture: that picture is not saved (A1111 decoded it half-drawn), the
    others are drawn and saved, the job is not stopped; the set is one short, and the next click draws it."""
    from modules import shared

    script = webui["script"]

    # picture 2 (seed 1), after its first step
    steps = press_at_step(monkeypatch, 3, "skip")
    out = tmp_path / "reg"
    st = render_class_pictures(script, classgen_request(out, 3))
    res = st["result"]
    assert st["error"] == "" and (res["generated"], res["left_out"], res["stopped"]) == (2, 1, False)
    assert class_seeds(out) == [0, 2] and len(steps) == 2 + 1 + 2
    assert "1 skipped while drawing, not saved" in st["status"] and shared.state.skipped is False
    assert_a1111_state_reset("task(training-lab-classgen-")
    monkeypatch.undo()
    again = render_class_pictures(script, classgen_request(out, 3))
    assert (again["result"]["generated"], again["result"]["skipped"]) == (1, 2) and class_seeds(out) == [0, 1, 2]


def test_api_errors_are_user_errors(webui):
    from lib_sdtrain.errors import UserError

    script = webui["script"]
    with pytest.raises(UserError, match="no job with id"):
        script.api_status("job-9999-none", 0)
    with pytest.raises(UserError):
        script.api_start(["not", "a", "dict"])
    with pytest.raises(UserError):
        script.api_start({"method": "no-such-method"})


def test_a_compare_body_of_the_wrong_shape_is_a_400_naming_the_key(webui, tmp_path):
    """/compare's own keys were read loosely: "out" as a list, a number or with a NUL byte was a 500 (after the
    grid was drawn), "advice": "no" gave advice (bool("no")), and a misspelt "settings" was ignored, comparing
    with the run's defaults instead of what was asked."""
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    webui["script"].register_routes(app)
    client = TestClient(app, client=("127.0.0.1", 50000), raise_server_exceptions=False)
    run = str(tmp_path / "run")
    for body, message in [({"run": run, "out": ["g.png"]}, "out: give a path as text, not ['g.png']"),
                          ({"run": run, "out": 5}, "out: give a path as text, not 5"),
                          ({"run": run, "out": "g\x00.png"}, "out: give a path as text"),
                          ({"run": ["x"]}, "run: give a path as text, not ['x']"),
                          ({"run": run, "advice": "no"}, "advice: true or false, not 'no'"),
                          ({"run": run, "setings": {"seeds": [1]}}, "unknown key 'setings' in the compare request")]:
        r = client.post("/training-lab/api/compare", json=body)
        assert r.status_code == 400 and r.json()["detail"].startswith(message), (body, r.status_code, r.text)


def test_api_auth_follows_api_auth_flag(webui):
    from modules import shared

    script = webui["script"]
    assert script.api_credentials() == {}
    shared.cmd_opts.api_auth = "alice:s3cret,bob:pw:with:colons"
    try:
        assert script.api_credentials() == {"alice": "s3cret", "bob": "pw:with:colons"}
        assert script.credentials_ok("alice", "s3cret") and script.credentials_ok("bob", "pw:with:colons")
        assert not script.credentials_ok("alice", "wrong") and not script.credentials_ok("eve", "s3cret")
    finally:
        shared.cmd_opts.api_auth = None


def test_routes_with_fastapi(webui, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules import shared

    script = webui["script"]
    shared.cmd_opts.api_auth = "alice:s3cret"
    try:
        app = FastAPI()
        paths = script.register_routes(app)
        assert "/training-lab/api/jobs/{job_id}/stop" in paths and "/training-lab/api/compare" in paths
        client = TestClient(app)
        assert client.get("/training-lab/api/jobs").status_code == 401
        auth = ("alice", "s3cret")
        assert client.get("/training-lab/api/jobs", auth=("alice", "nope")).status_code == 401
        r = client.post("/training-lab/api/jobs", json=job_settings(tmp_path, "http"), auth=auth)
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
        assert script.manager().wait(job_id, timeout=120) == "finished"
        st = client.get(f"/training-lab/api/jobs/{job_id}", params={"since": 0}, auth=auth).json()
        assert st["state"] == "finished" and st["events"]
        assert client.get("/training-lab/api/jobs/job-404", auth=auth).status_code == 404
        assert client.post("/training-lab/api/jobs", json={"method": "nope"}, auth=auth).status_code == 400
        outs = client.get("/training-lab/api/outputs", auth=auth).json()["outputs"]
        assert any(o["path"].endswith("http.safetensors") for o in outs)
        # compare over HTTP: a bad run is a 400 with the reason, no 500
        bad = client.post("/training-lab/api/compare", json={"run": str(tmp_path / "no-such-run")}, auth=auth)
        assert bad.status_code == 400 and bad.json()["detail"]
        sampler = client.post("/training-lab/api/compare", auth=auth,
                              json={"run": "x", "settings": {"sampler": "DPM++ 2M Karras"}})
        assert sampler.status_code == 400 and "euler or ddim (A1111's Euler and DDIM" in sampler.json()["detail"]
        assert client.post("/training-lab/api/compare", json={"run": "x"}).status_code == 401
    finally:
        shared.cmd_opts.api_auth = None


def reload_ui(webui):
    """Settings → Reload UI as A1111 v1.10 runs it: the button's function (State.request_restart: an interrupt,
    then the restart command), then webui.py's loop: the before-reload and unloaded callbacks, load_scripts()
    clearing every callback and executing each scripts/ file again as a new module (lib_sdtrain stays
    imported), the before-UI callbacks, and the UI and a new FastAPI app built from the new module's callbacks."""
    from modules import script_callbacks, shared

    webui["reload_button"]()
    assert shared.state.server_command == "restart"
    shared.state.server_command = None                     # the server loop takes the command
    script_callbacks.app_reload_callback()
    script_callbacks.script_unloaded_callback()
    script_callbacks.clear_callbacks()
    new = load_script()
    script_callbacks.before_ui_callback()
    webui["reload_button"] = shared.state.request_restart   # the rebuilt Settings page's button
    return new


def wait_for(what, timeout=60.0):
    import time

    deadline = time.time() + timeout
    while not what():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_job_runs_on_through_reload_ui_and_the_reloaded_tab_and_api_stop_it(webui, tmp_path, monkeypatch):
    """Reload UI while a job runs: the button's interrupt spares it and the job goes on; the new module's
    manager, Monitor tab and API routes (on the new app) show it and its losses growing; a second job queues
    behind it (never beside it); the new Monitor's Stop ends it, the lock and A1111's state are given back.
    Before, the reload stopped the job (A1111's interrupt, and our unload callbacks) and the new tab said "No
    training job yet"."""
    pytest.importorskip("gradio")
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules import call_queue, script_callbacks, shared

    from lib_sdtrain.ui.monitor_tab import MonitorTab

    old = webui["script"]
    job_id = old.api_start(job_settings(tmp_path, "through-reload", steps=100_000))["job_id"]
    wait_for(lambda: old.api_status(job_id)["step"] >= 2)

    new = reload_ui(webui)
    assert new is not old and new.manager() is old.manager() and new.host() is old.host()
    st = new.api_status(job_id)
    assert st["state"] == "running", st["phase"]
    assert not shared.state.interrupted and not old.manager().job(job_id).stop.requested
    at_reload = st["step"]
    wait_for(lambda: new.api_status(job_id)["step"] >= at_reload + 3)          # still training

    monitor = MonitorTab(new.ui_context())                                     # the reloaded page's Monitor
    snap = monitor.snapshot(None)
    assert snap["job"] == job_id and snap["state"] == "running" and snap["losses"] > at_reload
    assert job_id in monitor.job_choices() and "<svg" in snap["chart"]

    monkeypatch.setattr(shared.cmd_opts, "api", True, raising=False)
    app = FastAPI()
    script_callbacks.app_started_callback(None, app)      # the new module's on_app_started on the new app
    script_callbacks.app_started_callback(None, app)      # ... and again: no route twice
    ours = [(r.path, tuple(sorted(r.methods))) for r in app.routes if r.path.startswith(new.API_PREFIX)]
    assert len(ours) == len(set(ours)) == len(new.ROUTES)
    client = TestClient(app, client=("127.0.0.1", 50000))
    listed = client.get("/training-lab/api/jobs").json()["jobs"]
    assert [(j["id"], j["state"]) for j in listed if j["id"] == job_id] == [(job_id, "running")]

    second = client.post("/training-lab/api/jobs", json=job_settings(tmp_path, "beside", steps=3)).json()
    assert second["status"]["state"] == "queued" and job_id in second["status"]["phase"]
    assert client.post(f"/training-lab/api/jobs/{second['job_id']}/stop").json()["state"] == "stopped"

    assert "stopping" in monitor.stop(None)                                    # the reloaded Monitor's Stop
    assert new.manager().wait(job_id, timeout=60) == "stopped"
    st = client.get(f"/training-lab/api/jobs/{job_id}").json()
    assert st["state"] == "stopped" and at_reload < st["step"] < 100_000
    assert new.api_status(second["job_id"])["step"] == 0                     # the second never ran
    assert not call_queue.queue_lock.locked() and shared.state.job == ""


def test_reload_ui_with_no_job_keeps_the_finished_ones_and_trains_again(webui, tmp_path):
    pytest.importorskip("gradio")
    from lib_sdtrain.ui.monitor_tab import MonitorTab

    from modules import shared

    old = webui["script"]
    before = [j["id"] for j in old.api_jobs()["jobs"]]
    assert before                                          # earlier tests ran jobs in this WebUI process
    new = reload_ui(webui)
    assert shared.state.interrupted                        # with no training run, the button is A1111's own
    shared.state.interrupted = False
    wrapper = shared.state.request_restart                 # wrapped once, not once per reload
    assert wrapper._training_lab and not getattr(wrapper.__wrapped__, "_training_lab", False)
    for other in ("task(txt2img)", "training-lab-compare", "training-lab-class-pictures"):
        shared.state.job = other                           # anything but a training run is interrupted
        wrapper()
        assert shared.state.interrupted and "interrupt" not in vars(shared.state), other
        shared.state.interrupted, shared.state.server_command, shared.state.job = False, None, ""
    assert [j["id"] for j in new.api_jobs()["jobs"]] == before
    assert MonitorTab(new.ui_context()).snapshot(None)["job"] == before[-1]     # the newest, as before
    job_id = new.api_start(job_settings(tmp_path, "after-reload"))["job_id"]
    assert new.manager().wait(job_id, timeout=120) == "finished"
    assert job_id not in before


def test_a_reloaded_tab_says_when_the_extension_changed_on_disk(webui, monkeypatch, capsys):
    """Reload UI keeps lib_sdtrain imported (so a run goes on through it): after `git pull` in the extension's
    folder, the reloaded tab ran the old code, and any module first imported later came from the new files, with
    no word of it (noticed in session 22). The reloaded tab now says to restart the WebUI, and so does the console;
    unchanged files say nothing."""
    pytest.importorskip("gradio")
    import lib_sdtrain

    def notice(script):
        blocks = script.on_ui_tabs()[0][0]
        found = [b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "training_lab_notice"]
        return found[0].value if found else None

    assert lib_sdtrain.LOADED_SOURCE and not lib_sdtrain.source_changed()
    assert notice(webui["script"]) is None
    # one file of the package as it was when the package was imported: 10 bytes shorter than it is now, and other
    path, size, mtime = lib_sdtrain.LOADED_SOURCE[0]
    monkeypatch.setattr(lib_sdtrain, "LOADED_SOURCE", ((path, size - 10, mtime),) + lib_sdtrain.LOADED_SOURCE[1:])
    assert not lib_sdtrain.source_changed()        # its content is what was hashed at import: the same file
    monkeypatch.setitem(lib_sdtrain.LOADED_DIGESTS, path, b"other content")
    assert lib_sdtrain.source_changed()
    capsys.readouterr()
    shown = notice(webui["script"])
    assert shown and "restart the WebUI" in shown
    assert "restart the WebUI" in capsys.readouterr().out


def test_a_source_file_changed_and_changed_back_is_unchanged(tmp_path):
    """The restart notice compared sizes and modification times only: a file edited and edited back (a `git pull`
    then a `git checkout` of the old commit, an editor's save without changes) still asked for a restart. Files
    whose size or time differ are now hashed and compared with their content at import."""
    import os

    import lib_sdtrain as L

    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("A = 1\n")
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    (pkg / "notes.txt").write_text("not source")
    root = str(pkg)
    snap = L.source_snapshot(root)
    digests = L.source_digests(snap, root)
    assert [rel for rel, _, _ in snap] == ["a.py", os.path.join("sub", "b.py")]
    assert not L.source_differs(snap, digests, root)

    def touch(path, text=None):
        if text is not None:
            path.write_text(text)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))   # a later time, whatever the clock

    touch(pkg / "a.py")                                  # saved again with the same content
    assert not L.source_differs(snap, digests, root)
    touch(pkg / "a.py", "A = 10\n")                      # changed
    assert L.source_differs(snap, digests, root)
    touch(pkg / "a.py", "A = 1\n")                       # and changed back
    assert not L.source_differs(snap, digests, root)
    touch(pkg / "sub" / "b.py", "B = 3\n")               # same size, other content
    assert L.source_differs(snap, digests, root)
    touch(pkg / "sub" / "b.py", "B = 2\n")
    (pkg / "c.py").write_text("")                          # a file added
    assert L.source_differs(snap, digests, root)
    (pkg / "c.py").unlink()
    (pkg / "notes.txt").write_text("other")                # not a .py file
    assert not L.source_differs(snap, digests, root)
    (pkg / "sub" / "b.py").unlink()                        # a file gone
    assert L.source_differs(snap, digests, root)


def test_the_webuis_exit_stops_a_training_run_so_that_it_can_resume(webui, tmp_path, capsys):
    """Extensions → "Apply and restart UI" (and the API's restart and kill) end A1111's process with
    modules.restart.stop_program (os._exit): a run was cut mid-step, with nothing saved since its last save. The
    exit now first stops the run after its step, which saves a resumable state; the exit still happens, once,
    and with no run it happens at once."""
    from modules import restart

    script = webui["script"]
    restart.exits.clear()
    restart.restart_program()                               # nothing runs: straight through
    assert restart.exits == ["os._exit(0)"] and restart.stop_program._training_lab
    restart.exits.clear()
    cfg = {**job_settings(tmp_path, "cut-by-exit", steps=100_000), "save_state": True}
    job_id = script.api_start(cfg)["job_id"]
    wait_for(lambda: script.api_status(job_id)["step"] >= 2)
    capsys.readouterr()
    restart.restart_program()                               # "Apply and restart UI"
    assert restart.exits == ["os._exit(0)"]
    st = script.api_status(job_id)
    assert st["state"] == "stopped" and 2 <= st["step"] < 100_000
    assert any("resume the run" in line for line in st["log"]), st["log"][-5:]
    out = capsys.readouterr().out
    assert f"job {job_id} stops after its current step" in out and "stopped; resume it" in out
    script.on_before_ui()                                   # a Reload UI installs again: wrapped once, not twice
    assert not getattr(restart.stop_program.__wrapped__, "_training_lab", False)


def test_under_a1111_pins_gradio3_fastapi094_pydantic1(tmp_path):
    """The same script under the packages A1111 v1.10 pins (.venv-gradio3, made by tools/setup_gradio3.sh)."""
    import subprocess

    python = ROOT / ".venv-gradio3" / "bin" / "python"
    if not python.is_file():
        pytest.skip(".venv-gradio3 is missing: run tools/setup_gradio3.sh to test under A1111's gradio/fastapi pins")
    out = subprocess.run([str(python), str(HERE / "fake_webui" / "a1111_stack_check.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "OK versions 3.41.2 0.94.0 1." in out.stdout and "OK unloaded" in out.stdout, out.stdout
    assert "OK routes, auth and a training job" in out.stdout
    if "TAB-FAIL" in out.stdout:   # lib_sdtrain/ui's part: reported here, checked by the UI's own tests
        import warnings

        warnings.warn("Training Lab tab under gradio 3.41.2: " + out.stdout.split("TAB-FAIL", 1)[1].splitlines()[0])


def test_a_failure_inside_the_webui_reaches_log_api_and_tab(webui, tmp_path, monkeypatch, caplog):
    """An exception raised by A1111 itself (here: its attention switch) fails the job with one clear line in the
    API answer and the tab, and its full traceback in the console log, the job's log and the API answer."""
    pytest.importorskip("fastapi")
    import logging

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules import sd_hijack

    from lib_sdtrain.ui.monitor_tab import warnings_markdown

    def broken():
        raise RuntimeError("boom inside the WebUI")

    monkeypatch.setattr(sd_hijack, "undo_optimizations", broken)
    script = webui["script"]
    app = FastAPI()
    script.register_routes(app)
    client = TestClient(app, client=("127.0.0.1", 50000))   # without --api-auth only this computer starts jobs
    with caplog.at_level(logging.ERROR, logger="training_lab"):
        r = client.post("/training-lab/api/jobs", json=job_settings(tmp_path, "crash"))
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
        assert script.manager().wait(job_id, timeout=120) == "failed"
    st = client.get(f"/training-lab/api/jobs/{job_id}", params={"since": 0}).json()
    assert st["error"].startswith("unexpected error RuntimeError: boom inside the WebUI")
    assert "in broken" in st["traceback"] and "undo_optimizations" not in st["error"]
    assert st["log"][-1].startswith("traceback:") and "in broken" in st["log"][-1]
    assert st["events"][-1]["text"].startswith("job failed: unexpected error RuntimeError: boom")
    logged = [rec for rec in caplog.records if job_id in rec.getMessage()]
    assert logged and "in broken" in logged[0].getMessage()
    assert "boom inside the WebUI" in warnings_markdown(st)              # the Monitor tab's line

    def failing_list():
        raise OSError("disk gone")

    monkeypatch.setattr(script.manager(), "list_jobs", failing_list)
    r = client.get("/training-lab/api/jobs")
    assert r.status_code == 500 and r.json()["detail"].startswith("unexpected error OSError: disk gone")
