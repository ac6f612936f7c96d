"""scale_weight_norms (kohya's max-norm regularisation): after every step no LoRA module's update is longer than
the limit, the scaled modules keep their direction, the file says so, and the kinds it does not fit refuse it."""

import pytest
import torch
from conftest import write_pictures
from safetensors import safe_open

from lib_sdtrain.errors import UserError
from lib_sdtrain.events import EventLog, Events
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.methods.lora import LoraSettings
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_pictures(tmp_path_factory.mktemp("data") / "2_zwx", 2, captions="zwx, red square {i}").parent


def updates(path):
    """{module: ‖up·down·alpha/dim‖} of a kohya LoRA file, and its metadata."""
    with safe_open(str(path), "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}   # noqa: SIM118 - no __iter__
    out = {}
    for k, value in t.items():
        if k.endswith(".lora_up.weight"):
            base = k[: -len(".lora_up.weight")]
            up, down = value.flatten(1), t[base + ".lora_down.weight"].flatten(1)
            out[base] = float((up @ down * (float(t[base + ".alpha"]) / down.shape[0])).norm())
    return out, meta


def run(tiny_checkpoints, dataset, tmp_path, name, events=None, **lora):
    cfg = TrainSettings.from_dict({
        "model": str(tiny_checkpoints["sd1"]), "data": str(dataset), "name": name, "output": str(tmp_path / name),
        "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 2, "max_steps": 4, "optimizer": "sgd",
        "learning_rate": 2.0, "save_state": False, "save_every_n_epochs": 0, "tensorboard": False,
        "lora": {"network_dim": 4, "network_alpha": 4, "save_dtype": "fp32", **lora}})
    return train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host"), events).final


def test_no_module_update_is_longer_than_the_limit(tmp_path, tiny_checkpoints, dataset):
    free, meta = updates(run(tiny_checkpoints, dataset, tmp_path, "free"))
    assert meta["ss_scale_weight_norms"] == "None"
    limit = sorted(free.values())[len(free) // 2]              # half the modules are above it without the limit
    assert sum(v > limit * 1.01 for v in free.values()) >= len(free) // 3
    log = EventLog()
    capped, meta = updates(run(tiny_checkpoints, dataset, tmp_path, "capped", events=Events(log),
                               scale_weight_norms=limit))
    figures = [e.data for e in log.since(0)[1] if e.kind == "progress" and "keys_scaled" in e.data]
    assert len(figures) == 4 and any(f["keys_scaled"] > 0 for f in figures)      # shown every step
    assert all(f["max_key_norm"] >= f["average_key_norm"] > 0 for f in figures)
    assert meta["ss_scale_weight_norms"] == str(limit)
    assert max(capped.values()) <= limit * (1 + 1e-4)
    assert sum(v > 0.5 * limit for v in capped.values()) >= len(capped) // 3   # not all shrunk to nothing


def test_the_scaling_keeps_each_update_direction_and_its_factors_balanced():
    from types import SimpleNamespace

    from lib_sdtrain.methods.lora import LoraMethod

    m = LoraMethod(LoraSettings(scale_weight_norms=1.0))
    layer = SimpleNamespace(lora_A={"default": torch.nn.Linear(6, 2, bias=False)},
                            lora_B={"default": torch.nn.Linear(2, 5, bias=False)}, scaling={"default": 0.5})
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_().mul_(10)
    before = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach() * 0.5
    m._layers = {"x": SimpleNamespace(layer=layer)}
    scaled, _, largest = m.apply_max_norm(1.0)
    after = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach() * 0.5
    assert scaled == 1 and largest == pytest.approx(float(before.norm()), rel=1e-5) and largest > 1
    assert float(after.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(after, before / before.norm(), atol=1e-6)           # the same direction


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_kinds_without_up_and_down_refuse_it(kind):
    with pytest.raises(UserError, match="scale_weight_norms works on lora and locon"):
        LoraSettings(network_type=kind, scale_weight_norms=1.0).validate()
