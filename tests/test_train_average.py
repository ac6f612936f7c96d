"""adapter_ema: an average of the trained tensors follows each step with the warm-up rule, is what every save
holds (the trained weights come back after), resumes exactly, and is refused where it does not belong."""

import pytest
import torch
from conftest import fail_on_batch, write_pictures
from safetensors import safe_open

from lib_sdtrain.errors import UserError
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.methods.base import MethodBase
from lib_sdtrain.train.average import AveragedMethod
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


class OneTensor(MethodBase):
    name = "one"

    def __init__(self):
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.saved = []

    def save(self, path, metadata, *, run_info=None):
        self.saved.append((self.w.detach().clone(), dict(metadata)))
        return path

    def training_state(self):
        return {"w": self.w.detach().clone()}

    def load_training_state(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])


def test_the_average_follows_the_warm_up_rule_and_is_what_saves_hold():
    inner = OneTensor()
    m = AveragedMethod(inner, [inner.w], 0.9)
    want = torch.zeros(3)
    for n, value in enumerate((1.0, 2.0, 3.0, 4.0, 5.0)):
        with torch.no_grad():
            inner.w.fill_(value)
        m.after_step(n + 1)
        d = min(0.9, (1 + n) / (10 + n))
        want = d * want + (1 - d) * value
    m.save("x", {"ss_steps": "5"})
    held, meta = inner.saved[-1]
    assert torch.allclose(held, want.expand(3)) and float(inner.w.detach()[0]) == 5.0      # saved: the average; kept: raw
    assert meta["lab.weights"] == "ema" and meta["lab.ema_updates"] == "5" and meta["ss_steps"] == "5"
    state = m.training_state()
    assert set(state) == {"w", "lab_ema.0", "lab_ema.updates"}
    other_inner = OneTensor()
    other = AveragedMethod(other_inner, [other_inner.w], 0.9)
    other.load_training_state(state)
    assert torch.equal(other_inner.w, inner.w) and torch.equal(other._average[0], m._average[0])
    assert other._updates == 5 and other.name == "one"                            # the rest is the method's own
    with pytest.raises(UserError, match="weight average does not fit"):
        other.load_training_state({"w": torch.zeros(3), "lab_ema.0": torch.zeros(4),
                                   "lab_ema.updates": torch.tensor([1])})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_pictures(tmp_path_factory.mktemp("data") / "2_zwx", 2, captions="zwx, red square {i}").parent


def cfg_for(tiny_checkpoints, dataset, tmp_path, name, **over):
    return TrainSettings.from_dict({
        "model": str(tiny_checkpoints["sd1"]), "data": str(dataset), "name": name, "output": str(tmp_path / name),
        "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 2, "max_steps": 6, "optimizer": "sgd",
        "learning_rate": 0.5, "save_every_n_steps": 3, "save_every_n_epochs": 0, "tensorboard": False,
        "lora": {"network_dim": 4, "save_dtype": "fp32"}, **over})


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}   # noqa: SIM118 - safe_open has no __iter__


def test_a_lora_run_saves_the_average_and_resumes_to_the_same_file(tmp_path, tiny_checkpoints, dataset,
                                                                    monkeypatch):
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host")
    plain_meta, plain = tensors(train(cfg_for(tiny_checkpoints, dataset, tmp_path, "p"), host).final)
    assert "lab.weights" not in plain_meta
    ema = cfg_for(tiny_checkpoints, dataset, tmp_path, "e", adapter_ema=True, adapter_ema_decay=0.99)
    meta, averaged = tensors(train(ema, host).final)
    assert meta["lab.weights"] == "ema" and meta["lab.ema_updates"] == "6" and meta["lab.ema_decay"] == "0.99"
    ups = [k for k in plain if "lora_up" in k]
    assert any(not torch.allclose(averaged[k], plain[k]) for k in ups)
    # the average lags behind: its up weights are smaller than the trained ones (they grow from 0)
    assert sum(float(averaged[k].norm()) for k in ups) < sum(float(plain[k].norm()) for k in ups)
    # a decay near 0 keeps the newest weights: the file is the plain one
    _, newest = tensors(train(cfg_for(tiny_checkpoints, dataset, tmp_path, "n", adapter_ema=True,
                                      adapter_ema_decay=1e-9), host).final)
    assert all(torch.allclose(newest[k], plain[k], atol=1e-6) for k in plain)
    # stopped after the step-3 save and resumed: the same averaged file as the run that was never stopped
    stopped = cfg_for(tiny_checkpoints, dataset, tmp_path, "s", adapter_ema=True, adapter_ema_decay=0.99)
    real = fail_on_batch(monkeypatch, n=5)
    with pytest.raises(RuntimeError):
        train(stopped, host)
    monkeypatch.setattr("lib_sdtrain.train.loop.train_batch", real)
    resumed = train(stopped.replace(resume=str(tmp_path / "host" / "runs" / "s")), host)
    _, again = tensors(resumed.final)
    assert all(torch.allclose(again[k], averaged[k], atol=1e-6) for k in averaged)
    # a state written without the average does not resume with it, nor one with it without: the refusal names
    # the setting (it used to name the first differing tensor, method.lab_ema.0)
    with pytest.raises(UserError, match="trained with adapter_ema off, and this run has it on: resume with "
                                        "adapter_ema off"):
        train(cfg_for(tiny_checkpoints, dataset, tmp_path, "p", adapter_ema=True,
                      resume=str(tmp_path / "host" / "runs" / "p")), host)
    with pytest.raises(UserError, match="trained with adapter_ema on, and this run has it off"):
        train(stopped.replace(adapter_ema=False, resume=str(tmp_path / "host" / "runs" / "s")), host)


def test_embeddings_and_hypernetworks_save_their_average(tmp_path, tiny_checkpoints, dataset):
    import json

    from lib_sdtrain.formats.safe_pickle import load_checkpoint

    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host")
    emb = train(cfg_for(tiny_checkpoints, dataset, tmp_path, "zwx", method="embedding", adapter_ema=True,
                        max_steps=2, learning_rate=0.05, embedding={"token": "zwx", "vectors": 1}), host)
    assert tensors(emb.final)[0]["lab.weights"] == "ema"
    hn = train(cfg_for(tiny_checkpoints, dataset, tmp_path, "hn", method="hypernetwork", adapter_ema=True,
                       max_steps=2, learning_rate=1e-3), host)
    assert json.loads(load_checkpoint(hn.final)["optional_info"])["lab.weights"] == "ema"


def test_full_model_methods_and_bad_decays_are_refused():
    with pytest.raises(UserError, match="own average of the model's weights: its ema setting"):
        TrainSettings.from_dict({"method": "finetune", "data": "x", "adapter_ema": True})
    with pytest.raises(UserError, match="Dreambooth has no weight average"):
        TrainSettings.from_dict({"method": "dreambooth", "data": "x", "adapter_ema": True})
    with pytest.raises(UserError):
        TrainSettings.from_dict({"data": "x", "adapter_ema": True, "adapter_ema_decay": 1.0})
    TrainSettings.from_dict({"data": "x", "adapter_ema_decay": 1.0})   # unused while off
