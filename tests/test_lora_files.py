"""The saved LoRA file: metadata A1111 reads, kohya's hashes inside it, settings, and the safetensors helpers."""

import json

import pytest
import torch

from conftest import GOLDEN
from lib_sdtrain.config import config_from_text, config_to_text
from lib_sdtrain.errors import UserError
from lib_sdtrain.formats import hashes, kohya
from lib_sdtrain.formats.safetensors_io import (kohya_hashes, read_metadata, read_safetensors, serialize,
                                                 write_safetensors)
from lib_sdtrain.methods.lora import LoraMethod, LoraSettings
from lib_sdtrain.testing.tiny import build_tiny
from test_lora_train import TinyParts

pytestmark = pytest.mark.usefixtures("one_thread")

# Keys kohya's train_network.py always writes that we can fill, plus what A1111 reads (golden lora_metadata).
REQUIRED = ["ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
            "ss_output_name", "ss_sd_model_name", "ss_new_sd_model_hash", "ss_sd_model_hash", "ss_clip_skip",
            "ss_training_started_at", "ss_training_finished_at", "ss_session_id", "ss_steps", "ss_epoch",
            "ss_resolution", "ss_learning_rate", "ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info",
            "sshs_model_hash", "sshs_legacy_hash", "modelspec.sai_model_spec", "modelspec.architecture",
            "modelspec.implementation", "modelspec.title", "modelspec.resolution", "modelspec.date",
            "modelspec.prediction_type", "lab.config", "lab.network"]
EXPECT = {  # family: (ss_base_model_version, ss_v2, modelspec architecture, implementation, resolution, prediction)
    "sd1": ("sd_v1", "False", "stable-diffusion-v1/lora", "diffusers", "512x512", "epsilon"),
    "sd2": ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768", "v"),
    "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
             "https://github.com/Stability-AI/generative-models", "1024x1024", "epsilon"),
}
RUN_INFO = {  # what the loop passes: str values (its own run_info) ...
    "ss_output_name": "my-lora", "ss_steps": "2", "ss_epoch": "1", "ss_learning_rate": "0.0001",
    "ss_tag_frequency": json.dumps({"5_cat": {"cat": 3}}), "ss_dataset_dirs": json.dumps({"5_cat": {"n_repeats": 5,
                                                                                             "img_count": 3}}),
    "ss_bucket_info": json.dumps({"buckets": {"0": {"resolution": [512, 512], "count": 15}}}),
    "lab.config": json.dumps({"version": 1, "method": "lora"}),
}


def _a1111_version(meta):
    """A1111's `NetworkOnDisk.detect_version` (golden a1111_defaults.json lora_metadata)."""
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_metadata_and_hashes(family, tmp_path):
    parts = TinyParts(build_tiny(family))
    method = LoraMethod(LoraSettings(network_type="locon", network_dim=4, network_alpha=2, conv_dim=2))
    method.attach(parts)
    try:
        path = method.save(tmp_path / "out.safetensors", {**RUN_INFO, "ss_network_dim": "999"},
                           run_info={"ss_resolution": (512, 512), "ss_v2": "nonsense"})
        second = method.save(tmp_path / "out-000002.safetensors", RUN_INFO)
    finally:
        method.detach()
    meta = read_metadata(path)
    tensors, meta2 = read_safetensors(path)
    assert meta == meta2 and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    missing = [k for k in REQUIRED if k not in meta]
    assert not missing, missing
    version, v2, arch, impl, reso, pred = EXPECT[family]
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == (version, v2)
    assert _a1111_version(meta) == {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[family]
    assert meta["modelspec.architecture"] == arch and meta["modelspec.implementation"] == impl
    assert meta["modelspec.resolution"] == "512x512"           # from ss_resolution, not the family default
    assert meta["modelspec.prediction_type"] == pred and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.title"] == "my-lora" == meta["ss_output_name"]
    # the network's own keys win over the caller's
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert meta["ss_resolution"] == "(512, 512)" and meta["ss_sd_model_name"] == f"tiny-{family}"
    assert meta["lab.config"] == RUN_INFO["lab.config"]
    assert json.loads(meta["lab.network"])["network_type"] == "locon"
    # A1111 JSON-decodes values starting with '{': these must be valid JSON
    for k, v in meta.items():
        if v.startswith("{"):
            json.loads(v)
    # kohya's hashes, inside the file: the addnet hash of the file itself, and the legacy one of its ss_-only form
    assert meta["sshs_model_hash"] == hashes.addnet_hash(path)
    assert kohya_hashes(tensors, meta) == (meta["sshs_model_hash"], meta["sshs_legacy_hash"])
    assert all(v.dtype == torch.float16 for v in tensors.values())        # save_dtype default
    assert float(meta["ss_training_finished_at"]) >= float(meta["ss_training_started_at"])
    assert read_metadata(second)["ss_session_id"] == meta["ss_session_id"]   # one id per run, like kohya


def test_factored_lokr_is_why_we_write_full_matrices():
    """With `_a/_b` factors, A1111's dim test (tensor truthiness in the source we read) raises; even read as
    `is not None`, the scale becomes alpha/dim, which peft 0.13.2 never applied. Full matrices have neither."""
    import a1111_lora_math as a1111

    torch.manual_seed(0)
    w1, w2a, w2b = torch.randn(4, 4), torch.randn(8, 2), torch.randn(2, 8)
    factored = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(8.0)}
    weight = torch.zeros(32, 32)
    with pytest.raises(RuntimeError, match="ambiguous"):
        a1111.updown(factored, weight)
    trained = torch.kron(w1, w2a @ w2b).double()                             # peft 0.13.2: scale 1
    naive = a1111.updown(factored, weight, lokr_truthiness=False)            # scale alpha / dim = 4
    assert ((naive - trained).norm() / trained.norm()).item() == pytest.approx(3.0)
    full = kohya.lokr_layout(w1, w2a @ w2b, 1.0, (32, 32), rank=2)
    assert ((a1111.updown(full, weight) - trained).norm() / trained.norm()).item() < 1e-6


def test_sd1_prediction_variants():
    assert kohya.BASE_MODEL_VERSION[("sd2", "eps")] == "sd_v2"
    meta = kohya.network_metadata(family="sd2", prediction="eps", network_module="networks.lora", network_dim=8,
                                  network_alpha=4, extra={"ss_resolution": "512", "x": None, "y": {"a": 1}})
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert meta["modelspec.resolution"] == "512x512" and meta["ss_v2"] == "True"
    assert "x" not in meta and meta["y"] == '{"a": 1}' and "ss_network_args" not in meta


def test_legacy_hash_matches_sd_scripts_rule(tmp_path):
    """sshs_legacy_hash = sha256 of the 64 KiB at 1 MiB of the file serialized with only ss_* metadata."""
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(400_000, dtype=torch.float32).reshape(400, 1000)}
    meta = {"ss_network_module": "networks.lora", "modelspec.title": "t"}
    model_hash, legacy = kohya_hashes(tensors, meta)
    data = serialize(tensors, {"ss_network_module": "networks.lora"})
    import hashlib

    assert legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    path = write_safetensors(tmp_path / "h.safetensors", tensors, meta, add_kohya_hashes=True)
    assert read_metadata(path)["sshs_model_hash"] == model_hash == hashes.addnet_hash(path)
    assert read_metadata(path)["sshs_legacy_hash"] == legacy


def test_golden_worked_example_hash(tmp_path):
    ex = json.loads((GOLDEN / "a1111_defaults.json").read_text())["hashes"]["worked_examples"]["example_safetensors"]
    tensors = {"w": torch.ones(2)}
    path = write_safetensors(tmp_path / "hash_example.safetensors", tensors, {"ss_network_module": "networks.lora"})
    assert path.read_bytes().hex() == ex["file_bytes_hex"]
    assert kohya_hashes(tensors, {"ss_network_module": "networks.lora"})[0] == ex["lora"][
        "addnet_hash (sha256 of the bytes after the 8+N header)"]


def test_safetensors_io_rules(tmp_path):
    with pytest.raises(TypeError, match="ss_steps"):
        write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"ss_steps": 3})
    base = torch.arange(6.0)
    path = write_safetensors(tmp_path / "x.safetensors", {"a": base[:3], "b": base[:3], "c": base.reshape(2, 3).t()},
                             {"k": "v"})
    tensors, meta = read_safetensors(path)
    assert meta == {"k": "v"} and torch.equal(tensors["c"], base.reshape(2, 3).t())
    with pytest.raises(UserError):
        write_safetensors(path, {"a": torch.zeros(1)}, {}, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]   # no temp files left
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(UserError):
        read_metadata(tmp_path / "bad.safetensors")
    with pytest.raises(UserError):
        read_safetensors(tmp_path / "bad.safetensors")


def test_import_kohya_groups_and_detects(tmp_path):
    t = {"lora_unet_a.lora_A.weight": torch.ones(2, 3), "lora_unet_a.lora_B.weight": torch.ones(3, 2),
         "lora_unet_a.alpha": torch.tensor(1.0), "lora_te_b.lokr_w1": torch.ones(2, 2),
         "lora_te_b.lokr_w2_a": torch.ones(2, 1), "lora_te_b.lokr_w2_b": torch.ones(1, 2),
         "lora_te_b.alpha": torch.tensor(2.0)}
    path = write_safetensors(tmp_path / "n.safetensors", t, {})
    net = kohya.import_kohya(path)
    assert net.algorithms() == {"lora", "lokr"}
    assert set(net.modules["lora_unet_a"]) == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert kohya.module_scale(net.modules["lora_unet_a"]) == 0.5
    assert kohya.module_scale(net.modules["lora_te_b"]) == 2.0        # alpha / dim of the w2 factor
    bad = write_safetensors(tmp_path / "bad.safetensors", {"lora_unet_a.weird": torch.ones(1)}, {})
    with pytest.raises(UserError, match="unsupported"):
        kohya.import_kohya(bad)


def test_settings_and_dora_metadata():
    dora = LoraSettings.from_dict({"network_type": "dora", "network_dim": 8, "network_alpha": 4})
    assert dora.network.dora and dora.network.algorithm == "lora" and dora.network.module == "lycoris.kohya"
    assert config_from_text(LoraSettings, config_to_text(dora)) == dora
    # LyCORIS's spelling of DoRA, with the per-input-column layout A1111 v1.10 applies said explicitly
    assert dora.network_args() == {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}
    full = LoraSettings(network_type="dora", targets="full", conv_dim=4).network_args()
    assert full == {"algo": "lora", "conv_dim": "4", "conv_alpha": "8.0", "dora_wd": "True", "wd_on_output": "False"}
    help_text = next(i.help for i in LoraSettings.settings() if i.name == "network_type")
    assert "dora" in help_text and "input column" in help_text
    with pytest.raises(UserError):
        LoraSettings.from_dict({"network_type": "doha"})
    with pytest.raises(UserError, match="nothing would be trained"):
        LoraSettings(train_unet=False, train_text_encoder=False).validate()
    with pytest.raises(UserError):
        LoraSettings.from_dict({"network_dim": 0})
    with pytest.raises(UserError, match="lokr_factor"):
        LoraSettings(lokr_factor=0).validate()
    s = LoraSettings.from_dict({"network_type": "lokr", "network_dim": 8, "conv_dim": 4, "lokr_factor": 8})
    assert config_from_text(LoraSettings, config_to_text(s)) == s
    assert json.loads(json.dumps(s.network_args())) == {"algo": "lokr", "factor": "8"}
    assert all(info.help for info in LoraSettings.settings())
    assert LoraSettings.KIND == "lora"
    from lib_sdtrain.methods.base import TrainingMethod

    assert isinstance(LoraMethod(), TrainingMethod)
