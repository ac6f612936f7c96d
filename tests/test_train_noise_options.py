"""Noise and weighting options (kohya's multires_noise_*, ip_noise_gamma, debiased_estimation_loss): each follows
its definition, is reproducible from the run's generator, leaves runs without it unchanged, and is written into
the file's metadata."""

import pytest
import torch
from conftest import make_dataset
from safetensors import safe_open

from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train import noise as N
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings

AC = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)   # SD's scaled-linear ᾱ


def test_pyramid_noise_adds_coarse_levels_and_keeps_unit_spread():
    noise = torch.randn(8, 4, 128, 128, generator=torch.Generator().manual_seed(0))
    a = N.pyramid_noise(noise, torch.Generator().manual_seed(1), 8, 0.3)
    b = N.pyramid_noise(noise, torch.Generator().manual_seed(1), 8, 0.3)
    assert torch.equal(a, b) and a.shape == noise.shape                 # the same generator, the same noise
    assert abs(float(a.std()) - 1) < 1e-5

    def neighbour_corr(x):   # the coarse levels correlate neighbouring cells, which white noise does not
        return float((x[..., 1:] * x[..., :-1]).mean() / x.var())

    # 524,288 values: white noise reads 0 ± 0.0014 (1 sd)
    assert abs(neighbour_corr(noise)) < 0.007
    strong = N.pyramid_noise(noise, torch.Generator().manual_seed(1), 8, 0.8)
    assert neighbour_corr(strong) > neighbour_corr(a) > 0.012
    flat = N.pyramid_noise(noise, torch.Generator().manual_seed(1), 8, 0.0)   # discount 0: level 0 only
    assert abs(neighbour_corr(flat)) < 0.007
    assert torch.equal(N.pyramid_noise(noise, torch.Generator(), 0, 0.3), noise / noise.std())


def test_input_perturbation_changes_the_input_noise_by_gamma():
    noise = torch.randn(2, 4, 8, 8)
    out = N.perturb(noise, torch.Generator().manual_seed(2), 0.1)
    extra = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, noise + 0.1 * extra)


def test_debiased_weights_are_one_over_root_snr_capped():
    t = torch.tensor([0, 10, 500, 999])
    snr = AC[t] / (1 - AC[t])
    eps = N.debiased_weights(t, AC, "eps")
    assert torch.allclose(eps[1:], 1 / snr[1:].sqrt()) and float(eps[0]) >= 1 / 1000 ** 0.5 - 1e-6
    assert torch.allclose(N.debiased_weights(t, AC, "v"), 1 / (torch.clamp(snr, max=1000) + 1))
    assert bool((eps[1:] > eps[:-1]).all())                                # noisier steps weigh more


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    return {"model": make_tiny_checkpoint(root / "tiny.safetensors", "sd1"), "data": make_dataset(root / "data", n=2)}


def run(world, tmp_path, name, **over):
    cfg = TrainSettings.from_dict({
        "model": str(world["model"]), "data": str(world["data"]), "output": str(tmp_path / name), "name": name,
        "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 2, "epochs": 1, "max_steps": 2,
        "optimizer": "sgd", "learning_rate": 0.5, "save_every_n_epochs": 0, "save_state": False,
        "tensorboard": False, "lora": {"network_dim": 4, "save_dtype": "fp32"}, **over})
    result = train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host"))
    with safe_open(str(result.final), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_each_option_changes_the_training_and_is_recorded(world, tmp_path):
    meta, plain = run(world, tmp_path, "plain")
    assert (meta["ss_multires_noise_iterations"], meta["ss_ip_noise_gamma"], meta["ss_debiased_estimation"]) == \
        ("None", "None", "False")
    _, again = run(world, tmp_path, "again")
    assert all(torch.equal(plain[k], again[k]) for k in plain)                # off: the same run every time
    for name, over, key, value in (
            ("multires", {"multires_noise_iterations": 6, "multires_noise_discount": 0.4},
             "ss_multires_noise_iterations", "6"),
            ("ip", {"ip_noise_gamma": 0.1}, "ss_ip_noise_gamma", "0.1"),
            ("debiased", {"debiased_estimation_loss": True}, "ss_debiased_estimation", "True")):
        meta, got = run(world, tmp_path, name, **over)
        assert meta[key] == value, name
        ups = [k for k in got if "lora_up" in k]
        assert any(not torch.allclose(got[k], plain[k]) for k in ups), name
        assert all(torch.isfinite(got[k]).all() for k in got), name
