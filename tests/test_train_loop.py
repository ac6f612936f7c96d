"""The training loop end to end on tiny models: files, metadata, resume and stop."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lib_sdtrain.errors import UserError
from lib_sdtrain.events import EventLog, Events, StopToken
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings
from conftest import make_dataset as _make_dataset


def make_dataset(root, n=4, size=64):
    return _make_dataset(root, n, size, repeats=3, widen=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny.safetensors", "sd1")


@pytest.fixture
def base_cfg(tmp_path, model):
    data = make_dataset(tmp_path / "data")
    return TrainSettings.from_dict({
        "model": str(model), "data": str(data), "output": str(tmp_path / "out"), "name": "t",
        "resolution": 64, "min_bucket": 64, "max_bucket": 128, "batch_size": 2, "epochs": 2,
        "learning_rate": 1e-3, "save_every_n_epochs": 1, "tensorboard": False,
        "lora": {"network_dim": 4, "network_alpha": 4},
    })


def host_for(tmp_path):
    return StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")


def pinned_host(tmp_path, cfg, monkeypatch):
    """(host, parts): the run will train exactly these loaded parts, so a test can spy on them or read them after."""
    host = host_for(tmp_path)
    parts = host.load(cfg.model)
    monkeypatch.setattr(host, "load", lambda model=None: parts)
    return host, parts


def test_lora_run_writes_files_and_metadata(tmp_path, base_cfg):
    log = EventLog()
    result = train(base_cfg, host_for(tmp_path), Events(log))
    assert result.stopped == "" and result.final.is_file()
    assert all(np.isfinite(result.losses))
    # 4 pictures × 3 repeats = 12 samples; batches stay within a bucket: 2 buckets of 6 → 3+3 = 6 steps/epoch
    assert result.steps == 12
    assert [p.name for p in result.saved] == ["t-000001.safetensors", "t.safetensors"]
    with safe_open(str(result.final), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert meta["ss_output_name"] == "t" and meta["ss_steps"] == "12"
    assert json.loads(meta["lab.config"])["lora"]["network_dim"] == 4
    assert (result.run_dir / "loss.csv").read_text().count("\n") == 13
    kinds = {e.kind for _, e in [(0, e) for e in log.since(0)[1]]}
    assert {"progress", "loss", "saved", "status"} <= kinds


def test_refuses_to_replace_existing_outputs(tmp_path, base_cfg):
    host = host_for(tmp_path)
    train(base_cfg.replace(epochs=1), host)
    with pytest.raises(UserError, match="taken"):
        train(base_cfg.replace(epochs=1), host)


def _csv_steps(run_dir):
    lines = (run_dir / "loss.csv").read_text().splitlines()
    assert lines[0].startswith("step,epoch,loss")
    return [int(line.split(",")[0]) for line in lines[1:]]


def test_overwrite_starts_a_fresh_loss_log(tmp_path, base_cfg):
    host = host_for(tmp_path)
    first = train(base_cfg.replace(epochs=1), host)
    assert _csv_steps(first.run_dir) == list(range(1, 7))
    again = train(base_cfg.replace(epochs=1, max_steps=3, overwrite=True), host)
    assert again.run_dir == first.run_dir and _csv_steps(again.run_dir) == [1, 2, 3]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, base_cfg):
    full = train(base_cfg.replace(name="full"), host_for(tmp_path))

    stop = StopToken()
    events = Events(lambda e: stop.request() if e.kind == "progress" and e.data.get("step") == 5 else None)
    part = train(base_cfg.replace(name="part"), host_for(tmp_path), events, stop)
    assert part.stopped == "stopped" and part.steps == 5 and part.final is None
    resumed = train(base_cfg.replace(name="part", resume=str(part.run_dir)), host_for(tmp_path))
    assert resumed.steps == full.steps
    assert _csv_steps(resumed.run_dir) == _csv_steps(full.run_dir) == list(range(1, 13))   # continued, once each
    from safetensors.torch import load_file

    a, b = load_file(str(full.final)), load_file(str(resumed.final))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


def test_model_is_restored_after_a_failed_run(tmp_path, base_cfg, monkeypatch):
    host, parts = pinned_host(tmp_path, base_cfg, monkeypatch)
    before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    import lib_sdtrain.train.loop as loop

    def boom(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(loop, "train_batch", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        train(base_cfg, host)
    after = parts.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in parts.unet.parameters())


def test_caption_prefix_suffix_and_epoch_dropout_reach_the_text_encoder(tmp_path, base_cfg, monkeypatch):
    host, parts = pinned_host(tmp_path, base_cfg, monkeypatch)
    seen = []
    original = parts.encode_text
    monkeypatch.setattr(parts, "encode_text", lambda prompts: (seen.append(list(prompts)), original(prompts))[1])
    cfg = base_cfg.replace(caption_prefix="ohwx", caption_suffix="best quality", caption_dropout_every_n_epochs=2,
                           cache_latents=False)
    result = train(cfg, host)
    assert result.steps == 12 and len(seen) == 12
    first, second = [c for batch in seen[:6] for c in batch], [c for batch in seen[6:] for c in batch]
    assert all(c.startswith("ohwx ") and c.endswith(" best quality") for c in first)
    assert set(second) == {""}   # epoch 2 of every 2: all captions dropped


def test_timestep_range_limits_the_noise_levels_the_unet_sees(tmp_path, base_cfg, monkeypatch):
    host, parts = pinned_host(tmp_path, base_cfg, monkeypatch)
    seen = []
    original = parts.predict
    monkeypatch.setattr(parts, "predict", lambda x, t, *a, **k: (seen.append(t.tolist()), original(x, t, *a, **k))[1])
    train(base_cfg.replace(min_timestep=600, max_timestep=700), host)
    drawn = [v for batch in seen for v in batch]
    assert len(drawn) == 24 and all(600 <= v < 700 for v in drawn) and len(set(drawn)) > 5
    with pytest.raises(UserError, match="min_timestep .* must be below max_timestep"):
        base_cfg.replace(min_timestep=700, max_timestep=700)


def test_full_timestep_range_draws_what_it_drew_before_the_range_existed():
    from lib_sdtrain.train import noise as N

    a = N.sample_timesteps(64, torch.Generator().manual_seed(3))
    b = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = N.sample_timesteps(64, torch.Generator().manual_seed(3), 1000, 200, 300)
    assert c.min() >= 200 and c.max() < 300
    with pytest.raises(ValueError):
        N.sample_timesteps(4, torch.Generator(), 1000, 300, 300)


def test_gradient_checkpointing_gives_the_same_weights_and_is_switched_off_after(tmp_path, base_cfg, monkeypatch):
    host, parts = pinned_host(tmp_path, base_cfg, monkeypatch)
    calls = []
    original = parts.unet.enable_gradient_checkpointing
    monkeypatch.setattr(parts.unet, "enable_gradient_checkpointing", lambda: (calls.append("on"), original())[1])
    plain = train(base_cfg.replace(name="plain", epochs=1), host_for(tmp_path / "b"))
    ckpt = train(base_cfg.replace(name="ckpt", epochs=1, gradient_checkpointing=True), host)
    assert calls == ["on"] and not parts.unet.is_gradient_checkpointing
    # transformers < 4.35: the input-gradient hook added for reentrant checkpointing is gone again
    assert not any(getattr(e, "_lab_input_grads", False) for e in parts.text_encoders)
    from safetensors.torch import load_file

    a, b = load_file(str(plain.final)), load_file(str(ckpt.final))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_adapter_dropout_is_active_during_training_and_modes_come_back(tmp_path, base_cfg, monkeypatch):
    host, parts = pinned_host(tmp_path, base_cfg, monkeypatch)
    before = {n: m.training for n, m in parts.unet.named_modules()}
    plain = train(base_cfg.replace(name="plain", epochs=1), host)
    dropped = train(base_cfg.replace(name="dropped", epochs=1, lora=base_cfg.lora.replace(dropout=0.5)), host)
    assert {n: m.training for n, m in parts.unet.named_modules()} == before
    from safetensors.torch import load_file

    a, b = load_file(str(plain.final)), load_file(str(dropped.final))
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_down" in k), "dropout changed nothing"


def test_a_first_step_that_diverges_stops_cleanly_and_keeps_nothing_broken(tmp_path, base_cfg, monkeypatch):
    import lib_sdtrain.train.loop as loop

    monkeypatch.setattr(loop, "train_batch", lambda *a, **k: float("nan"))
    log = EventLog()
    result = train(base_cfg.replace(tensorboard=True), host_for(tmp_path), Events(log))
    assert result.stopped == "diverged" and result.steps == 1 and result.final is None
    warnings = [e.data["text"] for e in log.since(0)[1] if e.kind == "warning"]
    assert any("no finite loss yet" in w for w in warnings)
    assert (result.run_dir / "loss.csv").read_text().splitlines()[1].split(",")[2] == "nan"


def test_divergence_is_still_reported_once_when_the_run_does_not_stop_on_it(tmp_path, base_cfg, monkeypatch):
    # stop_on_divergence off trains on; it said nothing at all, so a NaN loss went by unnoticed
    from lib_sdtrain.train import loop

    real, calls = loop.train_batch, []

    def nan_from_step_3(*a, **k):
        calls.append(1)
        value = real(*a, **k)
        return float("nan") if len(calls) >= 3 else value

    monkeypatch.setattr(loop, "train_batch", nan_from_step_3)
    log = EventLog()
    result = train(base_cfg.replace(max_steps=5, stop_on_divergence=False), host_for(tmp_path), Events(log))
    warnings = [e.data["text"] for e in log.since(0)[1] if e.kind == "warning" and "diverged" in e.data["text"]]
    assert len(warnings) == 1 and warnings[0].startswith("loss diverged at step 3 (nan")
    assert "training goes on" in warnings[0] and result.steps == 5 and not result.stopped


def test_the_over_training_warning_names_the_level_the_loss_fell_from(tmp_path, base_cfg, monkeypatch):
    # the alarm itself is tested on loss series (test_train_monitor.py); here its warning in a run: said once,
    # the run goes on to its end
    import lib_sdtrain.train.loop as loop

    real = loop.LossMonitor

    class Collapsing(real):
        def update(self, loss):
            out = super().update(loss)
            if self.count == 2 and not self.overtraining_warned:
                self.overtraining_warned, self.reference = True, 0.125
                return "overtraining"
            return out

    monkeypatch.setattr(loop, "LossMonitor", Collapsing)
    log = EventLog()
    result = train(base_cfg.replace(max_steps=3), host_for(tmp_path), Events(log))
    warnings = [e.data["text"] for e in log.since(0)[1] if e.kind == "warning" and "over-training" in e.data["text"]]
    assert warnings == ["over-training likely at step 2: the average loss fell below 0.3 × its level at step 1 "
                        "(0.125) and keeps falling; compare earlier epochs' saves"]
    assert result.steps == 3 and result.final is not None and not result.stopped


def test_ss_metadata_is_written_as_kohya_writes_it(tmp_path, base_cfg):
    """sd-scripts' train_network.py writes `str()` of each argument: "None" for unset ones, the optimizer's class
    path with its set arguments, the planned epoch count on the last file and the 0-based epoch on step saves."""
    from lib_sdtrain.formats.kohya import optimizer_value

    # 6 steps per epoch; 3 steps = a run that ends inside epoch 1; a step save at step 2
    cfg = base_cfg.replace(name="k1", max_steps=3, save_every_n_steps=2, save_every_n_epochs=0,
                           enable_buckets=False)
    result = train(cfg, host_for(tmp_path))
    assert [p.name for p in result.saved] == ["k1-step00000002.safetensors", "k1.safetensors"]
    with safe_open(str(result.final), "pt") as f:
        meta = f.metadata()
    with safe_open(str(result.saved[0]), "pt") as f:
        step_meta = f.metadata()
    assert (meta["ss_epoch"], meta["ss_steps"], meta["ss_num_epochs"]) == ("1", "3", "1")
    assert (step_meta["ss_epoch"], step_meta["ss_steps"]) == ("0", "2")
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW"      # weight decay 0.01 is AdamW's default
    for key in ("ss_clip_skip", "ss_network_dropout", "ss_unet_lr", "ss_text_encoder_lr", "ss_min_bucket_reso",
                "ss_max_bucket_reso"):
        assert meta[key] == "None", (key, meta[key])
    assert meta["ss_bucket_info"] == "null" and meta["ss_bucket_no_upscale"] == "False"
    assert meta["ss_learning_rate"] == "0.001" and meta["ss_max_grad_norm"] == "1.0"
    assert meta["ss_sd_model_name"] == "tiny.safetensors"           # kohya: the file name with its extension
    assert "modelspec.encoder_layer" not in meta

    cfg = TrainSettings.from_dict({**base_cfg.to_dict(), "name": "k2", "max_steps": 2, "save_every_n_epochs": 0,
                                   "optimizer": "sgd", "unet_lr": 1e-4, "weight_decay": 0.05,
                                   "lora": {"network_dim": 4, "network_alpha": 4, "dropout": 0.1}})
    with safe_open(str(train(cfg, host_for(tmp_path)).final), "pt") as f:
        meta = f.metadata()
    assert meta["ss_optimizer"] == "torch.optim.sgd.SGD(momentum=0.9,weight_decay=0.05)"
    assert (meta["ss_unet_lr"], meta["ss_text_encoder_lr"], meta["ss_network_dropout"]) == ("0.0001", "None", "0.1")
    assert meta["ss_min_bucket_reso"] == "64" and json.loads(meta["ss_bucket_info"])["buckets"]

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_value(torch.optim.AdamW(params, lr=1, betas=(0.9, 0.99))) == \
        "torch.optim.adamw.AdamW(betas=(0.9, 0.99))"


def test_epoch_saves_fall_where_kohya_puts_them_and_on_the_control_picture_epochs(tmp_path):
    """Every N epochs means after epochs N, 2N, ... (kohya's `save_every_n_epochs`), also with a first epoch Y,
    so a save and the control pictures of `sample_every_n_epochs` = N show the same epochs."""
    from types import SimpleNamespace

    from lib_sdtrain.train.loop import ControlPictures, save_path

    files = SimpleNamespace(epoch_file=lambda e: tmp_path / f"e{e}", step_file=lambda s: tmp_path / f"s{s}")

    def saved(every, first, epochs=8):
        cfg = SimpleNamespace(save_every_n_epochs=every, save_from_epoch=first, save_every_n_steps=0)
        return [e for e in range(1, epochs + 1) if save_path(cfg, files, e * 10, e, True, False) is not None]

    assert saved(1, 1) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert saved(2, 1) == [2, 4, 6, 8]
    assert saved(3, 1) == [3, 6]
    assert saved(2, 5) == [6, 8]
    assert saved(0, 1) == []
    cfg = SimpleNamespace(save_every_n_epochs=2, save_from_epoch=1, save_every_n_steps=0)
    assert save_path(cfg, files, 20, 2, False, False) is None        # mid-epoch: no epoch save
    assert save_path(cfg, files, 20, 2, True, True) is None          # the last step: the final save instead
    controls = ControlPictures.__new__(ControlPictures)
    controls.enabled, controls.cfg = True, SimpleNamespace(sample_every_n_steps=0, sample_every_n_epochs=2)
    assert [e for e in range(1, 9) if controls.due(e * 10, e, True)] == saved(2, 1)


def test_a_section_setting_given_at_the_top_names_its_section():
    with pytest.raises(UserError, match=r"unknown setting 'network_dim' \(did you mean 'lora.network_dim'\?\)"):
        TrainSettings.from_dict({"network_dim": 8})
    with pytest.raises(UserError, match=r"did you mean 'learning_rate'"):
        TrainSettings.from_dict({"learning_rat": 1e-3})
    with pytest.raises(UserError, match=r"unknown setting 'lora.network_dimm' \(did you mean 'network_dim'\?\)"):
        TrainSettings.from_dict({"lora": {"network_dimm": 8}})
