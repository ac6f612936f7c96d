"""JobManager: real LoRA runs on a tiny model in the background thread; polling, queueing, stopping."""

import time
from pathlib import Path

import numpy as np
import pytest

from lib_sdtrain.errors import UserError
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.jobs import JobManager, format_duration, progress_text
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from conftest import make_dataset


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny.safetensors", "sd1")


@pytest.fixture
def settings(tmp_path, model):
    return {
        "model": str(model), "data": str(make_dataset(tmp_path / "data")), "output": str(tmp_path / "out"),
        "name": "j", "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 2, "epochs": 2,
        "learning_rate": 1e-3, "tensorboard": False, "lora": {"network_dim": 2, "network_alpha": 2},
    }


@pytest.fixture
def jobs(tmp_path):
    manager = JobManager(lambda: StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs"))
    yield manager
    manager.shutdown()


def test_a_short_run_finishes_and_reports(jobs, settings):
    settings.update(sample_prompts=["zwx toy"], control_prompts=["toy"], sample_steps=2, sample_size=64)
    job_id = jobs.start(settings)
    assert jobs.status(job_id)["state"] in ("queued", "running")
    # poll like the Monitor tab does: pass the cursor back each time
    seen, cursor = [], 0
    deadline = time.time() + 120
    while time.time() < deadline:
        st = jobs.status(job_id, since=cursor)
        seen += st["events"]
        cursor = st["cursor"]
        if st["state"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    st = jobs.status(job_id, since=cursor)
    seen += st["events"]
    assert st["state"] == "finished", st["error"]
    kinds = {e["kind"] for e in seen}
    assert {"status", "progress", "loss", "saved", "samples"} <= kinds
    # 4 pictures × 3 repeats = 12 samples / batch 2 = 6 steps per epoch, 2 epochs
    assert st["total"] == 12 and st["step"] == 12 and st["fraction"] == 1.0
    assert "6 steps per epoch" in st["plan"]
    assert [x[0] for x in st["losses"]] == list(range(1, 13))
    assert all(np.isfinite(x[1]) for x in st["losses"])
    names = [Path(s["path"]).name for s in st["saved"]]
    assert names == ["j-000001.safetensors", "j.safetensors"] and st["saved"][-1]["final"]
    assert all(Path(s["path"]).is_file() for s in st["saved"])
    # control pictures: before training (step 0), after epoch 1, after the final step; A and B each round
    rounds = {(s["label"], s["step"]) for s in st["samples"]}
    assert rounds == {("A", 0), ("B", 0), ("A", 6), ("B", 6), ("A", 12), ("B", 12)}
    assert all(Path(p).is_file() for s in st["samples"] for p in s["paths"])
    assert st["run_dir"].endswith("runs/j") and Path(st["run_dir"], "config.toml").is_file()
    # events are JSON-friendly: pictures are not carried in them
    pictures = [p for e in seen if e["kind"] == "samples" for p in e["images"]]
    assert len(pictures) == 6 and all(Path(p).is_file() for p in pictures)
    # a second poll with the last cursor gets nothing new
    assert jobs.status(job_id, since=st["cursor"])["events"] == []
    outputs = jobs.list_outputs()
    kinds = {(o["kind"], o["role"]) for o in outputs}
    assert ("lora", "final") in kinds and ("lora", "intermediate") in kinds and ("config", "config") in kinds
    assert sum(o["kind"] == "sample" for o in outputs) == 6
    assert jobs.list_jobs()[0]["state"] == "finished"
    assert "step 12/12" in st["progress_text"]


def test_stop_a_running_job_and_cancel_a_queued_one(jobs, settings):
    first = jobs.start(dict(settings, epochs=500, name="long"))
    second = jobs.start(dict(settings, name="next"))
    assert jobs.status(second)["state"] == "queued"
    assert jobs.status(second)["queue_position"] == 1
    deadline = time.time() + 60
    while jobs.status(first)["step"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert jobs.status(first)["state"] == "running"
    assert jobs.stop(second) == "stopped"          # cancelled before it started
    jobs.stop(first)
    assert jobs.wait(first, timeout=60) == "stopped"
    st = jobs.status(first)
    assert 2 <= st["step"] < st["total"] and st["saved"] == []
    assert Path(st["run_dir"], "state").is_dir()      # resumable
    assert jobs.status(second)["step"] == 0 and jobs.status(second)["phase"].startswith("cancelled")


def test_queue_runs_jobs_one_after_another(jobs, settings):
    a = jobs.start(dict(settings, epochs=1, name="a"))
    b = jobs.start(dict(settings, epochs=1, name="b"))
    assert jobs.wait(b, timeout=120) == "finished"
    sa, sb = jobs.job(a), jobs.job(b)
    assert sa.state == "finished" and sa.ended <= sb.started


def test_bad_input_is_refused_or_reported(jobs, settings, tmp_path):
    with pytest.raises(UserError, match="unknown setting"):
        jobs.start(dict(settings, bogus=1))
    with pytest.raises(UserError, match="batch_size"):
        jobs.start(dict(settings, batch_size=0))
    with pytest.raises(UserError, match="dataset folder not found.*missing"):   # the preflight, before queueing
        jobs.start(dict(settings, data=str(tmp_path / "missing")))
    broken = tmp_path / "broken" / "1_x"            # found only when the pictures are opened: the job fails
    broken.mkdir(parents=True)
    (broken / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (broken / "cut.txt").write_text("x")
    job = jobs.start(dict(settings, data=str(broken.parent)))
    assert jobs.wait(job, timeout=60) == "failed"
    st = jobs.status(job)
    assert "no usable training pictures" in st["error"] and st["events"][-1]["text"].startswith("job failed")
    with pytest.raises(UserError, match="no job"):
        jobs.status("job-9999")


def test_a_resume_alone_that_is_not_text_is_refused_with_its_name(jobs):
    """{"resume": RUN} alone reads the run's settings first; a list, a number or a table there was a TypeError
    (HTTP 500 in the API) instead of the setting's own refusal."""
    for value in (["runs/x"], {"a": 1}, True):
        with pytest.raises(UserError, match=r"^resume: .* is not a valid str"):
            jobs.start({"resume": value})
    with pytest.raises(UserError, match="nothing to resume at 5"):      # a number is a name, as on the CLI
        jobs.start({"resume": 5})
    assert jobs.list_jobs() == []


def test_inputs_besides_the_dataset_are_refused_before_queueing(jobs, settings, tmp_path):
    """The bucket bounds against the resolution, reg_data, mask_dir and start_from were found only by the loop:
    the API answered 200 and the job failed moments later."""
    picture = tmp_path / "a-file.png"
    picture.write_bytes(b"x")
    for changes, message in [({"resolution": 128}, r"largest bucket side \(64\) must be at least the resolution"),
                             ({"min_bucket": 128, "max_bucket": 256}, r"smallest bucket side \(128\) must not"),
                             ({"reg_data": str(picture)}, "regularization folder not found"),
                             ({"reg_data": str(tmp_path / "none")}, "regularization folder not found"),
                             ({"masked_loss": True, "mask_dir": str(tmp_path / "none")}, "mask_dir: .* not a folder"),
                             ({"start_from": str(tmp_path)}, "start_from: .* is not a file")]:
        with pytest.raises(UserError, match=message):
            jobs.start(dict(settings, **changes))
    assert jobs.list_jobs() == []


def test_same_output_name_twice_is_refused(settings, tmp_path):
    slow = JobManager(lambda: StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "o"),
                      train_fn=lambda cfg, host, events, stop: time.sleep(0.5))
    try:
        slow.start(settings)
        with pytest.raises(UserError, match="already writes"):
            slow.start(settings)
    finally:
        slow.shutdown()


def test_ended_jobs_beyond_the_limit_are_forgotten_oldest_first(settings, tmp_path):
    """Every ended job stayed in memory with its events for the life of the process: a client starting and
    stopping jobs in a loop (or a long session) grew it without end (session 23's API audit). A new job now forgets
    the oldest ended ones beyond `max_ended`; running and queued jobs are never forgotten."""
    quick = JobManager(lambda: StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "o"),
                       train_fn=lambda cfg, host, events, stop: None, max_ended=3)
    try:
        ids = []
        for i in range(6):
            ids.append(quick.start({**settings, "name": f"q{i}"}))
            assert quick.wait(ids[-1], timeout=30) == "finished"
        listed = [j["id"] for j in quick.list_jobs()]
        assert listed == ids[2:], listed        # the new job (ids[5]) was queued when ids[0] and ids[1] were dropped
        with pytest.raises(UserError):
            quick.status(ids[0])
        assert quick.status(ids[-1])["state"] == "finished"
    finally:
        quick.shutdown()


def test_progress_text_and_durations():
    assert format_duration(59) == "0:59" and format_duration(3725) == "1:02:05" and format_duration(None) == "?"
    text = progress_text({"state": "running", "name": "x", "phase": "", "step": 5, "total": 20, "fraction": 0.25,
                          "epoch": 1, "ema": 0.1234, "steps_per_s": 0.5, "eta_s": 30, "elapsed_s": 10})
    assert "step 5/20 (25%)" in text and "2.0 s/step" in text and "ETA 0:30" in text


def test_an_output_on_the_base_model_is_refused_at_submission_even_when_overwriting(jobs, settings, tmp_path):
    """Like a taken name (refused before queueing: HTTP 400 in the API), not only once the job has started."""
    base = make_tiny_checkpoint(tmp_path / "models" / "base.safetensors", "sd1")
    full = {k: v for k, v in settings.items() if k != "lora"}
    for name in ("base", "BASE"):
        with pytest.raises(UserError, match="would write over the base model"):
            jobs.start(dict(full, method="finetune", model=str(base), output=str(base.parent), name=name,
                            overwrite=True))
    assert jobs.list_jobs() == []


def test_a_control_picture_the_host_skipped_leaves_a_gap_the_status_and_gallery_follow(settings, tmp_path):
    """A host that skips a control picture (A1111's Skip: None in its place) leaves no file for it, so a round of
    set A has step...-01.png but no -00.png. The status, the samples events and the Monitor's gallery name the
    files that exist, each with its own prompt, not the first ones of the round."""
    from lib_sdtrain.ui.monitor_tab import gallery_items

    class SkippingHost(StandaloneHost):
        def sample(self, parts, requests, stop=None):
            pictures = super().sample(parts, requests, stop)
            return [None if i == 0 and len(requests) == 2 else im for i, im in enumerate(pictures)]

    manager = JobManager(lambda: SkippingHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs"))
    try:
        job_id = manager.start(dict(settings, epochs=1, sample_prompts=["zwx toy", "zwx toy, red"],
                                    control_prompts=["toy"], sample_steps=2, sample_size=64))
        assert manager.wait(job_id, timeout=120) == "finished", manager.status(job_id)["error"]
        st = manager.status(job_id)
    finally:
        manager.shutdown()
    rounds_a = [s for s in st["samples"] if s["label"] == "A"]
    assert [Path(p).name for s in rounds_a for p in s["paths"]] == ["step000000-01.png", "step000006-01.png"]
    assert [s["step"] for s in rounds_a] == [0, 6] and all(s["indices"] == [1] for s in rounds_a)
    assert all(Path(p).is_file() for s in st["samples"] for p in s["paths"])
    events = [e for e in st["events"] if e["kind"] == "samples" and e["label"] == "A"]
    assert [Path(p).name for e in events for p in e["images"]] == ["step000000-01.png", "step000006-01.png"]
    st["prompts"] = {"A": ["zwx toy", "zwx toy, red"], "B": ["toy"]}    # what the Monitor adds from the config
    assert [(Path(p).name, text) for p, text in gallery_items(st, "A", 6)] == \
        [("step000006-01.png", "step 6: zwx toy, red")]


def test_validation_measurements_reach_the_status_and_the_chart(settings, tmp_path):
    """A run's validation events are kept per job and drawn in the Monitor tab's chart."""
    from lib_sdtrain.train.loop import TrainResult
    from lib_sdtrain.ui.monitor_tab import loss_chart_svg

    def fake_train(cfg, host, events, stop):
        for step in (1, 2, 3, 4):
            events.loss(step, 1.0 / step, ema=1.0 / step)
            if step % 2 == 0:
                events.validation(step, 0.5 + 0.1 * step)
        return TrainResult()

    manager = JobManager(lambda: StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "o"),
                         train_fn=fake_train)
    try:
        job_id = manager.start(settings)
        assert manager.wait(job_id, timeout=60) == "finished"
        st = manager.status(job_id)
        assert st["validation"] == [[2, 0.7], [4, 0.9]]
        svg = loss_chart_svg(st["losses"], validation=st["validation"])
        assert svg.count('class="tl-validation-point"') == 2
    finally:
        manager.shutdown()
