"""The validation loss: which pictures are held out (per folder, from the seed, never class pictures, never a
whole folder), that it is measured at the planned steps with fixed noise (the same weights give the same value),
that held-out pictures are not trained on, and the over-training warning on a rise."""

import math
from pathlib import Path

import pytest
import torch
from conftest import make_dataset
from safetensors import safe_open

from lib_sdtrain.data.scan import ImageRecord
from lib_sdtrain.errors import UserError
from lib_sdtrain.events import EventLog, Events
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train import loop
from lib_sdtrain.train.settings import TrainSettings
from lib_sdtrain.train.validation import Validation, split_validation, validation_levels


def rec(folder, i, reg=False):
    return ImageRecord(Path(f"/d/{folder}/p{i}.png"), 64, 64, "c", "sidecar", 1, folder, Path(f"/d/{folder}"),
                       is_regularization=reg)


def test_pictures_are_held_out_per_folder_from_the_seed():
    records = [rec("10_a", i) for i in range(10)] + [rec("2_b", i) for i in range(3)] + \
        [rec("1_cls", i, reg=True) for i in range(20)]
    train, held = split_validation(records, 0.2, seed=7)
    assert sorted(str(r.folder) for r in held) == ["/d/10_a", "/d/10_a", "/d/2_b"]   # round(0.2 × 10), round(0.6)
    assert not any(r.is_regularization for r in held) and len(train) + len(held) == len(records)
    assert [r.path for r in split_validation(records, 0.2, seed=7)[1]] == [r.path for r in held]   # same seed
    assert [r.path for r in split_validation(records, 0.2, seed=8)[1]] != [r.path for r in held]
    _, most = split_validation(records, 0.5, seed=7)
    assert sum(r.folder == Path("/d/2_b") for r in most) == 2                      # one stays in training
    moved = [ImageRecord(Path("/elsewhere") / r.path.relative_to("/d"), 64, 64, "c", "sidecar", 1, r.concept,
                         Path("/elsewhere") / r.folder.relative_to("/d"), is_regularization=r.is_regularization)
             for r in records]
    assert [r.path.name for r in split_validation(moved, 0.2, seed=7)[1]] == [r.path.name for r in held]
    assert split_validation(records, 0.0, seed=7) == (records, [])
    with pytest.raises(UserError, match="holds out no picture"):
        split_validation([rec("1_x", 0), rec("1_y", 0)], 0.4, seed=1)              # one picture per folder
    assert validation_levels(4, 0, 1000) == [125, 375, 625, 875]
    assert validation_levels(2, 200, 600) == [300, 500]


def test_a_rise_after_the_lowest_point_is_reported_once():
    v = Validation.__new__(Validation)
    v.history, v.warned = [], False
    for step, value in ((1, 1.0), (2, 0.8), (3, 0.82), (4, 0.79)):
        v.history.append((step, value))
        assert v.rise() == ""                                       # wobbles within 5 %: nothing
    v.history += [(5, 0.9)]
    assert v.rise() == ""                                           # one measurement up is not a trend
    v.history += [(6, 0.95)]
    text = v.rise()
    assert "risen 20 %" in text and "step 4" in text               # 0.95 / 0.79
    v.history += [(7, 1.0)]
    assert v.rise() == ""                                           # said once
    resumed = Validation.__new__(Validation)
    resumed.restore(list(v.history))                                # a resumed run: said before the stop
    assert resumed.warned and resumed.history == v.history
    resumed.history += [(8, 1.1)]
    assert resumed.rise() == ""
    early = Validation.__new__(Validation)
    early.restore(v.history[:5])                                    # stopped before the rise was seen
    early.history += [(6, 0.95)]
    assert "risen 20 %" in early.rise()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny.safetensors", "sd1")


def settings(model, data, out, **over):
    return TrainSettings.from_dict({
        "model": str(model), "data": str(data), "output": str(out), "name": Path(out).name, "resolution": 64,
        "min_bucket": 64, "max_bucket": 64, "batch_size": 1, "epochs": 2, "optimizer": "sgd",
        "learning_rate": 0.5, "save_every_n_epochs": 0, "save_state": False, "tensorboard": False,
        "lora": {"network_dim": 4, "save_dtype": "fp32"}, **over})


def test_a_run_measures_held_out_pictures_it_never_trains_on(model, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n=5, repeats=1)
    trained = []
    real = loop.train_batch

    def spy(cfg, parts, method, data, indices, *a, **k):
        trained.extend(data.records[i].path.name for i in indices)
        return real(cfg, parts, method, data, indices, *a, **k)

    monkeypatch.setattr(loop, "train_batch", spy)
    log = EventLog()
    result = loop.train(settings(model, data, tmp_path / "o", validation_split=0.4),
                        StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host"), Events(log))
    texts = [e.data["text"] for e in log.since(0)[1] if e.kind == "status"]
    held_line = next(t for t in texts if t.startswith("validation: 2 instance pictures held out"))
    assert len(set(trained)) == 3 and not any(name in held_line for name in set(trained))
    # 3 pictures x 1 repeat, batch 1: 3 steps an epoch; measured at the end of each epoch
    assert [s for s, _ in result.validation] == [3, 6] and all(math.isfinite(v) for _, v in result.validation)
    assert result.validation[0][1] != result.validation[1][1]                # the weights moved between them
    assert sum(t.startswith("validation loss") for t in texts) == 2
    assert [(e.data["step"], e.data["loss"]) for e in log.since(0)[1] if e.kind == "validation"] == result.validation
    with safe_open(str(result.final), "pt") as f:
        assert f.metadata()["ss_validation_split"] == "0.4"
    every = loop.train(settings(model, data, tmp_path / "o2", validation_split=0.4, validation_every_n_steps=2),
                       StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host"))
    assert [s for s, _ in every.validation] == [2, 4, 6]                      # every 2 steps, and the last one


def test_the_same_weights_give_the_same_validation_loss(model, tmp_path):
    from lib_sdtrain.data.scan import scan_dataset

    data = make_dataset(tmp_path / "data", n=3, repeats=1)
    parts = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host").load(str(model))
    cfg = settings(model, data, tmp_path / "o", validation_split=0.5)
    _, held = split_validation(scan_dataset(str(data)).usable, 0.5, cfg.seed)
    v = Validation(cfg, parts, held)
    first = v.measure(parts.alphas_cumprod, parts.encode_text, None, 1)
    second = v.measure(parts.alphas_cumprod, parts.encode_text, None, 2)
    assert first == second and math.isfinite(first) and len(v) == len(held) == 2
    with torch.no_grad():                                                 # other weights, another value
        next(p for p in parts.unet.parameters() if p.dim() > 1).mul_(1.5)
    assert v.measure(parts.alphas_cumprod, parts.encode_text, None, 3) != first
    assert [s for s, _ in v.history] == [1, 2, 3]


def test_the_live_arithmetic_counts_only_the_training_pictures(model, tmp_path):
    from lib_sdtrain.data.scan import scan_dataset
    from lib_sdtrain.train.estimate import run_plan

    data = make_dataset(tmp_path / "data", n=5, repeats=1)
    report = scan_dataset(str(data))
    full = run_plan(settings(model, data, tmp_path / "o"), report)
    split = run_plan(settings(model, data, tmp_path / "o", validation_split=0.4), report)
    assert (full["validation_images"], split["validation_images"]) == (0, 2)
    assert split["steps_per_epoch"] * 5 == full["steps_per_epoch"] * 3


def test_sdxl_with_the_text_cache_measures_from_cached_captions(tmp_path):
    """SDXL caches the frozen text encoders' outputs before training; the held-out captions are cached with them,
    so measuring needs no encoder."""
    sdxl = make_tiny_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    data = make_dataset(tmp_path / "data", n=4, repeats=1)
    log = EventLog()
    result = loop.train(settings(sdxl, data, tmp_path / "xl", validation_split=0.25, epochs=1,
                                 lora={"network_dim": 4, "save_dtype": "fp32", "train_text_encoder": False}),
                        StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host"), Events(log))
    texts = [e.data["text"] for e in log.since(0)[1] if e.kind == "status"]
    assert "caching text-encoder outputs" in texts and len(result.validation) == 1
    assert math.isfinite(result.validation[0][1])


def test_a_resumed_run_keeps_its_validation_history(model, tmp_path):
    """The state carries the measurements: the resumed run's history (and its rise check and chart) goes on from
    them, with the values an unbroken run measures; a damaged history is refused, another split starts anew."""
    import json

    data = make_dataset(tmp_path / "data", n=5, repeats=1)
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host")
    whole = loop.train(settings(model, data, tmp_path / "whole", validation_split=0.4, epochs=3), host)
    first = loop.train(settings(model, data, tmp_path / "cut", validation_split=0.4, epochs=1, save_state=True), host)
    manifest = json.loads((first.run_dir / "state" / "state.json").read_text())
    assert manifest["validation"] == [[3, first.validation[0][1]]]
    log = EventLog()
    resumed = loop.train(settings(model, data, tmp_path / "cut", validation_split=0.4, epochs=3, save_state=True,
                                  resume=str(first.run_dir)), host, Events(log))
    assert [s for s, _ in resumed.validation] == [3, 6, 9]
    assert [v for _, v in resumed.validation] == pytest.approx([v for _, v in whole.validation], rel=1e-5)
    assert [e.data["step"] for e in log.since(0)[1] if e.kind == "validation"] == [3, 6, 9]   # the chart's points

    manifest = json.loads((first.run_dir / "state" / "state.json").read_text())
    assert [s for s, _ in manifest["validation"]] == [3, 6, 9]
    log = EventLog()
    moved = loop.train(settings(model, data, tmp_path / "cut", validation_split=0.2, epochs=3, save_state=True,
                                resume=str(first.run_dir)), host, Events(log))
    texts = [e.data["text"] for e in log.since(0)[1] if e.kind == "status"]
    assert any(t.startswith("the validation loss starts a new history") for t in texts)
    assert [s for s, _ in moved.validation] == [12]       # 1 of 5 held out: 4 steps an epoch, from step 9 to 12

    path = first.run_dir / "state" / "state.json"
    for bad in ([[13, 0.5]], [[6, 0.5], [3, 0.4]], [[3, "loss"]], [[3]], {"3": 0.5}, [[True, 0.5]]):
        damaged = json.loads(path.read_text())
        damaged["validation"] = bad
        path.write_text(json.dumps(damaged))
        with pytest.raises(UserError, match="'validation' is not a list"):
            loop.train(settings(model, data, tmp_path / "cut", validation_split=0.2, epochs=4,
                                resume=str(first.run_dir)), host)


def test_a_resumed_run_with_another_loss_or_noise_levels_starts_a_new_validation_history(model, tmp_path):
    """The history went on whenever validation_split and seed were the same; resumed with another loss type or
    timestep range, its old values (another loss, other noise levels) were compared with the new ones by the
    rise check and the chart."""
    data = make_dataset(tmp_path / "data", n=5, repeats=1)
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host")
    for change, name in (({"loss_type": "l1"}, "loss_type"), ({"max_timestep": 500}, "max_timestep")):
        first = loop.train(settings(model, data, tmp_path / name, validation_split=0.4, epochs=1, save_state=True),
                           host)
        assert [s for s, _ in first.validation] == [3]
        log = EventLog()
        resumed = loop.train(settings(model, data, tmp_path / name, validation_split=0.4, epochs=2, save_state=True,
                                      resume=str(first.run_dir), **change), host, Events(log))
        texts = [e.data["text"] for e in log.since(0)[1] if e.kind == "status"]
        assert any(t.startswith(f"the validation loss starts a new history: {name} differ") for t in texts), texts
        assert [s for s, _ in resumed.validation] == [6]
        assert not any("were trained on" in e.data["text"] for e in log.since(0)[1] if e.kind == "warning")


def test_a_resumed_run_that_holds_out_other_pictures_says_they_were_trained_on(model, tmp_path):
    """validation_split turned on (or another seed) at a resume holds out pictures the state's steps trained on;
    their loss then reads low and hides over-training. The run had said nothing of it."""
    data = make_dataset(tmp_path / "data", n=5, repeats=1)
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host")
    first = loop.train(settings(model, data, tmp_path / "cut", epochs=1, save_state=True), host)
    log = EventLog()
    loop.train(settings(model, data, tmp_path / "cut", validation_split=0.4, epochs=2, save_state=True,
                        resume=str(first.run_dir)), host, Events(log))
    warnings = [e.data["text"] for e in log.since(0)[1] if e.kind == "warning"]
    assert any("the state's 5 steps were trained with validation_split 0.0" in w and "were trained on" in w
               for w in warnings), warnings
