"""ui/convert_tab.py handlers without gradio: listing the host's folders, converting a mixed selection into the
right folders, the report (hashes, dropped parts, refusals), host refresh; plus building the widgets when
gradio is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lib_sdtrain.errors import UserError
from lib_sdtrain.formats import hashes
from lib_sdtrain.formats.safetensors_io import read_metadata, write_safetensors
from lib_sdtrain.ui import convert_tab as T


class FakeHost:
    def __init__(self, root: Path):
        self.root = root
        self.refreshed: list[str] = []

    def output_dir(self, kind):
        if kind == "hypernetwork":
            raise KeyError(kind)       # a host without that folder kind
        folder = self.root / {"checkpoint": "Stable-diffusion", "lora": "Lora", "embedding": "embeddings"}[kind]
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def refresh(self, kind):
        self.refreshed.append(kind)


@pytest.fixture()
def setup(tmp_path):
    host = FakeHost(tmp_path / "models")
    ctx = SimpleNamespace(host=lambda: host, components={})
    ckpt_dir = host.output_dir("checkpoint")
    # a pickled checkpoint with an optimizer beside the state dict and an EMA tensor
    torch.save({"state_dict": {"model.w": torch.arange(6.0).reshape(2, 3), "model_ema.w": torch.zeros(2, 3)},
                "optimizer_states": [{"lr": 0.1}], "global_step": 7}, ckpt_dir / "old.ckpt")
    # a diffusers LoRA (text encoder only, CLIP-L shapes: SD1) in a download folder
    p = "text_model.encoder.layers.0.self_attn.q_proj"
    write_safetensors(tmp_path / "downloads" / "style" / "pytorch_lora_weights.safetensors",
                      {f"text_encoder.{p}.lora_A.weight": torch.ones(4, 768),
                       f"text_encoder.{p}.lora_B.weight": torch.ones(768, 4)}, {"format": "pt"})
    (ckpt_dir / "notes.txt").write_text("not a model")
    return host, ctx, tmp_path


def test_lists_host_folders_and_model_files(setup):
    host, ctx, tmp = setup
    folders = T.host_folders(ctx)
    assert set(folders) == {"checkpoint", "lora", "embedding"}          # hypernetwork: the host has none
    assert T.folder_choices(ctx)[0] == str(host.output_dir("checkpoint"))
    assert T.file_choices(str(host.output_dir("checkpoint"))) == [str(host.output_dir("checkpoint") / "old.ckpt")]
    found = T.file_choices(str(tmp / "downloads"))
    assert found == [str(tmp / "downloads" / "style" / "pytorch_lora_weights.safetensors")]
    assert T.file_choices("") == [] and T.file_choices(str(tmp / "nowhere")) == []
    broken = SimpleNamespace(host=lambda: (_ for _ in ()).throw(RuntimeError("no model")))
    assert T.host_folders(broken) == {}


def test_converts_mixed_selection_into_the_right_folders(setup):
    host, ctx, tmp = setup
    ckpt = host.output_dir("checkpoint") / "old.ckpt"
    lora = tmp / "downloads" / "style" / "pytorch_lora_weights.safetensors"
    missing = tmp / "gone.ckpt"
    text, rows = T.run_conversion(ctx, [str(ckpt), str(lora), str(missing)])
    by_name = {r[0]: r for r in rows}
    # the pickle: beside itself (the host lists it), EMA and optimizer dropped and reported
    out = host.output_dir("checkpoint") / "old.safetensors"
    assert by_name["old.ckpt"][1] == "converted" and by_name["old.ckpt"][3] == str(out)
    assert by_name["old.ckpt"][4] == hashes.sha256_file(out)[:10] and by_name["old.ckpt"][5] == hashes.sha256_file(out)
    assert "ema_tensors 1" in by_name["old.ckpt"][6] and "optimizer_states" in by_name["old.ckpt"][6]
    # the LoRA: named after its folder, into the host's LoRA folder, A1111's LoRA short hash (addnet, 12 hex)
    kohya = host.output_dir("lora") / "style.safetensors"
    row = by_name["pytorch_lora_weights.safetensors"]
    assert row[1] == "converted" and row[2] == "lora" and row[3] == str(kohya)
    assert row[4] == hashes.addnet_hash(kohya)[:12] == read_metadata(kohya)["sshs_model_hash"][:12]
    assert read_metadata(kohya)["ss_base_model_version"] == "sd_v1"     # family from the 768-wide shapes
    assert by_name["gone.ckpt"][1] == "refused"
    assert "**2 converted, 1 refused**" in text and "❌ `gone.ckpt`" in text and "dropped:" in text
    assert "A1111 short hash" in text
    assert sorted(host.refreshed) == ["checkpoint", "lora"]
    # again: the pickle is up to date, the LoRA output exists and is refused; with overwrite it is replaced
    host.refreshed.clear()
    text, rows = T.run_conversion(ctx, [str(ckpt), str(lora)])
    assert [r[1] for r in rows] == ["up to date", "refused"] and "already exists" in rows[1][6]
    assert host.refreshed == []
    _, rows = T.run_conversion(ctx, str(lora), "kohya", "", "fp16", True, False, "sd1", "2")
    assert rows[0][1] == "converted" and read_metadata(kohya)["ss_network_alpha"] == "2.0"


def test_output_folder_rules_and_bad_values(setup):
    host, ctx, tmp = setup
    assert T.output_folder(ctx, str(tmp / "a" / "x.ckpt"), "safetensors", "") == tmp / "a"
    (tmp / "a").mkdir()
    assert T.output_folder(ctx, str(tmp / "a"), "safetensors", None) == tmp / "a"   # a folder of pickles
    assert T.output_folder(ctx, str(tmp / "f"), "single-file", "") == host.output_dir("checkpoint")
    assert T.output_folder(ctx, str(tmp / "m.safetensors"), "diffusers", "") == tmp
    assert T.output_folder(ctx, "x", "kohya", str(tmp / "o")) == tmp / "o"
    with pytest.raises(UserError, match="at least one"):
        T.run_conversion(ctx, [])
    with pytest.raises(UserError, match="not a number"):
        T.run_conversion(ctx, ["x"], lora_alpha="two")
    with pytest.raises(UserError):
        T.run_conversion(ctx, ["x"], dtype="fp8")
    assert T.parse_alpha(" ") is None and T.parse_alpha("4") == 4.0


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed")
def test_build_makes_the_widgets(setup):
    import gradio as gr

    host, ctx, _ = setup
    with gr.Blocks():
        T.build(ctx)
    files = ctx.components["convert.files"]
    assert str(host.output_dir("checkpoint") / "old.ckpt") in [c if isinstance(c, str) else c[1]
                                                                for c in files.choices]
