"""The VRAM estimate: its reference points and that each setting moves it the right way."""

import pytest

from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train.estimate import estimate_vram, family_of_file, trained_parameters
from lib_sdtrain.train.settings import TrainSettings


def cfg(**kw):
    lora = kw.pop("lora", {})
    return TrainSettings.from_dict({"resolution": 512, **kw, "lora": lora})


def test_reference_points():
    # commonly reported footprints: SD1.5 LoRA at 512, batch 1, fp16, no checkpointing ≈ 5–7 GB;
    # SDXL LoRA at 1024, batch 1, checkpointing, text encoders trained ≈ 11–16 GB
    sd1 = estimate_vram(cfg(mixed_precision="fp16"), "sd1")
    assert 5.0 < sd1.total_gb < 7.0
    xl = estimate_vram(cfg(resolution=1024, mixed_precision="bf16", gradient_checkpointing=True,
                           lora={"network_dim": 32}), "sdxl")
    assert 11.0 < xl.total_gb < 16.0
    # the parts add up to the total (× fragmentation)
    assert xl.total_gb == pytest.approx(sum(xl.parts.values()) * 1.1)
    assert "GB" in sd1.text and "checkpointing would save" in sd1.text


def test_each_setting_moves_the_estimate_the_right_way():
    base = estimate_vram(cfg(), "sd1").total_gb
    assert estimate_vram(cfg(batch_size=4), "sd1").total_gb > base + 5
    assert estimate_vram(cfg(resolution=768), "sd1").total_gb > base
    assert estimate_vram(cfg(gradient_checkpointing=True), "sd1").total_gb < base - 1.5
    assert estimate_vram(cfg(optimizer="adamw8bit", lora={"network_dim": 128}), "sd1").total_gb < \
        estimate_vram(cfg(optimizer="adamw", lora={"network_dim": 128}), "sd1").total_gb
    assert estimate_vram(cfg(cache_latents=False, gradient_checkpointing=True), "sd1").total_gb > \
        estimate_vram(cfg(cache_latents=True, gradient_checkpointing=True), "sd1").total_gb
    assert estimate_vram(cfg(), "sdxl").total_gb > 2 * base
    assert estimate_vram(cfg(), "sd1", model_dtype="fp32").total_gb > base + 1.5


def test_trained_parameters_follow_the_lora_settings():
    p16 = trained_parameters(cfg(lora={"network_dim": 16}), "sd1")
    assert trained_parameters(cfg(lora={"network_dim": 32}), "sd1") == pytest.approx(2 * p16)
    assert trained_parameters(cfg(lora={"network_dim": 16, "train_text_encoder": False}), "sd1") < p16
    assert trained_parameters(cfg(lora={"network_dim": 16, "targets": "attn"}), "sd1") < p16
    assert trained_parameters(cfg(lora={"network_dim": 16, "targets": "full"}), "sd1") > p16
    assert trained_parameters(cfg(lora={"network_dim": 16, "network_type": "lokr"}), "sd1") < p16
    # SD1.5 kohya LoRA at dim 32 (attn_mlp, UNet + text encoder) is a ≈ 38 MB fp16 file: ≈ 19M parameters
    assert 15e6 < trained_parameters(cfg(lora={"network_dim": 32}), "sd1") < 23e6


def test_family_from_the_file_header(tmp_path):
    for fam in ("sd1", "sdxl"):
        path = make_tiny_checkpoint(tmp_path / f"{fam}.safetensors", fam)
        assert family_of_file(path) == fam
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    assert family_of_file(tmp_path / "bad.safetensors") is None
    assert family_of_file(tmp_path / "missing.safetensors") is None
    assert family_of_file(tmp_path / "x.ckpt") is None
