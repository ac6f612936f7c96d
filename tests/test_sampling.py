"""Standalone host end to end: load tiny checkpoints of each family and render 64×64 samples."""

import numpy as np
import pytest
import torch

from lib_sdtrain.errors import UserError
from lib_sdtrain.hosts import SampleRequest
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.sampling import Denoiser, render
from lib_sdtrain.testing.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def parts_by_family(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    host = StandaloneHost(device="cpu", dtype="fp32")
    return {f: host.load(make_tiny_checkpoint(d / f"{f}.safetensors", f)) for f in ("sd1", "sd2", "sdxl")}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_render_64px_is_deterministic(parts_by_family, family, sampler):
    parts = parts_by_family[family]
    req = SampleRequest("a red circle, (blue:1.2)", "blurry", seed=7, steps=3, cfg_scale=5.0, width=64, height=64,
                        sampler=sampler)
    a, b = render(parts, [req]), render(parts, [req])
    assert a[0].size == (64, 64) and a[0].mode == "RGB"
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    other = render(parts, [SampleRequest(**{**req.__dict__, "seed": 8})])
    assert not np.array_equal(np.asarray(a[0]), np.asarray(other[0]))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_conditioning_shapes(parts_by_family, family):
    parts = parts_by_family[family]
    cond = parts.encode_text(["a cat", "a dog " * 60])           # the second prompt needs two chunks
    assert cond.context.shape[0] == 2 and cond.context.shape[1] == 154
    assert cond.context.shape[2] == parts.unet.config.cross_attention_dim
    assert (cond.pooled is not None) == (family == "sdxl")


def test_guidance_is_the_cfg_formula(parts_by_family):
    parts = parts_by_family["sd1"]
    cond, uncond = parts.encode_text(["a red circle"]), parts.encode_text([""])
    x = torch.randn(1, 4, 8, 8)
    d1 = Denoiser(parts, cond, uncond, 1.0)(x, 2.0)
    d0 = Denoiser(parts, uncond, uncond, 1.0)(x, 2.0)
    d5 = Denoiser(parts, cond, uncond, 5.0)(x, 2.0)
    assert not torch.allclose(d1, d0)                        # the prompt reaches the UNet
    assert torch.allclose(d5, d0 + 5.0 * (d1 - d0), atol=1e-4)


def test_sigma_timestep_round_trip(parts_by_family):
    parts = parts_by_family["sd1"]
    cond = parts.encode_text(["x"])
    d = Denoiser(parts, cond, cond, 1.0)
    t = torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=torch.float64)
    sig = d.sigmas[t.long()]
    assert torch.allclose(d.sigma_to_t(sig), t, atol=1e-6)
    sched = d.schedule(10)
    assert len(sched) == 11 and sched[-1] == 0 and torch.all(sched[:-1] > sched[1:])


def test_bad_requests_are_user_errors(parts_by_family):
    parts = parts_by_family["sd1"]
    with pytest.raises(UserError, match="sampler"):
        render(parts, [SampleRequest("x", sampler="plms", width=64, height=64)])
    with pytest.raises(UserError, match="multiple of 8"):
        render(parts, [SampleRequest("x", width=65, height=64)])
    with pytest.raises(UserError, match="CFG"):
        render(parts, [SampleRequest("x", width=64, height=64, cfg_scale=float("nan"))])
    with pytest.raises(UserError, match="4096 px a side"):     # refused before any memory is taken
        render(parts, [SampleRequest("x", width=100_000, height=64)])


def test_cli_sample_writes_png(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    model = make_tiny_checkpoint(tmp_path / "m.safetensors", "sd1")
    out = tmp_path / "p.png"
    cmd = [sys.executable, "-m", "lib_sdtrain", "sample", str(model), "--prompt", "a red circle", "--seed", "3",
           "--steps", "2", "--width", "64", "--height", "64", "--out", str(out), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and out.stat().st_size > 100
    r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)     # never overwrite silently
    assert r2.returncode == 2 and "exists" in r2.stderr
    # a typo'd size is refused at once, before the model loads (it used to fill the memory until killed)
    r3 = subprocess.run(cmd[:-8] + ["--width", "100000", "--height", "100000", "--out", str(tmp_path / "big.png")],
                        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r3.returncode == 2 and "above the maximum 4096" in r3.stderr, r3.stderr
    # a folder named like a picture: refused before drawing; it said "pass --overwrite", then failed after drawing
    (tmp_path / "shots.png").mkdir()
    r4 = subprocess.run(cmd[:-4] + ["--out", str(tmp_path / "shots.png"), "--overwrite", "--device", "cpu"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r4.returncode == 2 and "is a folder; give --out a file name" in r4.stderr, r4.stderr
    assert list((tmp_path / "shots.png").iterdir()) == []


def test_cli_sample_draws_on_the_zero_terminal_snr_schedule_when_asked(tmp_path):
    from PIL import Image

    from lib_sdtrain.cli import main

    model = make_tiny_checkpoint(tmp_path / "v.safetensors", "sd2")
    args = ["sample", str(model), "--prompt", "a red circle", "--seed", "3", "--steps", "3", "--width", "64",
            "--height", "64", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(args + ["--out", str(tmp_path / "zero.png"), "--zero-terminal-snr"]) == 0
    with Image.open(tmp_path / "plain.png") as a, Image.open(tmp_path / "zero.png") as b:
        assert a.size == b.size == (64, 64) and a.tobytes() != b.tobytes()


def test_cli_sample_warns_when_zero_terminal_snr_meets_a_noise_predicting_model(tmp_path, capsys):
    # train refuses zero_terminal_snr on an eps model; sample drew it without a word (the pictures are noise or
    # flat colour). It still draws, as A1111 does, but says why the result will be poor.
    from lib_sdtrain.cli import main

    args = ["sample", "--prompt", "a red circle", "--steps", "2", "--width", "64", "--height", "64", "--device",
            "cpu", "--zero-terminal-snr"]
    for family, prediction in (("sd1", "eps"), ("sd2", "v")):
        model = make_tiny_checkpoint(tmp_path / f"{family}.safetensors", family)
        out = tmp_path / f"{family}.png"
        assert main([args[0], str(model), *args[1:], "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert out.is_file()                                          # drawn either way
        if prediction == "eps":
            assert "warning: --zero-terminal-snr" in err and "predicts the noise (eps)" in err, err
        else:
            assert "warning" not in err, err
