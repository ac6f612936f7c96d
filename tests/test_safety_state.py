"""Nothing the user owns is lost (issue #14): the atomic run state and resume, finite saves only, disk and
permission errors, stale temporary files, hostile names, caption extensions, and the SIGKILL check."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_sdtrain.cli import main as cli_main
from lib_sdtrain.errors import DiskError, UserError
from lib_sdtrain.events import Events, StopToken
from lib_sdtrain.formats.safetensors_io import read_safetensors
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train import optim
from lib_sdtrain.train import state as S
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings
from conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny.safetensors", "sd1")


@pytest.fixture
def cfg(tmp_path, model):
    data = make_dataset(tmp_path / "data", 4, 64, repeats=1, widen=True)
    # 4 pictures in 2 buckets, batch 2: 2 steps per epoch, 6 steps
    return TrainSettings.from_dict({
        "model": str(model), "data": str(data), "output": str(tmp_path / "out"), "name": "t",
        "resolution": 64, "min_bucket": 64, "max_bucket": 128, "batch_size": 2, "epochs": 3,
        "learning_rate": 1e-3, "save_every_n_epochs": 1, "tensorboard": False, "sample_every_n_epochs": 0,
        "lora": {"network_dim": 2, "network_alpha": 2, "targets": "attn", "train_text_encoder": False}})


def host(tmp_path):
    return StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")


def stop_at(step):
    stop = StopToken()
    return Events(lambda e: stop.request() if e.kind == "progress" and e.data.get("phase") != "cache"
                  and e.data.get("step") == step else None), stop


def weights(path):
    return read_safetensors(path)[0]


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rates_used(monkeypatch):
    """A list that gets the learning rate (first group) each optimizer step of the runs that follow trains at."""
    from lib_sdtrain.train import loop

    used, real = [], loop.make_optimizer

    def recording(*a, **k):
        opt = real(*a, **k)
        opt.register_step_pre_hook(lambda o, *_: used.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(loop, "make_optimizer", recording)
    return used


def loss_steps(run_dir):
    return [int(line.split(",")[0]) for line in (run_dir / "loss.csv").read_text().splitlines()[1:]]


# ---- the state ------------------------------------------------------------------------------------------------
def test_crash_between_the_state_parts_keeps_the_previous_state_and_resume_is_exact(tmp_path, cfg, monkeypatch):
    full = train(cfg.replace(name="full"), host(tmp_path))
    events, stop = stop_at(5)   # states at epochs 1, 2 (steps 2, 4); the stop at 5 writes a third ...
    calls = {"n": 0}
    real = S.atomic_write_text

    def crash_on_second_manifest(path, text, **k):   # ... whose manifest never lands (the tensors file did)
        if Path(path).name == S.MANIFEST:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("killed between the tensors file and the manifest")
        return real(path, text, **k)

    monkeypatch.setattr(S, "atomic_write_text", crash_on_second_manifest)
    with pytest.raises(KeyboardInterrupt):
        train(cfg.replace(name="part"), host(tmp_path), events, stop)
    monkeypatch.setattr(S, "atomic_write_text", real)
    run_dir = tmp_path / "outputs" / "runs" / "part"
    _, meta = S.read_manifest(run_dir)
    assert meta["step"] == 4 and len(list((run_dir / "state").glob(S.TENSORS_GLOB))) == 2   # an orphan beside
    resumed = train(cfg.replace(name="part", resume=str(run_dir)), host(tmp_path))
    assert resumed.steps == 6 and equal(weights(full.final), weights(resumed.final))
    assert loss_steps(run_dir) == list(range(1, 7))             # row 5 of the crashed run written once
    assert len(list((run_dir / "state").glob(S.TENSORS_GLOB))) == 1   # the orphan is gone


def test_a_damaged_or_missing_state_is_refused_with_a_reason(tmp_path, cfg):
    events, stop = stop_at(3)
    part = train(cfg.replace(name="p"), host(tmp_path), events, stop)
    folder, meta = S.read_manifest(part.run_dir)
    text = (folder / S.MANIFEST).read_text()
    # wrong types in the manifest are refused by name, not met later as a TypeError
    for key, value, why in (("saved", [{"path": "x"}], "'saved' or 'final'"), ("final", 5, "'saved' or 'final'"),
                            ("losses", ["a", "b", "c"], "'losses' holds"),
                            ("plan", {"batches_per_epoch": "2"}, "'plan' is not")):
        (folder / S.MANIFEST).write_text(json.dumps({**json.loads(text), key: value}))
        with pytest.raises(UserError, match=f"is damaged: {why}"):
            S.read_manifest(part.run_dir)
    (folder / S.MANIFEST).write_text(text)
    tensors = folder / meta["tensors"]["file"]
    blob = bytearray(tensors.read_bytes())
    blob[-3] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="does not match its manifest"):
        train(cfg.replace(name="p", resume=str(part.run_dir)), host(tmp_path))
    # the manifest deleted, its tensors file left: not "stopped before its first state" (the state was saved)
    (folder / S.MANIFEST).unlink()
    for where in (part.run_dir, folder):
        with pytest.raises(UserError) as e:
            train(cfg.replace(name="p", resume=str(where)), host(tmp_path))
        said = str(e.value)
        assert "stopped before its first state" not in said, said
        assert f"its manifest {S.MANIFEST} is missing" in said and f"{tensors.name} (step 3)" in said, said
        assert "start_from, e.g. " + str(tmp_path / "out" / "p-000001.safetensors") in said, said  # the last save
    tensors.unlink()   # no tensors either: nothing of a state was saved
    with pytest.raises(UserError, match="stopped before its first state"):
        train(cfg.replace(name="p", resume=str(part.run_dir)), host(tmp_path))
    (folder / "state.safetensors").write_bytes(b"old")   # the two-file state of older versions
    with pytest.raises(UserError, match="older version"):
        train(cfg.replace(name="p", resume=str(part.run_dir)), host(tmp_path))


def to_legacy(folder, json_from=None):
    """Rewrite a state as the versions before the manifest wrote it: state.safetensors, then state.json (the
    manifest's counters without format/tensors/saved/final); `json_from`: the state.json of another save."""
    manifest = json.loads((folder / S.MANIFEST).read_text())
    (folder / manifest["tensors"]["file"]).rename(folder / "state.safetensors")
    old = json_from or {k: v for k, v in manifest.items() if k not in ("format", "tensors", "saved", "final")}
    old["losses"] = [float(x) for x in old["losses"]]
    (folder / S.MANIFEST).write_text(json.dumps(old))
    return old


def test_an_older_versions_complete_state_is_converted_and_resumes_exactly(tmp_path, cfg, monkeypatch):
    full = train(cfg.replace(name="full"), host(tmp_path))
    events, stop = stop_at(3)
    part = train(cfg.replace(name="old"), host(tmp_path), events, stop)
    old = to_legacy(part.run_dir / "state")
    # several processes: rank 1 waits while rank 0 converts (here a thread)
    import threading
    import time

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    first = threading.Thread(target=lambda: (time.sleep(0.3), S.migrate_legacy_state(part.run_dir / "state", old)))
    first.start()
    _, meta = S.read_manifest(part.run_dir)
    first.join()
    assert meta["format"] == S.STATE_FORMAT and meta["step"] == 3
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    seen = []
    resumed = train(cfg.replace(name="old", resume=str(part.run_dir)), host(tmp_path),
                    Events(lambda e: seen.append(e.data.get("text", "")) if e.kind == "warning" else None))
    assert any("written by an older version" in t and "converted" in t for t in seen), seen
    assert resumed.steps == 6 and equal(weights(full.final), weights(resumed.final))
    assert not (part.run_dir / "state" / "state.safetensors").exists()
    assert json.loads((part.run_dir / "state" / S.MANIFEST).read_text())["format"] == S.STATE_FORMAT


def test_an_older_versions_half_written_state_is_still_refused_with_the_reason(tmp_path, cfg, monkeypatch):
    events, stop = stop_at(2)
    part = train(cfg.replace(name="h"), host(tmp_path), events, stop)
    folder = part.run_dir / "state"
    step2 = {k: v for k, v in json.loads((folder / S.MANIFEST).read_text()).items()
             if k not in ("format", "tensors", "saved", "final")}
    events, stop = stop_at(3)
    train(cfg.replace(name="h", resume=str(part.run_dir)), host(tmp_path), events, stop)
    to_legacy(folder, json_from=dict(step2))   # step-3 weights beside step-2 counters: a kill between the files
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(UserError, match="older version.*optimizer step 3 but state.json says step 2"):
        train(cfg.replace(name="h", resume=str(part.run_dir)), host(tmp_path))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files     # refused: nothing touched
    # several processes: only rank 0 converts; another waits for it (here in vain: nothing converts)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(S, "MIGRATION_WAIT_S", 0.3)
    with pytest.raises(UserError, match="first process did not convert it"):
        S.read_manifest(part.run_dir)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    no_counts = dict(step2, optimizer={**step2["optimizer"], "state": {}})
    (folder / S.MANIFEST).write_text(json.dumps(no_counts))
    with pytest.raises(UserError, match="keeps no step count"):
        S.read_manifest(part.run_dir)


def test_a_finished_run_resumes_as_finished_and_continues_to_more_steps(tmp_path, cfg):
    done = train(cfg.replace(name="f"), host(tmp_path))
    before = done.final.stat().st_mtime_ns, (done.run_dir / "loss.csv").read_text()
    again = train(cfg.replace(name="f", resume=str(done.run_dir)), host(tmp_path))
    assert again.final == done.final and again.steps == 6
    assert (done.final.stat().st_mtime_ns, (done.run_dir / "loss.csv").read_text()) == before
    longer = train(cfg.replace(name="f", resume=str(done.run_dir), max_steps=8), host(tmp_path))
    straight = train(cfg.replace(name="s", max_steps=8), host(tmp_path))
    assert longer.steps == 8 and loss_steps(done.run_dir) == list(range(1, 9))
    assert equal(weights(longer.final), weights(straight.final))   # constant schedule: the same 8 steps


def test_continuing_a_finished_run_keeps_its_final_weights_as_a_save(tmp_path, cfg):
    """The final file is replaced at the continued run's end; the finished run's weights are not lost with it (they
    were in no other file: an epoch save never falls on the last step). They stay as that epoch's save."""
    done = train(cfg.replace(name="f"), host(tmp_path))
    finished = weights(done.final)
    more = train(cfg.replace(name="f", resume=str(done.run_dir), epochs=4), host(tmp_path))
    out = tmp_path / "out"
    assert more.steps == 8 and sorted(p.name for p in out.glob("f*")) == [
        "f-000001.safetensors", "f-000002.safetensors", "f-000003.safetensors", "f.safetensors"]
    assert equal(weights(out / "f-000003.safetensors"), finished)
    assert not equal(weights(more.final), finished)
    _, meta = S.read_manifest(done.run_dir)   # each save listed once, the final last
    assert [Path(p).name for p in meta["saved"]] == [
        "f-000001.safetensors", "f-000002.safetensors", "f-000003.safetensors", "f.safetensors"]
    four = weights(more.final)
    again = train(cfg.replace(name="f", resume=str(done.run_dir), max_steps=9), host(tmp_path))   # ends mid-epoch
    assert again.steps == 9 and equal(weights(out / "f-000004.safetensors"), four)
    nine = weights(again.final)
    train(cfg.replace(name="f", resume=str(done.run_dir), max_steps=10), host(tmp_path))
    assert equal(weights(out / "f-step00000009.safetensors"), nine)   # kept under the step save's name


def test_a_run_continued_to_another_total_says_what_the_learning_rate_does_and_trains_at_it(tmp_path, cfg,
                                                                                           monkeypatch):
    """A decaying schedule is stretched over a raised total (kohya's resume does the same): the rate of a finished
    cosine run rose from near 0 again without a word, and its first continued step still trained at the old plan's
    rate (the finished run's 0) before the stretched one took over."""
    from lib_sdtrain.train.schedules import multiplier, resumed_schedule_note

    used = rates_used(monkeypatch)
    base, log = cfg.replace(lr_scheduler="cosine"), []
    done = train(base.replace(name="c"), host(tmp_path))
    assert used == pytest.approx([1e-3 * multiplier("cosine", 6)(k) for k in range(6)])
    used.clear()
    train(base.replace(name="c", resume=str(done.run_dir), epochs=6), host(tmp_path), Events(log.append))
    assert used == pytest.approx([1e-3 * multiplier("cosine", 12)(k) for k in range(6, 12)]) and used[0] == 5e-4
    warned = [e.data["text"] for e in log if e.kind == "warning" and "learning-rate schedule" in e.data["text"]]
    assert len(warned) == 1 and ("its cosine learning-rate schedule, planned for 6 steps, is stretched over the new "
                                 "12, so the rate goes from 6.70e-05 (step 6, its last) back up to 5.00e-04 at step 7,"
                                 " and ends at 1.70e-05 at step 12") in warned[0] and "start_from" in warned[0], warned
    # a stopped run resumed with a raised total: the same, said against the rate it had planned
    events, stop = stop_at(3)
    part = train(base.replace(name="d"), host(tmp_path), events, stop)
    used.clear()
    log.clear()
    train(base.replace(name="d", resume=str(part.run_dir), max_steps=12), host(tmp_path), Events(log.append))
    assert used == pytest.approx([1e-3 * multiplier("cosine", 12)(k) for k in range(3, 12)])
    warned = [e.data["text"] for e in log if e.kind == "warning" and "learning-rate schedule" in e.data["text"]]
    assert len(warned) == 1 and ("planned for 6 steps and now has 12: its cosine learning-rate schedule is stretched "
                                 "over the new total, so the rate goes from 7.50e-04 at step 3 back up to 8.54e-04 at "
                                 "step 4 (planned: 5.00e-04)") in warned[0], warned
    # nothing to say: a rate that does not depend on the total, the same total, nothing trained yet
    assert resumed_schedule_note("constant", 1e-3, 6, 6, 12, warmup=4) is None
    assert resumed_schedule_note("cosine", 1e-3, 3, 6, 6) is None
    assert resumed_schedule_note("linear", 1e-3, 0, 6, 12) is None
    assert "squeezed into the new total" in resumed_schedule_note("linear", 1e-3, 3, 12, 6)


def test_a_learning_rate_set_anew_for_a_resume_is_used_and_said(tmp_path, cfg, monkeypatch):
    """The optimizer's and the schedule's saved state carried the old base rate: a run resumed with another
    learning_rate (to calm a run that went badly, say) went on at the old one without a word."""
    used = rates_used(monkeypatch)
    events, stop = stop_at(3)
    part = train(cfg.replace(name="r", unet_lr=2e-3), host(tmp_path), events, stop)
    assert used == [2e-3] * 3
    used.clear()
    log = []
    done = train(cfg.replace(name="r", unet_lr=5e-4, resume=str(part.run_dir)), host(tmp_path), Events(log.append))
    assert done.steps == 6 and used == [5e-4] * 3
    warned = [e.data["text"] for e in log if e.kind == "warning"]
    assert warned == [("the learning rate changed: the state was trained at 2.00e-03, and the run goes on at this "
                       "run's 5.00e-04 (under its constant schedule)")], warned


def test_each_steps_logged_rate_is_the_rate_it_trained_at(tmp_path, cfg, monkeypatch):
    """The loss events, loss.csv and TensorBoard gave each step the rate of the step after it (read after the
    schedule had moved on): a finished cosine run's last row said 0, and warmup's first row the second step's."""
    import csv

    used = rates_used(monkeypatch)
    log = []
    done = train(cfg.replace(name="lr", lr_scheduler="cosine", lr_warmup_steps=2), host(tmp_path), Events(log.append))
    logged = [e.data["lr"] for e in log if e.kind == "loss"]
    assert len(used) == done.steps == len(logged) == 6 and logged == pytest.approx(used, rel=1e-6)
    assert logged[-1] > 0   # the last step of a cosine run trains at a rate above 0; its row said 0
    with open(done.run_dir / "loss.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(used, rel=1e-5)


def test_a_resume_that_changes_how_steps_train_names_the_changes(tmp_path, cfg):
    """A schedule, weight decay or loss option set anew for a resume applied from the resumed step on without a
    word (seen in A1111: a constant-rate run resumed with lr_scheduler cosine was called 'its cosine schedule');
    what may change at a resume (the length, the saves, the rate, which the loop names itself) is not listed."""
    from lib_sdtrain.train import state as S

    events, stop = stop_at(3)
    part = train(cfg.replace(name="c"), host(tmp_path), events, stop)
    log = []
    more = train(cfg.replace(name="c", resume=str(part.run_dir), lr_scheduler="cosine", weight_decay=0.05,
                             max_steps=8, save_every_n_steps=2), host(tmp_path), Events(log.append))
    assert more.steps == 8
    warned = [e.data["text"] for e in log if e.kind == "warning" and "this resume changes settings" in e.data["text"]]
    assert len(warned) == 1, [e.data for e in log if e.kind == "warning"]
    assert "lr_scheduler 'constant' → 'cosine'" in warned[0] and "weight_decay" in warned[0]
    assert "apply from step 4 on; the 3 steps before" in warned[0]
    assert "max_steps" not in warned[0] and "save_every_n_steps" not in warned[0]
    # the comparison itself: nested tables by dotted name, equal lists and tuples alike, unknown names skipped
    was = {"lr_scheduler": "constant", "lora": {"network_dim": 4, "network_dropout": 0.0}, "epochs": 2,
           "caption_prefix": "", "old_setting": 1, "sample_prompts": ["a"], "keep_tokens_separator": ["x"]}
    now = {"lr_scheduler": "constant", "lora": {"network_dim": 4, "network_dropout": 0.1}, "epochs": 5,
           "caption_prefix": "zwx, ", "sample_prompts": ["b"], "keep_tokens_separator": ("x",)}
    assert S.changed_settings(was, now) == [("caption_prefix", "", "zwx, "), ("lora.network_dropout", 0.0, 0.1)]
    assert S.changed_settings(was, was) == []


def test_a_resume_with_other_batches_per_epoch_or_step_says_where_it_goes_on_and_ends_with_the_epochs(
        tmp_path, cfg):
    """The state's position is a count of batches: resumed with another accumulation (or batch size, or pictures)
    it lies elsewhere in the new epochs. The run said nothing, and set by epochs it ended after the old step count:
    here at step 3 of 1.5 epochs instead of 3 epochs."""
    events, stop = stop_at(3)      # 2 batches per epoch, 1 per step: step 3 is half-way through epoch 2
    part = train(cfg.replace(name="g"), host(tmp_path), events, stop)
    log = []
    more = train(cfg.replace(name="g", resume=str(part.run_dir), grad_accum=2), host(tmp_path), Events(log.append))
    warned = [e.data["text"] for e in log if e.kind == "warning" and "batches per step" in e.data["text"]]
    assert len(warned) == 1 and "goes on at batch 2 of 2 of epoch 2, 5 steps in all (was 6)" in warned[0], warned
    assert (more.steps, more.epochs_done, more.stopped) == (5, 3, "")   # steps 4 (end of epoch 2) and 5 (epoch 3)
    log.clear()
    events, stop = stop_at(2)
    part = train(cfg.replace(name="h"), host(tmp_path), events, stop)
    same = train(cfg.replace(name="h", resume=str(part.run_dir)), host(tmp_path), Events(log.append))
    assert same.steps == 6 and not [e for e in log if e.kind == "warning"]   # nothing changed: nothing said


def test_resume_alone_restores_the_settings_and_keep_last_counts_earlier_saves(tmp_path, cfg, monkeypatch):
    monkeypatch.setenv("TRAINING_LAB_OUTPUT", str(tmp_path / "outputs"))
    base = cfg.replace(save_every_n_epochs=0, save_every_n_steps=1, keep_last=1)
    full = train(base.replace(name="full"), host(tmp_path))
    events, stop = stop_at(3)
    part = train(base.replace(name="k"), host(tmp_path), events, stop)
    assert sorted(p.name for p in (tmp_path / "out").glob("k-*")) == ["k-step00000003.safetensors"]
    assert cli_main(["train", "--resume", str(part.run_dir), "--device", "cpu", "--dtype", "fp32"]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("k*")) == ["k-step00000005.safetensors", "k.safetensors"]
    assert equal(weights(full.final), weights(out / "k.safetensors"))
    # a flag still overrides what the state says
    assert cli_main(["train", "--resume", str(part.run_dir), "--max-steps", "7", "--device", "cpu"]) == 0
    assert loss_steps(part.run_dir) == list(range(1, 8))


def test_resume_never_prunes_a_file_its_manifest_lists_but_did_not_write(tmp_path, cfg):
    """keep_last deletes old saves by the paths the state lists: an edited or borrowed manifest must not make it
    delete anything but this run's own epoch and step files."""
    base = cfg.replace(save_every_n_epochs=0, save_every_n_steps=1, keep_last=1)
    events, stop = stop_at(3)
    part = train(base.replace(name="k"), host(tmp_path), events, stop)
    out = tmp_path / "out"
    mine = [tmp_path / "precious.txt", out / "k-notes.safetensors", out / "other-step00000001.safetensors"]
    for p in mine:
        p.write_text("the user's")
    manifest = part.run_dir / "state" / "state.json"
    meta = json.loads(manifest.read_text())
    meta["saved"] = [str(p) for p in mine] + meta["saved"]
    manifest.write_text(json.dumps(meta))
    train(base.replace(name="k", resume=str(part.run_dir)), host(tmp_path))
    assert [p.read_text() for p in mine] == ["the user's"] * 3
    assert sorted(p.name for p in out.glob("k-step*")) == ["k-step00000005.safetensors"]   # its own still pruned


def test_keep_last_never_deletes_a_save_made_read_only_and_does_not_count_it(tmp_path, cfg):
    """A save the user made read-only (chmod -w) is their word that it must stay: pruning deleted it all the same
    (an unlink needs only the folder writable, and root ignores the bits). It is kept, said once, and the last K
    writable saves are kept besides it."""
    log = []

    def lock_first(e):
        log.append(e)
        if e.kind == "saved" and Path(e.data["path"]).name == "k-step00000001.safetensors":
            Path(e.data["path"]).chmod(0o444)

    run = cfg.replace(name="k", save_every_n_epochs=0, save_every_n_steps=1, keep_last=2)
    done = train(run, host(tmp_path), Events(lock_first))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("k*")) == [
        "k-step00000001.safetensors", "k-step00000004.safetensors", "k-step00000005.safetensors", "k.safetensors"]
    said = [e.data["text"] for e in log if e.kind == "status" and "read-only" in e.data["text"]]
    assert said == [("keep_last: k-step00000001.safetensors is read-only, so it is kept and not counted among the "
                     "last 2 saves")], said
    _, meta = S.read_manifest(done.run_dir)   # still one of the run's saves
    assert Path(meta["saved"][0]).name == "k-step00000001.safetensors"
    (out / "k-step00000001.safetensors").chmod(0o644)


def test_a_run_resumed_under_another_name_or_folder_never_replaces_the_files_there(tmp_path, cfg):
    """A resumed run skips the taken-name check (its own saves are replaced); resumed with another name or output
    folder (flags override the state's settings), the user's file of that name was replaced by its final save."""
    from lib_sdtrain.train.preflight import preflight

    events, stop = stop_at(1)
    part = train(cfg.replace(name="r"), host(tmp_path), events, stop)
    other = tmp_path / "elsewhere"
    mine = [tmp_path / "out" / "mine.safetensors", other / "r.safetensors"]
    for p in mine:
        p.parent.mkdir(exist_ok=True)
        p.write_text("the user's")
    for changed in ({"name": "mine"}, {"output": str(other)}):
        resumed = cfg.replace(**{"name": "r", "resume": str(part.run_dir), **changed})
        for start in (lambda r=resumed: preflight(r, host(tmp_path)), lambda r=resumed: train(r, host(tmp_path))):
            with pytest.raises(UserError, match=r"is taken \(.*\), and the run being resumed .* did not write it"):
                start()
    assert [p.read_text() for p in mine] == ["the user's"] * 2
    done = train(cfg.replace(name="r", resume=str(part.run_dir)), host(tmp_path))   # its own name: goes on
    assert done.steps == 6 and done.final == tmp_path / "out" / "r.safetensors"


def test_a_resume_alone_does_not_take_overwrite_from_the_state(tmp_path, cfg, monkeypatch, capsys):
    """`--resume DIR` alone takes the run's settings from its state, overwrite included: a run started with
    overwrite on and resumed under another name replaced the user's file of that name (session 23's audit).
    Overwrite is a choice of each start: given again, it still applies."""
    monkeypatch.setenv("TRAINING_LAB_OUTPUT", str(tmp_path / "outputs"))
    events, stop = stop_at(1)
    part = train(cfg.replace(name="o", overwrite=True), host(tmp_path), events, stop)
    mine = tmp_path / "out" / "mine.safetensors"
    mine.parent.mkdir(exist_ok=True)
    mine.write_text("the user's")
    args = ["train", "--resume", str(part.run_dir), "--name", "mine", "--device", "cpu", "--dtype", "fp32"]
    assert cli_main(args) != 0
    assert "is taken" in capsys.readouterr().err and mine.read_text() == "the user's"
    assert cli_main(args + ["--overwrite"]) == 0 and mine.read_bytes() != b"the user's"


def test_a_folder_named_as_the_output_is_refused_before_training_even_with_overwrite(tmp_path, cfg):
    """With overwrite on, a folder at NAME.safetensors was found only by the final save, after the whole run."""
    folder = tmp_path / "out" / "t.safetensors"
    (folder / "inside").mkdir(parents=True)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"taken by a folder \(.*t\.safetensors\); choose another name"):
            train(cfg.replace(overwrite=overwrite), host(tmp_path))
    assert (folder / "inside").is_dir() and not (tmp_path / "outputs" / "runs" / "t").exists()


def test_atomic_write_never_replaces_a_read_only_file(tmp_path):
    """A rename needs only the folder writable (and root writes any file): a file the user made read-only was
    replaced by every overwrite. The mode bits decide, so this holds for root too (the tests run as root)."""
    from lib_sdtrain.formats.files import atomic_write, atomic_write_text

    mine = tmp_path / "mine.safetensors"
    mine.write_text("the user's")
    mine.chmod(0o444)
    with pytest.raises(DiskError, match=r"^cannot write .*mine\.safetensors: it is read-only, so it is not replaced"):
        atomic_write_text(mine, "new")
    assert mine.read_text() == "the user's" and sorted(tmp_path.iterdir()) == [mine]     # no temporary file left
    mine.chmod(0o644)
    atomic_write_text(mine, "new")                                                      # writable again: replaced
    assert mine.read_text() == "new"

    def lock_meanwhile(p):   # made read-only while the new file was being written
        p.write_text("newer")
        mine.chmod(0o444)

    with pytest.raises(DiskError, match="it is read-only"):
        atomic_write(mine, lock_meanwhile)
    assert mine.read_text() == "new" and sorted(tmp_path.iterdir()) == [mine]


def test_overwrite_never_replaces_a_read_only_output(tmp_path, cfg):
    """With overwrite on, a read-only final file is refused before any work; a read-only epoch save stops the run
    at that save, the file unchanged."""
    final = tmp_path / "out" / "t.safetensors"
    final.parent.mkdir()
    final.write_text("the user's")
    final.chmod(0o444)
    with pytest.raises(UserError, match=r"t\.safetensors is read-only, so overwriting does not replace it"):
        train(cfg.replace(overwrite=True), host(tmp_path))
    assert final.read_text() == "the user's" and not (tmp_path / "outputs" / "runs" / "t").exists()
    final.chmod(0o644)
    final.unlink()
    epoch = tmp_path / "out" / "t-000002.safetensors"
    epoch.write_text("the user's")
    epoch.chmod(0o444)
    with pytest.raises(DiskError, match=r"t-000002\.safetensors: it is read-only.*the last state is kept"):
        train(cfg.replace(overwrite=True), host(tmp_path))
    assert epoch.read_text() == "the user's" and not final.exists()


def test_a_fresh_run_over_an_old_one_never_resumes_its_state(tmp_path, cfg):
    old = train(cfg.replace(name="o", epochs=1), host(tmp_path))
    assert S.has_state(old.run_dir)
    events, stop = stop_at(1)

    def boom(*a, **k):
        raise KeyboardInterrupt

    ev = Events(lambda e: boom() if e.kind == "progress" and e.data.get("step") == 2 else None)
    with pytest.raises(KeyboardInterrupt):
        train(cfg.replace(name="o", overwrite=True), host(tmp_path), ev)
    assert not S.has_state(old.run_dir)   # the old run's state went with the overwrite
    with pytest.raises(UserError, match="stopped before its first state"):
        train(cfg.replace(name="o", resume=str(old.run_dir)), host(tmp_path))
    with pytest.raises(UserError, match="no state to resume"):
        train(cfg.replace(name="o"), host(tmp_path))


def test_resume_refuses_another_base_model_and_says_what_to_do(tmp_path, cfg, model):
    """The settings say `model = ""` in the WebUI (the loaded model), so the state itself records the base."""
    events, stop = stop_at(2)
    part = train(cfg.replace(name="b"), host(tmp_path), events, stop)
    assert part.stopped == "stopped"
    _, manifest = S.read_manifest(part.run_dir)
    assert manifest["base"] == {"name": "tiny", "path": str(model),
                                "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    other = make_tiny_checkpoint(tmp_path / "other.safetensors", "sd1", seed=1)   # same shapes, other weights
    with pytest.raises(UserError) as refused:
        train(cfg.replace(name="b", resume=str(part.run_dir), model=str(other)), host(tmp_path))
    text = str(refused.value)
    assert "trained from the base model 'tiny'" in text and "'other'" in text and str(other) in text
    assert "Load the run's base model" in text and "start a new run" in text
    assert loss_steps(part.run_dir) == [1, 2]          # nothing was trained on the other model
    # a copy of the base under another name is the same model (the hash decides): it resumes
    copy = tmp_path / "moved" / "renamed.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(model.read_bytes())
    done = train(cfg.replace(name="b", resume=str(part.run_dir), model=str(copy)), host(tmp_path))
    assert done.stopped == "" and done.steps == 6


def test_a_state_without_a_recorded_base_still_resumes_with_a_note(tmp_path, cfg):
    events, stop = stop_at(2)
    part = train(cfg.replace(name="n"), host(tmp_path), events, stop)
    manifest = part.run_dir / "state" / "state.json"
    meta = json.loads(manifest.read_text())
    del meta["base"]                                   # as states were written before the base was recorded
    manifest.write_text(json.dumps(meta))
    notes = []
    done = train(cfg.replace(name="n", resume=str(part.run_dir)), host(tmp_path),
                 Events(lambda e: notes.append(e.data["text"]) if e.kind == "warning" else None))
    assert done.stopped == "" and done.steps == 6
    assert any("did not record its base model" in n and "'tiny'" in n for n in notes), notes
    meta = json.loads(manifest.read_text())
    assert meta["base"]["name"] == "tiny"              # the resumed run's own states record it again
    meta["base"] = ["not", "an", "identity"]
    manifest.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="'base' is not"):
        S.read_manifest(part.run_dir)


def test_a_taken_name_says_how_to_resume_in_every_front_ends_words(tmp_path, cfg):
    events, stop = stop_at(1)
    part = train(cfg.replace(name="w"), host(tmp_path), events, stop)
    with pytest.raises(UserError) as taken:
        train(cfg.replace(name="w"), host(tmp_path))
    assert "output name 'w' is taken" in str(taken.value)
    assert f"or resume the run {part.run_dir} (--resume on the command line, the resume setting in the Train " \
           'tab, "resume" in the API)' in str(taken.value)


def test_a_run_ending_inside_its_first_epoch_labels_the_final_file_as_kohya_does(tmp_path, cfg):
    """max_steps 1 of 2 steps per epoch: ss_epoch is the planned epoch count, ceil(1 / 2) = 1 (sd-scripts' last
    save), the epochs started; how far the run got is ss_steps. A convention, kept on purpose."""
    from lib_sdtrain.formats.safetensors_io import read_metadata

    result = train(cfg.replace(name="short", max_steps=1, save_every_n_epochs=0), host(tmp_path))
    meta = read_metadata(result.final)
    assert (meta["ss_epoch"], meta["ss_num_epochs"], meta["ss_steps"]) == ("1", "1", "1")
    assert meta["ss_num_batches_per_epoch"] == "2" and result.epochs_done == 0


# ---- finite saves only -----------------------------------------------------------------------------------------
def test_lr_1e3_exits_non_zero_and_keeps_only_finite_files(tmp_path, cfg, monkeypatch, one_thread):
    # one thread: the step at which lr 1e3 turns the weights NaN depends on the summation order (with two
    # threads it is step 3, and the kept save is the epoch-1 file); alone this test ran with torch's default
    # threads, in the suite after a module that had set one
    monkeypatch.setenv("TRAINING_LAB_OUTPUT", str(tmp_path / "outputs"))
    # at lr 1e3 the weights are NaN after step 2 while both losses are still finite (the case). The
    # settings refuse such a rate; the guard is for runs that diverge at an allowed one, which take longer to
    monkeypatch.setitem(optim.RATE_LIMITS, "adamw", 1e3)
    run = cfg.replace(name="nan", learning_rate=1e3, save_every_n_steps=1, keep_last=1, epochs=10,
                      max_steps=10, max_grad_norm=0.0)
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(run.to_dict()))
    code = cli_main(["train", "--config", str(path), "--device", "cpu", "--dtype", "fp32"])
    files = sorted((tmp_path / "out").glob("nan*.safetensors"))
    # one save kept (keep_last 1), the last finite one: the step-1 file where the weights go NaN at step 2 (CI's
    # 2-core machine), the epoch-1 file (step 2) where another CPU's kernels sum in another order and it is step 3
    assert code == 3 and len(files) == 1, [p.name for p in files]
    assert files[0].name in ("nan-step00000001.safetensors", "nan-000001.safetensors", "nan-step00000002.safetensors")
    assert all(not S.nonfinite(weights(p)) for p in files)
    # --no-stop-on-divergence trains on, but still writes no non-finite final file
    code = cli_main(["train", "--config", str(path), "--name", "nan2", "--no-stop-on-divergence",
                     "--device", "cpu", "--dtype", "fp32"])
    assert code == 3 and not (tmp_path / "out" / "nan2.safetensors").exists()
    assert all(not S.nonfinite(weights(p)) for p in (tmp_path / "out").glob("nan2*.safetensors"))


def test_weights_gone_nan_with_a_finite_loss_are_never_saved(tmp_path, cfg, monkeypatch):
    """The case a loss check misses: the step's loss was finite, the update made the weights NaN."""
    import lib_sdtrain.train.loop as L

    real = L.make_optimizer

    def poisoning(*a, **k):
        opt = real(*a, **k)
        count = {"n": 0}

        def poison(optimizer, args, kwargs):
            count["n"] += 1
            if count["n"] == 3:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(float("nan"))

        opt.register_step_post_hook(poison)
        return opt

    monkeypatch.setattr(L, "make_optimizer", poisoning)
    result = train(cfg.replace(name="p", save_every_n_steps=1, keep_last=1), host(tmp_path))
    assert result.stopped == "diverged" and result.final is None
    names = sorted(p.name for p in (tmp_path / "out").glob("p*"))
    assert names == ["p-000001.safetensors"] and not S.nonfinite(weights(tmp_path / "out" / names[0]))
    _, meta = S.read_manifest(result.run_dir)
    assert meta["step"] == 2   # the state, too, is the last finite one


def test_a_control_picture_cut_short_by_a_full_disk_leaves_no_partial_file(tmp_path, cfg, monkeypatch):
    """Control pictures were the one output saved in place: a full disk left a truncated PNG in samples/."""
    from PIL import Image

    real = Image.Image.save

    def half_then_full(self, fp, *a, **k):
        real(self, fp, *a, **k)
        with open(fp, "r+b") as fh:
            fh.truncate(20)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_then_full)
    with pytest.raises(DiskError, match="the disk is full"):
        train(cfg.replace(name="c", sample_prompts=["a shape"], sample_every_n_epochs=1), host(tmp_path))
    samples = tmp_path / "outputs" / "runs" / "c" / "samples"
    assert samples.is_dir() and not [p for p in samples.rglob("*") if p.is_file()]


# ---- disk and permission errors --------------------------------------------------------------------------------
def test_disk_full_at_the_final_save_is_one_line_and_keeps_the_state(tmp_path, cfg, monkeypatch, capsys):
    full = train(cfg.replace(name="full"), host(tmp_path))
    import lib_sdtrain.formats.files as F

    real_fsync = F.os.fsync
    full_disk = {"on": True}

    class FakeOs:   # only formats/files.py sees a full disk, and only for the final file
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fsync(fd):
            name = os.readlink(f"/proc/self/fd/{fd}")
            if full_disk["on"] and "/.d.safetensors." in name:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(fd)

    monkeypatch.setattr(F, "os", FakeOs())
    monkeypatch.setenv("TRAINING_LAB_OUTPUT", str(tmp_path / "outputs"))
    path = tmp_path / "d.json"
    path.write_text(json.dumps(cfg.replace(name="d").to_dict()))
    assert cli_main(["train", "--config", str(path), "--device", "cpu", "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot write") and "the disk is full (errno 28)" in err and "resume" in err
    assert "Traceback" not in err
    out = tmp_path / "out"
    assert not (out / "d.safetensors").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    full_disk["on"] = False
    assert cli_main(["train", "--resume", str(tmp_path / "outputs" / "runs" / "d"), "--device", "cpu"]) == 0
    assert equal(weights(full.final), weights(out / "d.safetensors"))


def test_unwritable_output_is_one_clear_line(tmp_path, cfg, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("TRAINING_LAB_OUTPUT", str(tmp_path / "outputs"))
    path = tmp_path / "u.json"
    path.write_text(json.dumps(cfg.replace(name="u", output=str(blocker / "sub"), epochs=1).to_dict()))
    assert cli_main(["train", "--config", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in err
    import lib_sdtrain.formats.files as F

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(F.tempfile, "mkstemp", denied)
    with pytest.raises(DiskError, match="permission denied"):
        train(cfg.replace(name="v", epochs=1), host(tmp_path))


# ---- stale temporary files ----------------------------------------------------------------------------------------
def test_stale_temp_files_of_this_run_are_removed_at_the_next_start(tmp_path, cfg):
    events, stop = stop_at(3)
    part = train(cfg.replace(name="s"), host(tmp_path), events, stop)
    out = tmp_path / "out"
    ours = [out / ".s.safetensors.ab12cd34.tmp", out / ".s-step00000002.safetensors.zz99yy88.tmp",
            part.run_dir / ".loss.csv.q1w2e3r4.tmp", part.run_dir / "state" / ".state.json.a1b2c3d4.tmp",
            part.run_dir / "state" / "tensors-00000002-deadbeef.safetensors"]
    theirs = [out / ".other.safetensors.ab12cd34.tmp", out / ".s2.safetensors.ab12cd34.tmp", out / "notes.tmp"]
    for p in ours + theirs:
        p.write_bytes(b"partial")
    train(cfg.replace(name="s", resume=str(part.run_dir)), host(tmp_path))
    assert not [p for p in ours if p.exists()] and all(p.exists() for p in theirs)


# ---- names and caption extensions ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,reason", [
    ("a\nb", "control character"), ("a\x00b", "NUL"), ("x" * 151, "151 bytes"), ("é" * 76, "152 bytes"),
    ("../up", "'/'"), ("a\\b", "path separators"), (".hidden", "dot"), ("con", "reserved"), ("ends.", "ends with a dot"),
    ("", "empty"), ("tab\there", "control character"),
    ("x\u202egnp.exe", "text-direction control"), ("a\u2067b", "text-direction control"),   # shown as "xexe.png"
])
def test_hostile_names_are_refused_with_the_reason(cfg, name, reason):
    with pytest.raises(UserError, match=reason):
        cfg.replace(name=name)


def test_names_keep_the_zero_width_joiners_of_emoji_and_scripts(cfg):
    # only the text-direction controls are refused (session 23's API audit); the joiners are parts of real names
    for name in ("family\u200d\U0001f468\u200d\U0001f469", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"):
        assert cfg.replace(name=name).name == name


def test_a_typed_model_extension_is_dropped_from_the_output_name(cfg):
    assert cfg.replace(name="style.safetensors").name == "style"
    assert cfg.replace(name="v1.2.CKPT").name == "v1.2"
    assert cfg.replace(name="my.model").name == "my.model"            # not a model file extension: kept
    with pytest.raises(UserError, match="empty|dot"):                 # nothing left but the extension
        cfg.replace(name=".safetensors")


def test_hostile_name_on_the_command_line_is_one_line(tmp_path, capsys):
    assert cli_main(["train", "--name", "bad\x00name", "--save-config", str(tmp_path / "c.toml")]) == 2
    assert "NUL" in capsys.readouterr().err and not (tmp_path / "c.toml").exists()
    assert cli_main(["train", "--name", "x" * 300, "--save-config", str(tmp_path / "c.toml")]) == 2


def test_save_config_never_replaces_a_file_but_the_config_it_was_given(tmp_path, capsys):
    """--save-config replaced any file at its path (the Train tab asks for 'replace'): the user's notes.toml
    became a settings file."""
    mine = tmp_path / "notes.toml"
    mine.write_text("the user's")
    assert cli_main(["train", "--name", "n", "--save-config", str(mine)]) == 2
    assert f"{mine} already exists" in capsys.readouterr().err and mine.read_text() == "the user's"
    run = tmp_path / "run.toml"
    assert cli_main(["train", "--name", "n", "--save-config", str(run)]) == 0
    assert cli_main(["train", "--config", str(run), "--name", "m", "--save-config", str(run)]) == 0   # updated
    assert 'name = "m"' in run.read_text()


@pytest.mark.parametrize("ext", [".png", "PNG", "jpg", ".webp", ".safetensors", ".ckpt", ".pt"])
def test_a_picture_or_model_caption_extension_is_refused_everywhere(tmp_path, cfg, ext):
    from lib_sdtrain.data.scan import scan_dataset
    from lib_sdtrain.ui import dataset_tab as D

    with pytest.raises(UserError, match="picture or model file type"):
        cfg.replace(caption_ext=ext)
    with pytest.raises(UserError, match="picture or model file type"):
        scan_dataset(cfg.data, caption_ext=ext)
    picture = Path(cfg.data) / "1_zwx toy" / "0.png"
    before = picture.read_bytes()
    with pytest.raises(UserError, match="picture or model file type"):
        D.save_caption(cfg.data, "", "1_zwx toy/0.png", "my caption", ext)
    assert picture.read_bytes() == before


def test_a_huge_caption_is_cut_with_a_warning_naming_the_file(tmp_path, cfg):
    import time

    from lib_sdtrain.data.caption_limit import MAX_CAPTION_TOKENS
    from lib_sdtrain.data.captions import count_tokens, default_tokenizer
    from lib_sdtrain.data.scan import scan_dataset
    from lib_sdtrain.ui import dataset_tab as D

    folder = Path(cfg.data) / "1_zwx toy"
    (folder / "0.txt").write_bytes(b"zwx toy, red square " * 520_000)          # 10 MB
    (folder / "1.txt").write_text(", ".join(f"tag{i}" for i in range(10_000)))  # 10,000 tags
    t0 = time.time()
    report = scan_dataset(cfg.data)
    assert time.time() - t0 < 20
    by_name = {r.path.name: r for r in report.records}
    tok = default_tokenizer()
    for name, txt in (("0.png", "0.txt"), ("1.png", "1.txt")):
        msgs = [p.message for p in by_name[name].problems if p.code in ("long_caption", "huge_caption")]
        assert msgs and txt in msgs[0]
        assert 0 < count_tokens(by_name[name].caption, tok) <= MAX_CAPTION_TOKENS
    assert by_name["1.png"].caption.startswith("tag0, tag1, ") and by_name["1.png"].caption.endswith(("tag", "1",
           "2", "3", "4", "5", "6", "7", "8", "9", "0"))
    with pytest.raises(UserError, match="would lose the rest"):   # the editor only shows the cut caption
        D.save_caption(cfg.data, "", "1_zwx toy/0.png", "short", ".txt")
    result = train(cfg.replace(name="h", max_steps=2), host(tmp_path))
    assert result.steps == 2


# ---- the SIGKILL check ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "fork"), reason="tools/safety_kill.py forks its killed runs (POSIX)")
def test_sigkill_at_random_points_never_corrupts_or_silently_changes_a_run(tmp_path):
    """tools/safety_kill.py with 5 kills (seed 14, a 6-step run): one between the state's two parts, two elsewhere inside saves,
    one between steps, one after a random delay (the 40-kill run is in bench/results/safety_kill.json)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "safety_kill.py"), "--kills", "5", "--seed", "14", "--epochs", "1",
                          "--workdir", str(tmp_path / "k"), "--json", str(tmp_path / "k.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    s = json.loads((tmp_path / "k.json").read_text())["summary"]
    assert s["kills"] == 5 and s["killed"] >= 4 and s["inside_saves"] >= 3 and s["between_state_parts"] >= 1
    assert s["corrupt_files"] == 0 and s["silently_wrong"] == 0 and s["temp_files_after_next_run"] == 0
    assert s["resume_refused_with_state"] == 0 and s["resumed_bit_exact"] == s["with_state"]
    assert s["fresh_bit_exact"] == s["no_state"] == s["no_state_resume_refused"]
    assert s["loss_csv_ok"] == 5
