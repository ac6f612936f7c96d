"""Loss and noise options (kohya's loss_type / huber_*, multires_noise_*, ip_noise_gamma,
debiased_estimation_loss): each follows its definition and is reproducible from the run's generator; l2 with
every option off is the MSE the loop always used; a run with an option trains, differs from the plain run, and
says so in its file; bad thresholds are refused."""

import math

import pytest
import torch
from conftest import make_dataset
from safetensors import safe_open

from lib_sdtrain.errors import UserError
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train import noise as N
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import HUBER_SCHEDULES, LOSS_TYPES, TrainSettings

AC = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)   # SD's scaled-linear ᾱ


def test_elementwise_losses_follow_their_formulas():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    d = pred - target
    assert torch.allclose(N.elementwise_loss(pred, target), torch.nn.functional.mse_loss(pred, target,
                                                                                           reduction="none"))
    assert torch.allclose(N.elementwise_loss(pred, target, "l1"), d.abs())
    delta = torch.tensor([0.1, 1.0, 5.0])
    dl = delta.view(-1, 1, 1, 1)
    smooth = N.elementwise_loss(pred, target, "smooth_l1", delta)
    huber = N.elementwise_loss(pred, target, "huber", delta)
    assert torch.allclose(smooth, 2 * (torch.sqrt(d ** 2 + dl ** 2) - dl), rtol=1e-4, atol=1e-5)  # naive form
    assert torch.allclose(huber, smooth * dl)
    # pseudo-Huber: ≈ d² well inside δ, ≈ 2δ|d| - 2δ² far outside it
    small, big = torch.full((1, 1, 1, 1), 1e-3), torch.full((1, 1, 1, 1), 1e3)
    one = torch.tensor([1.0])
    assert math.isclose(float(N.elementwise_loss(small, torch.zeros(1, 1, 1, 1), "huber", one)), 1e-6, rel_tol=1e-3)
    assert math.isclose(float(N.elementwise_loss(big, torch.zeros(1, 1, 1, 1), "huber", one)), 2e3 - 2, rel_tol=1e-3)
    with pytest.raises(ValueError, match="threshold"):
        N.elementwise_loss(pred, target, "huber")
    with pytest.raises(ValueError, match="unknown loss type"):
        N.elementwise_loss(pred, target, "l3")


def test_huber_thresholds_follow_the_noise_level():
    ac = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000), 0)
    t = torch.tensor([0, 250, 500, 999])
    const = N.huber_thresholds(t, ac, 0.2, "constant", 0.5)
    assert torch.allclose(const, torch.full((4,), 0.1))
    exp = N.huber_thresholds(t, ac, 0.1, "exponential", 2.0)
    assert torch.allclose(exp, 2.0 * 0.1 ** (t.float() / 1000))               # from 2 at t = 0 to 0.2 at T
    snr = N.huber_thresholds(t, ac, 0.1, "snr", 123.0)                        # the scale is not used by snr
    sigma = ((1 - ac[t]) / ac[t]).sqrt()
    assert torch.allclose(snr, 0.1 + 0.9 / (1 + sigma) ** 2)
    assert snr[0] > 0.9 and snr[-1] < 0.11 and bool((snr[1:] < snr[:-1]).all())
    with pytest.raises(ValueError):
        N.huber_thresholds(t, ac, 0.1, "linear")
    assert set(LOSS_TYPES) == {"l2", "l1", "huber", "smooth_l1"} and set(HUBER_SCHEDULES) == {"snr", "exponential",
                                                                                             "constant"}


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


def test_random_and_adaptive_offsets_and_random_perturbation_draw_as_kohya_describes():
    latents = torch.zeros(64, 4, 8, 8)
    latents[:, 0] += 2.0                                              # channel 0 far from mid-grey
    plain = N.make_noise(latents, torch.Generator().manual_seed(5), 0.1)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(latents.shape, generator=g)
    assert torch.allclose(plain, base + 0.1 * torch.randn((64, 4, 1, 1), generator=g))   # off: the plain draws
    g = torch.Generator().manual_seed(5)
    base = torch.randn(latents.shape, generator=g)
    u = torch.rand(1, generator=g)
    got = N.make_noise(latents, torch.Generator().manual_seed(5), 0.1, random_strength=True)
    assert torch.allclose(got, base + 0.1 * u * torch.randn((64, 4, 1, 1), generator=g)) and 0 <= u < 1
    # adaptive: the offset of channel 0 grows by scale x |mean| = 0.05 x 2; the others keep 0.1
    g = torch.Generator().manual_seed(5)
    base = torch.randn(latents.shape, generator=g)
    shift = torch.randn((64, 4, 1, 1), generator=g)
    got = N.make_noise(latents, torch.Generator().manual_seed(5), 0.1, adaptive=0.05)
    want = torch.full((64, 4, 1, 1), 0.1)
    want[:, 0] = 0.2
    assert torch.allclose(got, base + want * shift, atol=1e-6)
    floor = N.make_noise(latents, torch.Generator().manual_seed(5), 0.1, adaptive=-1.0)   # 0.1 - 2, floored at 0
    assert torch.allclose(floor[:, 0], base[:, 0]) and torch.allclose(floor[:, 1:], base[:, 1:] + 0.1 * shift[:, 1:])
    noise = torch.randn(2, 4, 8, 8)
    g = torch.Generator().manual_seed(3)
    gamma = 0.1 * float(torch.rand(1, generator=g))
    want = noise + gamma * torch.randn(noise.shape, generator=g)
    assert torch.allclose(N.perturb(noise, torch.Generator().manual_seed(3), 0.1, random_strength=True), want)
    for over, needs in (({"noise_offset_random_strength": True}, "noise_offset"),
                        ({"adaptive_noise_scale": 0.01}, "noise_offset"),
                        ({"ip_noise_gamma_random_strength": True}, "ip_noise_gamma")):
        with pytest.raises(UserError, match=f"set {needs}"):
            TrainSettings.from_dict(over).validate()


def test_debiased_weights_are_one_over_root_snr_capped():
    t = torch.tensor([0, 10, 500, 999])
    snr = AC[t] / (1 - AC[t])
    eps = N.debiased_weights(t, AC, "eps")
    assert torch.allclose(eps[1:], 1 / snr[1:].sqrt()) and float(eps[0]) >= 1 / 1000 ** 0.5 - 1e-6
    assert torch.allclose(N.debiased_weights(t, AC, "v"), 1 / (torch.clamp(snr, max=1000) + 1))
    assert bool((eps[1:] > eps[:-1]).all())                                # noisier steps weigh more


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss")
    return {"model": make_tiny_checkpoint(root / "tiny.safetensors", "sd1"), "data": make_dataset(root / "data", n=2)}


def run(world, tmp_path, name, **over):
    cfg = TrainSettings.from_dict({
        "model": str(world["model"]), "data": str(world["data"]), "output": str(tmp_path / name), "name": name,
        "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 2, "epochs": 1, "max_steps": 3,
        "optimizer": "sgd", "learning_rate": 0.5, "save_every_n_epochs": 0, "save_state": False,
        "tensorboard": False, "lora": {"network_dim": 4, "save_dtype": "fp32"}, **over})
    result = train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host"))
    with safe_open(str(result.final), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}, result   # noqa: SIM118 - no __iter__


@pytest.fixture(scope="module")
def plain(world, tmp_path_factory):
    return run(world, tmp_path_factory.mktemp("plain"), "l2")


def test_a_huber_run_trains_differs_from_l2_and_says_so(world, tmp_path, plain):
    meta2, l2, r2 = plain
    assert (meta2["ss_loss_type"], meta2["ss_huber_schedule"], meta2["ss_huber_c"]) == ("l2", "snr", "0.1")
    metah, hub, rh = run(world, tmp_path, "hub", loss_type="huber", huber_schedule="exponential", huber_c=0.05,
                         huber_scale=2.0)
    assert (metah["ss_loss_type"], metah["ss_huber_schedule"], metah["ss_huber_c"], metah["ss_huber_scale"]) == \
        ("huber", "exponential", "0.05", "2.0")
    ups = [k for k in hub if "lora_up" in k]
    assert ups and any(hub[k].abs().sum() > 0 for k in ups)                     # it trained
    assert any(not torch.allclose(hub[k], l2[k]) for k in ups)                  # with another loss
    assert all(math.isfinite(v) for v in rh.losses) and rh.losses != r2.losses


@pytest.mark.parametrize("over", [{"huber_c": 0.0}, {"huber_scale": 0.0}])
def test_a_zero_threshold_is_refused_for_the_huber_losses(over):
    with pytest.raises(UserError, match="must be above 0"):
        TrainSettings.from_dict({"loss_type": "smooth_l1", **over})
    TrainSettings.from_dict({"loss_type": "l2", **over})       # unused by l2: not an error
    with pytest.raises(UserError):
        TrainSettings.from_dict({"loss_type": "cross_entropy"})


def test_each_noise_option_changes_the_training_and_is_recorded(world, tmp_path, plain):
    meta, plain, _ = plain
    assert (meta["ss_multires_noise_iterations"], meta["ss_ip_noise_gamma"], meta["ss_debiased_estimation"]) == \
        ("None", "None", "False")
    _, again, _ = run(world, tmp_path, "again")
    assert all(torch.equal(plain[k], again[k]) for k in plain)                # off: the same run every time
    for name, over, key, value in (
            ("multires", {"multires_noise_iterations": 6, "multires_noise_discount": 0.4},
             "ss_multires_noise_iterations", "6"),
            ("ip", {"ip_noise_gamma": 0.1}, "ss_ip_noise_gamma", "0.1"),
            ("debiased", {"debiased_estimation_loss": True}, "ss_debiased_estimation", "True"),
            ("offset-random", {"noise_offset": 0.1, "noise_offset_random_strength": True},
             "ss_noise_offset_random_strength", "True"),
            ("offset-adaptive", {"noise_offset": 0.1, "adaptive_noise_scale": 0.01}, "ss_adaptive_noise_scale",
             "0.01"),
            ("ip-random", {"ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True},
             "ss_ip_noise_gamma_random_strength", "True")):
        meta, got, _ = run(world, tmp_path, name, **over)
        assert meta[key] == value, name
        ups = [k for k in got if "lora_up" in k]
        assert any(not torch.allclose(got[k], plain[k]) for k in ups), name
        assert all(torch.isfinite(got[k]).all() for k in got), name


def test_zero_terminal_snr_ends_the_schedule_in_pure_noise():
    new = N.zero_terminal_snr(AC)
    assert new.shape == AC.shape and new.dtype == AC.dtype
    assert math.isclose(float(new[0]), float(AC[0]), rel_tol=1e-6) and float(new[-1]) == pytest.approx(4.8973e-08, rel=1e-4)
    assert bool((new[1:] <= new[:-1]).all())                                    # still falls step by step
    root, old = new[:-1].double().sqrt(), AC[:-1].double().sqrt()              # √ᾱ: one straight-line map
    slope = (root[-1] - root[0]) / (old[-1] - old[0])
    stretch = float(AC[0].sqrt() / (AC[0].sqrt() - AC[-1].sqrt()))           # first stays, last goes to 0
    assert float(slope) == pytest.approx(stretch, rel=1e-4)
    assert torch.allclose(root, (old - old[0]) * stretch + root[0], atol=2e-6)
    snr = new / (1 - new)
    assert torch.isfinite(N.min_snr_weights(torch.arange(1000), new, 5.0, "v")).all() and float(snr[-1]) < 1e-7


def test_zero_terminal_snr_trains_a_v_model_and_refuses_a_noise_predicting_one(world, tmp_path):
    with pytest.raises(UserError, match="v-prediction"):
        run(world, tmp_path, "ztsnr-eps", zero_terminal_snr=True)
    v_world = {"model": make_tiny_checkpoint(tmp_path / "v.safetensors", "sd2"), "data": world["data"]}
    meta_plain, plain_v, _ = run(v_world, tmp_path, "v-plain")
    meta, got, _ = run(v_world, tmp_path, "v-ztsnr", zero_terminal_snr=True)
    assert (meta_plain["ss_zero_terminal_snr"], meta["ss_zero_terminal_snr"]) == ("False", "True")
    ups = [k for k in got if "lora_up" in k]
    assert all(torch.isfinite(got[k]).all() for k in got)
    assert any(not torch.allclose(got[k], plain_v[k]) for k in ups)             # the schedule changed the training


def test_control_pictures_of_a_zero_terminal_snr_run_are_drawn_on_its_schedule(tmp_path):
    """The standalone sampler starts a zero_terminal_snr request from the rescaled schedule's top (σ of the floor,
    about 4,518) and draws another picture than the stored schedule does; the run's control pictures ask for it."""
    from lib_sdtrain.hosts import SampleRequest
    from lib_sdtrain.sampling import Denoiser
    from lib_sdtrain.train import loop

    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host")
    parts = host.load(str(make_tiny_checkpoint(tmp_path / "v.safetensors", "sd2")))
    cond = parts.encode_text(["a red circle"])
    top = Denoiser(parts, cond, cond, 1.0, zero_terminal_snr=True).schedule(4)[0]
    floor = N.ZERO_TERMINAL_FLOOR
    assert float(top) == pytest.approx(((1 - floor) / floor) ** 0.5, rel=1e-6)
    assert float(Denoiser(parts, cond, cond, 1.0).schedule(4)[0]) < 200                    # the stored schedule
    req = {"prompt": "a red circle", "seed": 1, "steps": 3, "cfg_scale": 3.0, "width": 64, "height": 64}
    plain, zero = (host.sample(parts, [SampleRequest(**req, zero_terminal_snr=z)])[0] for z in (False, True))
    assert plain.tobytes() != zero.tobytes()
    cfg = TrainSettings.from_dict({"model": "m", "data": "d", "zero_terminal_snr": True,
                                   "sample_prompts": ["a red circle"], "sample_every_n_steps": 1})
    controls = loop.ControlPictures(cfg, host, parts, tmp_path / "run", None, None)
    assert controls.requests and all(r.zero_terminal_snr for rs in controls.requests.values() for r in rs)
