"""Full fine-tuning on tiny SD1 / SDXL models through `train()`: block selection, EMA, resume, restoring.

Checked: `train_blocks` picks the same regions in diffusers and LDM naming and only those weights change in
the saved file; with EMA on the EMA differs from the raw weights and is exactly what is saved; a stopped and
resumed run (weights + EMA) equals an uninterrupted one; the lent model is bit-identical afterwards.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

import lib_sdtrain.train.loop as loop
from lib_sdtrain.errors import UserError
from lib_sdtrain.events import Events, StopToken
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.methods.finetune import FinetuneMethod, FinetuneSettings
from lib_sdtrain.methods.fullmodel import parse_train_blocks, select_unet_parameters
from lib_sdtrain.models.checkpoint import load_checkpoint
from lib_sdtrain.testing.tiny import build_tiny, make_tiny_checkpoint
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings


pytestmark = pytest.mark.usefixtures("one_thread")


def make_captioned(root, n=4):
    """A caption-driven set over several concepts (EveryDream style: one folder, a sentence per picture)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0), "yellow": (255, 255, 0)}
    for i, (word, rgb) in enumerate(list(colours.items())[:n]):
        arr = np.zeros((64, 64, 3), np.uint8) + rng.integers(0, 120, 3, dtype=np.uint8)
        arr[8 + 4 * i:40 + 4 * i, 16:48] = rgb
        Image.fromarray(arr).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {word} square on a dark background")
    return root


def settings(tmp_path, model, **ft):
    return TrainSettings.from_dict({
        "method": "finetune", "model": str(model), "data": str(make_captioned(tmp_path / "data")),
        "output": str(tmp_path / "out"), "name": "ft", "resolution": 64, "min_bucket": 64, "max_bucket": 64,
        "batch_size": 2, "epochs": 3, "max_steps": 5, "learning_rate": 1e-3, "tensorboard": False,
        "save_every_n_epochs": 0, "finetune": ft})


def host_for(tmp_path):
    return StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")


def test_train_blocks_name_the_same_regions_in_both_namings():
    unet = build_tiny("sd1").unet
    names = [n for n, _ in unet.named_parameters()]
    assert select_unet_parameters(unet, "diffusers", "all") == names
    up = select_unet_parameters(unet, "diffusers", "up")
    assert up and all(n.startswith("up_blocks.") for n in up)
    mid_up = select_unet_parameters(unet, "diffusers", "mid,up")
    assert set(mid_up) == set(up) | {n for n in names if n.startswith("mid_block.")}
    attn = select_unet_parameters(unet, "diffusers", "attn")
    assert attn and all(".attn1." in n or ".attn2." in n for n in attn)
    assert {n.split(".attn")[1][:2] for n in attn} == {"1.", "2."}
    blocks = select_unet_parameters(unet, "diffusers", "up,transformer")
    assert set(attn) & set(up) < set(blocks) and any(".proj_in." in n for n in blocks)
    assert all(".attentions." in n and n.startswith("up_blocks.") for n in blocks)

    class SpatialTransformer(nn.Module):   # the class name A1111's LDM/SGM UNets use
        def __init__(self):
            super().__init__()
            self.proj_in = nn.Linear(2, 2)
            self.attn1 = nn.Module()
            self.attn1.to_q = nn.Linear(2, 2)

    ldm = nn.Module()
    ldm.time_embed = nn.Linear(2, 2)
    ldm.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(2, 2, 1), SpatialTransformer())])
    ldm.middle_block = nn.Sequential(nn.Conv2d(2, 2, 1))
    ldm.output_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(2, 2, 1), SpatialTransformer())])
    ldm.out = nn.Conv2d(2, 2, 1)
    assert select_unet_parameters(ldm, "ldm", "mid") == ["middle_block.0.weight", "middle_block.0.bias"]
    assert select_unet_parameters(ldm, "ldm", "down,attn") == ["input_blocks.0.1.attn1.to_q.weight",
                                                               "input_blocks.0.1.attn1.to_q.bias"]
    assert select_unet_parameters(ldm, "ldm", "up,transformer") == [
        "output_blocks.0.1.proj_in.weight", "output_blocks.0.1.proj_in.bias",
        "output_blocks.0.1.attn1.to_q.weight", "output_blocks.0.1.attn1.to_q.bias"]
    assert "time_embed.weight" in select_unet_parameters(ldm, "ldm", "all")
    assert parse_train_blocks("all, attn") == (set(), "attn")
    for bad in ("", "sideways", "attn,transformer"):
        with pytest.raises(UserError, match="train_blocks"):
            parse_train_blocks(bad)


def test_only_the_chosen_blocks_change(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base.safetensors", "sd1")
    result = train(settings(tmp_path, base, train_blocks="mid,up", save_precision="fp32"), host_for(tmp_path))
    before, after = load_file(str(base)), load_file(str(result.final))
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    unet = "model.diffusion_model."
    assert changed and all(k.startswith((unet + "middle_block.", unet + "output_blocks.")) for k in changed)
    assert any(k.startswith(unet + "middle_block.") for k in changed)
    assert any(k.startswith(unet + "output_blocks.") for k in changed)


def capture_method(monkeypatch):
    made = []
    real = loop.make_method

    def make(cfg):
        made.append(real(cfg))
        return made[-1]

    monkeypatch.setattr(loop, "make_method", make)
    return made


def test_ema_differs_from_the_raw_weights_and_is_what_is_saved(tmp_path, monkeypatch):
    base = make_tiny_checkpoint(tmp_path / "base.safetensors", "sdxl")
    made, seen = capture_method(monkeypatch), {}

    def at_final_save(event):
        if event.kind == "saved" and event.data.get("final"):
            method = made[-1]
            seen["ema"] = {k: v.clone() for k, v in method.ema_weights().items()}
            seen["raw"] = {f"{r.key}.{n}": p.detach().clone() for r in method._roots
                           for n, p in method._trained_params(r)}

    cfg = settings(tmp_path, base, ema=True, ema_decay=0.9, train_text_encoder=True, save_precision="fp32")
    result = train(cfg, host_for(tmp_path), Events(at_final_save))
    ema, raw = seen["ema"], seen["raw"]
    assert set(ema) == set(raw) and any(k.startswith("text_encoder1.") for k in ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    back = load_checkpoint(result.final)
    sd = back.unet.state_dict()
    assert all(torch.equal(sd[k[len("unet."):]], v) for k, v in ema.items() if k.startswith("unet."))
    te = back.text_encoders[1].state_dict()
    assert all(torch.equal(te[k[len("text_encoder1."):]], v) for k, v in ema.items()
               if k.startswith("text_encoder1.") and k[len("text_encoder1."):] in te)
    from lib_sdtrain.formats.safetensors_io import read_metadata

    meta = read_metadata(result.final)
    assert meta["lab.weights"] == "ema" and meta["lab.ema_updates"] == "5" and meta["lab.method"] == "finetune"


def test_ema_follows_the_weights_with_warmup():
    parts_like = build_tiny("sd1")

    class Parts:
        unet, text_encoders, module_naming = parts_like.unet, parts_like.text_encoders, "diffusers"
        info = None

    method = FinetuneMethod(FinetuneSettings(ema=True, ema_decay=0.5, train_blocks="mid"))
    method.attach(Parts())
    try:
        name, p = method._trained_params(method._roots[0])[0]
        start = p.detach().clone()
        with torch.no_grad():
            p.add_(1.0)
        method.after_step(1)   # warm-up: decay min(0.5, 1/10) = 0.1
        assert torch.allclose(method.ema_weights()[f"unet.{name}"], 0.1 * start + 0.9 * (start + 1))
    finally:
        method.detach()


def test_resume_with_ema_equals_an_uninterrupted_run(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base.safetensors", "sd1")
    cfg = settings(tmp_path, base, ema=True, ema_decay=0.8, train_blocks="up,transformer", save_precision="fp32")
    full = train(cfg.replace(name="full"), host_for(tmp_path))
    stop = StopToken()
    events = Events(lambda e: stop.request() if e.kind == "loss" and e.data["step"] == 2 else None)
    part = train(cfg.replace(name="part"), host_for(tmp_path), events, stop)
    assert part.stopped == "stopped" and part.steps == 2
    resumed = train(cfg.replace(name="part", resume=str(part.run_dir)), host_for(tmp_path))
    a, b = load_file(str(full.final)), load_file(str(resumed.final))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_lent_fp16_model_is_restored_after_a_stopped_run(tmp_path, monkeypatch):
    base = make_tiny_checkpoint(tmp_path / "base.safetensors", "sd1", dtype=torch.float16)
    host = StandaloneHost(device="cpu", dtype="bf16", output_root=tmp_path / "outputs")
    parts = host.load(str(base))
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (parts.unet, *parts.text_encoders)]
    monkeypatch.setattr(host, "load", lambda model=None: parts)
    stop = StopToken()
    events = Events(lambda e: stop.request() if e.kind == "loss" and e.data["step"] == 2 else None)
    cfg = settings(tmp_path, base, ema=True, train_text_encoder=True).replace(mixed_precision="bf16")
    result = train(cfg, host, events, stop)
    assert result.stopped == "stopped"
    for m, state in zip((parts.unet, *parts.text_encoders), before):
        now = m.state_dict()
        assert all(torch.equal(now[k], v) and now[k].dtype == v.dtype for k, v in state.items())
        assert not any(p.requires_grad for p in m.parameters()) and not m.training


# ---- NAME.yaml beside the checkpoint --------------------------------------------------------------------
def test_a_leftover_yaml_makes_the_name_taken_and_overwriting_makes_it_the_bases(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "models" / "base.safetensors", "sd1")
    base_yaml = b"model:\n  target: the base's own config\n"
    cfg = settings(tmp_path, base, save_precision="fp32").replace(max_steps=1, save_state=False)
    out = tmp_path / "out"
    out.mkdir()
    for leftover in ("ft.yaml", "ft.yml", "ft-000001.yaml"):
        (out / leftover).write_text("the user's own config")
        with pytest.raises(UserError, match=rf"output name 'ft' is taken \(.*{leftover}\)"):
            train(cfg, host_for(tmp_path))
        assert (out / leftover).read_text() == "the user's own config"    # never touched without overwrite
        (out / leftover).unlink()
    # a LoRA writes no yaml: a NAME.yaml beside its output is not its business
    (out / "lo.yaml").write_text("someone's")
    lora = TrainSettings.from_dict({**cfg.to_dict(), "method": "lora", "name": "lo",
                                    "lora": {"network_dim": 2, "network_alpha": 2}})
    assert train(lora, host_for(tmp_path)).stopped == ""

    # overwriting: a yaml that differs from the base's is replaced by it, one the base lacks is removed
    base.with_suffix(".yaml").write_bytes(base_yaml)
    (out / "ft.yaml").write_text("the user's own config")
    (out / "ft.yml").write_text("another stale config")
    result = train(cfg.replace(overwrite=True), host_for(tmp_path))
    assert result.final == out / "ft.safetensors"
    assert (out / "ft.yaml").read_bytes() == base_yaml and not (out / "ft.yml").exists()
    same = (out / "ft.yaml").stat().st_mtime_ns
    train(cfg.replace(overwrite=True), host_for(tmp_path))              # equal to the base's: left as it is
    assert (out / "ft.yaml").stat().st_mtime_ns == same
    base.with_suffix(".yaml").unlink()                                 # the base has none: no yaml may pair
    train(cfg.replace(overwrite=True), host_for(tmp_path))
    assert not (out / "ft.yaml").exists()
