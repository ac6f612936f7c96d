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


def _sdxl_header(**unet):
    """{key: shape} of a full-size SDXL checkpoint with `unet` changes to the stock UNet config (meta device: no
    memory, no file)."""
    from lib_sdtrain.models import checkpoint as ckpt
    from lib_sdtrain.testing.fullsize import sdxl_architecture

    arch = sdxl_architecture()
    arch.unet.update(unet)
    parts = ckpt.build_modules(arch, empty=True)
    return {k: tuple(v.shape) for k, v in ckpt.ldm_state_dict(arch, *parts).items()}


# SSD-1B's published layout: transformer depth per block 0 0 2 2 4 4 down, 4 4 10 2 1 1 0 0 0 up (output_blocks order),
# a middle block that is one res block
SSD_1B = {"transformer_layers_per_block": [1, 2, 4], "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1],
                                                                                             [1, 1, 1]],
          "mid_block_type": "UNetMidBlock2D"}


def test_a_distilled_sdxl_is_estimated_from_its_own_layout():
    # was: every SDXL file got stock SDXL's public sizes (a 2.6 B UNet) whatever its layout
    from lib_sdtrain.train.estimate import FAMILY, sizes_from_shapes

    settings = cfg(resolution=1024, gradient_checkpointing=True, lora={"network_dim": 32})
    stock = sizes_from_shapes(_sdxl_header(), "sdxl")
    # the stock layout's own counts are the public figures, and its layout scales nothing
    assert stock["unet"] == pytest.approx(FAMILY["sdxl"]["unet"], rel=1e-3)
    assert stock["text"] == pytest.approx(FAMILY["sdxl"]["text"], rel=1e-2)
    assert stock["act"] == FAMILY["sdxl"]["act"] and stock["attn_scale"] == 1.0
    assert estimate_vram(settings, "sdxl", sizes=stock).total_gb == pytest.approx(
        estimate_vram(settings, "sdxl").total_gb, rel=0.01)

    ssd = sizes_from_shapes(_sdxl_header(**SSD_1B), "sdxl")
    assert 1300 < ssd["unet"] < 1350                  # SSD-1B's published size: 1.3 B UNet parameters
    assert ssd["text"] == stock["text"] and ssd["vae"] == stock["vae"]
    assert 0.4 < ssd["act"] / stock["act"] < 0.8      # about half the transformer blocks, all at low resolution
    assert 0.4 < ssd["attn_scale"] < 0.6
    small, full = estimate_vram(settings, "sdxl", sizes=ssd), estimate_vram(settings, "sdxl")
    assert small.parts["weights"] == pytest.approx(full.parts["weights"] * (1331 + 818 + 84) / (2567 + 817 + 84),
                                                   rel=0.01)
    assert small.total_gb < full.total_gb - 3
    unet_only = cfg(resolution=1024, lora={"network_dim": 32, "train_text_encoder": False})
    assert estimate_vram(unet_only, "sdxl", sizes=ssd).trained_params == pytest.approx(
        ssd["attn_scale"] * estimate_vram(unet_only, "sdxl").trained_params)


def test_model_sizes_read_the_files_header(tmp_path):
    from safetensors.torch import save_file

    from lib_sdtrain.models import checkpoint as ckpt
    from lib_sdtrain.testing.tiny import build_tiny
    from lib_sdtrain.train.estimate import model_sizes

    def write(tiny, name):
        path = tmp_path / name
        sd = ckpt.ldm_state_dict(tiny.arch, tiny.unet, tiny.vae, tiny.text_encoders)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))     # no metadata, as SSD-1B ships
        return path

    stock, distilled = build_tiny("sdxl"), build_tiny("sdxl", layout="distilled")
    got = {name: model_sizes(write(t, f"{name}.safetensors")) for name, t in (("stock", stock), ("distilled", distilled))}
    for name, tiny in (("stock", stock), ("distilled", distilled)):
        assert got[name]["unet"] * 1e6 == sum(p.numel() for p in tiny.unet.parameters())
        assert got[name]["vae"] * 1e6 == sum(p.numel() for p in tiny.vae.parameters())
    assert got["distilled"]["act"] != got["stock"]["act"]
    assert model_sizes(tmp_path / "stock.safetensors", "sd1") is None          # another family than asked for
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    assert model_sizes(tmp_path / "bad.safetensors") is None
