"""The first hour of a new user (issue 15): defaults from the model, checks before any work, A1111's prompt
templates, no half toy install."""

import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_sdtrain.data import templates as T
from lib_sdtrain.errors import UserError
from lib_sdtrain.hosts.standalone import StandaloneHost, default_model
from lib_sdtrain.models import detect
from lib_sdtrain.models.native import default_buckets, probe_model
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train import preflight as P
from lib_sdtrain.train.loop import plan_data, train
from lib_sdtrain.train.settings import TrainSettings
from conftest import write_pictures

TOKEN = "zwxtok"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-sd1.safetensors", "sd1")


def pictures(folder: Path, n: int = 4, captions: list[str] | None = None) -> Path:
    return write_pictures(folder, n, captions=captions)


def header_only_model(path: Path, family: str, channels: int = 320, metadata=None) -> Path:
    """A file with just the tensors family detection looks at (shapes real, contents zero)."""
    keys = {"sd1": [detect.SD1_TE], "sd2": [detect.SD2_TE], "sdxl": [detect.SDXL_TE1, detect.SDXL_TE2]}[family]
    tensors = {detect.UNET_IN: torch.zeros(channels, 4, 3, 3, dtype=torch.float16),
               **{k: torch.zeros(1, 1, dtype=torch.float16) for k in keys}}
    save_file(tensors, str(path), metadata=metadata)
    return path


# ---- defaults from the model ------------------------------------------------------------------------------
def test_native_size_from_metadata_then_shapes(tmp_path):
    toy = probe_model(default_model())
    assert toy.native == 64 and "metadata" in toy.source            # the toy model records its own size
    assert probe_model(header_only_model(tmp_path / "a.safetensors", "sd1")).native == 512
    assert probe_model(header_only_model(tmp_path / "b.safetensors", "sdxl")).native == 1024
    assert probe_model(header_only_model(tmp_path / "c.safetensors", "sd2")).native == 768
    eps = header_only_model(tmp_path / "d.safetensors", "sd2", metadata={"modelspec.prediction_type": "epsilon"})
    assert probe_model(eps).native == 512                            # SD2 512-base
    small = probe_model(header_only_model(tmp_path / "e.safetensors", "sd1", channels=32))
    assert small.native == 64 and "small" in small.source            # a toy-width UNet without metadata
    spec = header_only_model(tmp_path / "f.safetensors", "sd1", metadata={"modelspec.resolution": "768x768"})
    assert probe_model(spec).native == 768
    (tmp_path / "g.safetensors").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable"):
        probe_model(tmp_path / "g.safetensors")


def test_bucket_bounds_scale_with_the_resolution():
    assert default_buckets(512) == (256, 1024)      # kohya's defaults
    assert default_buckets(1024) == (512, 2048)
    assert default_buckets(64) == (64, 128)
    assert default_buckets(768) == (384, 1536)


def test_resolution_64_works_with_default_buckets(tmp_path):
    from lib_sdtrain.data.scan import scan_dataset

    data = pictures(tmp_path / "data" / "2_zwx", captions=[f"{TOKEN} red square"])
    cfg = TrainSettings.from_dict({"data": str(data.parent), "resolution": 64})
    assert (cfg.min_bucket, cfg.max_bucket) == (0, 0)
    cfg = P.with_model_defaults(cfg, native=512)      # an explicit resolution wins over the model's size
    assert (cfg.resolution, cfg.min_bucket, cfg.max_bucket) == (64, 64, 128)
    plan, _, info = plan_data(cfg, scan_dataset(cfg.data).usable)
    assert info["total_steps"] > 0 and set(plan.counts()) == {(64, 64)}
    auto = P.with_model_defaults(TrainSettings.from_dict({"data": str(data.parent)}), native=1024)
    assert (auto.resolution, auto.min_bucket, auto.max_bucket) == (1024, 512, 2048)


# ---- checks before any work ---------------------------------------------------------------------------------
def _no_pictures_opened(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the pictures were opened before the check refused the run")
    monkeypatch.setattr("lib_sdtrain.data.scan.check_pictures", boom)


def _refused(cfg, tmp_path, match):
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=match):
        train(cfg, host)
    return time.perf_counter() - t0


def test_missing_model_unwritable_output_and_absent_token_are_refused_before_work(tmp_path, tiny, monkeypatch):
    data = pictures(tmp_path / "data" / "2_zwx", captions=["a red square"])
    base = {"data": str(data.parent), "model": str(tiny), "max_steps": 1, "tensorboard": False}
    _no_pictures_opened(monkeypatch)
    took = [_refused(TrainSettings.from_dict({**base, "model": str(tmp_path / "nope.safetensors")}), tmp_path,
                     "model file not found")]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    took.append(_refused(TrainSettings.from_dict({**base, "output": str(blocker / "out")}), tmp_path,
                         "is a file, not a folder"))
    emb = {**base, "method": "embedding", "embedding": {"token": TOKEN}}
    took.append(_refused(TrainSettings.from_dict(emb), tmp_path, f"none of the 4 captions contains the token"))
    no_name = _template(tmp_path, "a photo, [filewords]")     # the template adds no token either
    took.append(_refused(TrainSettings.from_dict({**emb, "prompt_template": str(no_name)}), tmp_path,
                         "has no \\[name\\]"))
    assert max(took) < 5.0, took
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.pt"))


@pytest.mark.parametrize("targets", ["attn", "full"])
def test_lora_on_a_non_stock_sd1_unet_is_refused_before_the_dataset_scan(tmp_path, tiny, monkeypatch, targets):
    # one res block per level: A1111 would put the LoRA's layers on other modules. This was refused only when the
    # adapters were attached, after the model had loaded and the whole dataset had been scanned
    from lib_sdtrain.models import checkpoint as ckpt
    from lib_sdtrain.testing.tiny import tiny_architecture

    arch = tiny_architecture("sd1")
    arch.unet["layers_per_block"] = 1
    unet, vae, encoders = ckpt.build_modules(arch, empty=False)
    model = tmp_path / "one-res-block.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.ldm_state_dict(arch, unet, vae, encoders).items()}, str(model))
    data = pictures(tmp_path / "data" / "2_zwx", captions=["zwx"])
    scans = []
    monkeypatch.setattr("lib_sdtrain.data.scan.scan_dataset", lambda *a, **k: scans.append(a) or 1 / 0)
    cfg = TrainSettings.from_dict({"data": str(data.parent), "model": str(model), "max_steps": 1,
                                   "tensorboard": False, "lora": {"targets": targets}})
    match = r"SD1 UNet's layout is not the stock one.* would go to 'input_blocks_\d+_\w+' instead of 'input_blocks_"
    with pytest.raises(UserError, match=match):
        P.preflight(cfg, P.FolderHost(tmp_path / "outputs"))          # the command line's check, without torch
    _refused(cfg, tmp_path, match)                                     # and the run itself
    assert scans == []
    # the stock layout, and methods that name no UNet modules, go on to the scan
    for other in ({"model": str(tiny)}, {"method": "embedding", "embedding": {"token": "zwx"}}):
        with pytest.raises(ZeroDivisionError):
            P.preflight(TrainSettings.from_dict({**cfg.to_dict(), **other}), P.FolderHost(tmp_path / "outputs"))
    assert len(scans) == 2


def test_heads_assumed_for_a_non_stock_unet_are_said_before_work(tmp_path, tiny):
    # weight shapes cannot tell attention heads: a UNet of other widths than the family's, with no .yaml and no
    # metadata, gets the stock rule; that was assumed without a word
    from lib_sdtrain.models import checkpoint as ckpt
    from lib_sdtrain.testing.tiny import tiny_architecture

    arch = tiny_architecture("sd1")
    unet, vae, encoders = ckpt.build_modules(arch, empty=False)
    model = tmp_path / "narrow.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.ldm_state_dict(arch, unet, vae, encoders).items()}, str(model))
    data = pictures(tmp_path / "data" / "2_zwx", captions=["zwx"])
    cfg = TrainSettings.from_dict({"data": str(data.parent), "model": str(model)})

    def notes(cfg):
        return [w for w in P.preflight(cfg, P.FolderHost(tmp_path / "outputs")).warnings if "heads" in w]

    expected = ("narrow.safetensors: attention heads assumed by SD1's stock rule, 8 heads per attention layer (no "
                ".yaml or metadata gives them). Its UNet is not SD1's stock width ([32, 32, 64, 64] channels), so if "
                "it was trained with other head counts it will not work as it should: put its .yaml beside it "
                "(narrow.yaml, A1111's convention) with num_heads or num_head_channels")
    assert notes(cfg) == [expected]
    assert notes(cfg.replace(method="embedding", embedding=cfg.embedding.replace(token="zwx")))
    assert notes(cfg.replace(model=str(tiny))) == []        # our own file: its metadata carries the heads
    model.with_suffix(".yaml").write_text("model:\n  params:\n    unet_config:\n      params:\n        num_heads: 2\n")
    assert notes(cfg) == []


def _template(tmp_path, *lines):
    path = tmp_path / "my-template.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_token_check_reads_captions_prefix_and_templates(tmp_path, tiny):
    data = pictures(tmp_path / "data" / "2_zwx", captions=["a red square"])
    base = {"method": "embedding", "data": str(data.parent), "model": str(tiny), "embedding": {"token": TOKEN}}
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")
    for ok in ({"caption_prefix": TOKEN}, {"prompt_template": "subject"},
               {"prompt_template": str(_template(tmp_path, "art by [name]"))}):
        checked = P.preflight(TrainSettings.from_dict({**base, **ok}), host)
        assert checked.cfg.resolution == 64            # the tiny model: a small UNet, 64 px
    assert P.contains_word("A ZwxTok, red", TOKEN) and P.contains_word("zwxtok2", TOKEN)
    assert not P.contains_word("zwxtoks", TOKEN)


def test_folder_without_repeat_count_is_reported(tmp_path, tiny):
    pictures(tmp_path / "data" / "2_zwx", captions=["zwx"])
    pictures(tmp_path / "data" / "abc_name", captions=["zwx"])
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")
    checked = P.preflight(TrainSettings.from_dict({"data": str(tmp_path / "data"), "model": str(tiny)}), host)
    assert any("abc_name" in w and "repeat count" in w for w in checked.warnings)


def test_jobs_refuse_at_start(tmp_path):
    from lib_sdtrain.jobs import JobManager

    jobs = JobManager(lambda: StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "o"))
    with pytest.raises(UserError, match="model file not found"):
        jobs.start({"data": str(tmp_path), "model": str(tmp_path / "missing.safetensors")})
    assert jobs.list_jobs() == []


# ---- prompt templates ---------------------------------------------------------------------------------------
def test_builtin_and_file_templates(tmp_path):
    for name in ("subject", "subject_filewords", "style", "style_filewords"):
        t = T.load_template(name)
        assert t.uses_name and t.uses_filewords == name.endswith("filewords") and len(t.lines) >= 10
    t = T.load_template(str(_template(tmp_path, "a [name]", "", "  [name], [filewords]  ")))
    assert t.lines == ("a [name]", "[name], [filewords]")
    prompts = {t.prompt(random.Random(i), "zwx", "red, square") for i in range(20)}
    assert prompts == {"a zwx", "zwx, red, square"}
    assert t.prompt(random.Random(1), "zwx", "") in ("a zwx", "zwx")     # no dangling comma
    assert T.load_template("") is None
    with pytest.raises(UserError, match="neither a built-in"):
        T.load_template("subjekt")
    with pytest.raises(UserError, match="has no lines"):
        T.load_template(str(_template(tmp_path, "", "")))
    with pytest.raises(UserError, match="prompt templates are for"):
        P.preflight(TrainSettings.from_dict({"method": "finetune", "data": str(pictures(tmp_path / "d")),
                                             "prompt_template": "subject"}), StandaloneHost(device="cpu"))


@pytest.mark.parametrize("method", ["embedding", "hypernetwork"])
def test_uncaptioned_folder_trains_with_the_subject_template(tmp_path, tiny, method, monkeypatch):
    from lib_sdtrain.data.dataset import TrainData

    data = pictures(tmp_path / "data", n=3)                 # A1111's flat folder, no captions at all
    seen: list[str] = []
    original = TrainData.caption
    monkeypatch.setattr(TrainData, "caption",
                        lambda self, *a, **k: seen.append(original(self, *a, **k)) or seen[-1])
    cfg = TrainSettings.from_dict({
        "method": method, "model": str(tiny), "data": str(data), "name": TOKEN, "output": str(tmp_path / "out"),
        "prompt_template": "subject", "batch_size": 1, "max_steps": 3, "learning_rate": 0.02, "tensorboard": False,
        "embedding": {"token": TOKEN, "vectors": 1}})
    result = train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs"))
    assert result.stopped == "" and result.final.is_file() and result.steps == 3
    assert len(seen) == 3 and all(TOKEN in p for p in seen)
    assert all(p.replace(TOKEN, "[name]") in T.BUILTIN["subject"] for p in seen)
    assert 'prompt_template = "subject"' in (result.run_dir / "config.toml").read_text()


# ---- toy install --------------------------------------------------------------------------------------------
def test_toy_install_without_open_clip_writes_nothing(tmp_path, monkeypatch):
    from lib_sdtrain.models import tokenizer
    from lib_sdtrain.toy.install import install_toy_model

    monkeypatch.setattr(tokenizer, "find_bpe_vocab", lambda: None)
    monkeypatch.setattr(tokenizer, "_load_vocabulary", lambda *a: pytest.fail("no vocabulary file to load"))
    webui = tmp_path / "webui"
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    with pytest.raises(UserError, match="open-clip-torch"):
        install_toy_model(webui)
    assert list((webui / "models" / "Stable-diffusion").iterdir()) == []


# ---- honest and visible -----------------------------------------------------------------------------------
def test_compare_tab_lists_only_runs_with_saved_files(tmp_path):
    import types

    from lib_sdtrain.config import save_config
    from lib_sdtrain.formats.safetensors_io import write_safetensors
    from lib_sdtrain.ui.compare_tab import run_choices

    root = tmp_path / "outputs"
    for name in ("saved", "empty"):
        (root / "runs" / name).mkdir(parents=True)
        save_config(TrainSettings.from_dict({"name": name}), root / "runs" / name / "config.toml")
    (root / "Lora").mkdir()
    write_safetensors(root / "Lora" / "saved.safetensors", {"x": torch.zeros(1)}, {"ss_epoch": "1"})
    ctx = types.SimpleNamespace(host=lambda: StandaloneHost(device="cpu", output_root=root))
    assert run_choices(ctx) == [str(root / "runs" / "saved")]


def test_toy_preset_has_both_prompt_sets_in_the_toy_grammar():
    from lib_sdtrain.toy.world import caption_attributes
    from lib_sdtrain.ui.presets import PRESETS

    toy = PRESETS["Quick test on the toy model"]
    assert toy["sample_prompts"] and toy["control_prompts"]
    assert all("zwx" in p for p in toy["sample_prompts"]) and not any("zwx" in p for p in toy["control_prompts"])
    for p in toy["sample_prompts"] + toy["control_prompts"]:
        assert caption_attributes(p)["background"] in ("white", "black")


def test_convert_writes_files_readable_by_others_like_training(tmp_path):
    import os

    from lib_sdtrain.cli import main

    src = Path(__file__).parent / "data" / "golden" / "a1111_formats" / "ti_sd1_2vec.pt"
    old = os.umask(0o022)
    try:
        assert main(["convert", str(src), "--output", str(tmp_path / "conv")]) == 0
    finally:
        os.umask(old)
    (out,) = (tmp_path / "conv").glob("*.safetensors")
    assert out.stat().st_mode & 0o777 == 0o644


def test_help_keeps_the_subcommand_lists(capsys):
    from lib_sdtrain.cli import main

    for command in ("dataset", "toy"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        lines = [line for line in out.splitlines() if line.strip().startswith(("python -m lib_sdtrain dataset ",
                                                                               "toy "))]
        assert len(lines) >= 5, out      # one line per sub-command, not one reflowed paragraph


@pytest.mark.parametrize("case", ["missing model", "taken name", "taken embedding word", "no state to resume"])
def test_cli_refuses_before_torch_loads(tmp_path, case):
    """The command line's checks run before torch is imported, so a refusal takes well under a second (a taken
    output name was found only after torch loaded: ~2.7 s on a loaded 2-core machine, now ~0.5 s)."""
    import os
    import subprocess
    import sys

    data = pictures(tmp_path / "data" / "2_zwx", captions=["a red square zwx"])
    outputs = tmp_path / "outputs"
    args, why = {
        "missing model": (["--model", str(tmp_path / "no.safetensors")], "model file not found"),
        "taken name": (["--name", "mine"], "output name 'mine' is taken"),
        "taken embedding word": (["--method", "embedding", "--token", "zwx"], "output name 'zwx' is taken"),
        "no state to resume": (["--resume", str(tmp_path / "nothing-here")], "nothing to resume"),
    }[case]
    (outputs / "Lora").mkdir(parents=True)
    (outputs / "Lora" / "mine.safetensors").write_bytes(b"the user's LoRA")
    (outputs / "embeddings" / "old").mkdir(parents=True)
    (outputs / "embeddings" / "old" / "zwx.pt").write_bytes(b"the user's embedding")   # A1111: one word per stem
    code = ("import sys; from lib_sdtrain.cli import main; "
            f"rc = main(['train', '--data', {str(data.parent)!r}, *{args!r}]); "
            "print('torch' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRAINING_LAB_OUTPUT": str(outputs)})
    assert out.stdout.split() == ["False", "2"], out.stdout + out.stderr
    assert why in out.stderr
    assert (outputs / "Lora" / "mine.safetensors").read_bytes() == b"the user's LoRA"


def test_dataset_tab_warns_relative_to_the_models_size(tmp_path):
    import types

    from lib_sdtrain.ui import dataset_tab

    data = pictures(tmp_path / "data" / "2_zwx", captions=["zwx"])     # 64-px pictures, like the toy datasets
    ctx = types.SimpleNamespace(host=lambda: StandaloneHost(device="cpu", output_root=tmp_path / "o"))
    native, source = dataset_tab.model_size(ctx)
    assert native == 64 and "toy-sd1" in source                      # the app's default model: the toy model
    low = default_buckets(native)[0]
    assert "upscaled" not in dataset_tab.scan_report(str(data.parent), min_side=low)
    assert "upscaled" in dataset_tab.scan_report(str(data.parent))    # measured against 512's 256-px buckets


def test_toy_preset_follows_the_measured_lora_defaults():
    """The Train tab's toy preset uses the LoRA settings the quality bench measured (bench/README.md)."""
    from lib_sdtrain.toy.quality import (
        METHOD_CONCEPT_DEFAULTS,
        METHOD_DEFAULTS,
        TOY_CFG,
    )
    from lib_sdtrain.ui.presets import PRESETS

    toy, measured = PRESETS["Quick test on the toy model"], METHOD_DEFAULTS["lora"]
    assert toy["method"] == "lora"
    assert toy["sample_cfg"] == TOY_CFG          # its control pictures at the CFG the toy LoRAs draw best at
    for key in ("network_dim", "network_alpha", "train_text_encoder"):
        assert toy["lora"][key] == measured[f"lora.{key}"], key
    subject = METHOD_CONCEPT_DEFAULTS[("lora", "subject")]
    for key in ("lr_scheduler", "min_snr_gamma", "learning_rate", "batch_size"):   # the rate goes with the batch
        assert toy[key] == subject[key], key


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "-inf", "nan"])
def test_non_finite_numbers_are_refused_by_float_settings(value):
    # a NaN slips past every minimum/maximum comparison; it used to reach the optimizer's own error
    with pytest.raises(UserError, match="learning_rate: .* is not a finite number"):
        TrainSettings.from_dict({"learning_rate": value})
    with pytest.raises(UserError, match="network_alpha: .* is not a finite number"):
        TrainSettings.from_dict({"lora": {"network_alpha": value}})
    assert TrainSettings.from_dict({"learning_rate": "1e-3"}).learning_rate == 1e-3


def test_list_settings_check_each_item_as_a_single_setting_of_its_type():
    """A list's items were converted with item(v), checking nothing: a JSON null became the prompt 'None', a table
    its repr, true the seed 1, 1.5 the seed 1, and "nan" or inf a LoRA weight of the comparison."""
    from lib_sdtrain.evaluate.compare import CompareSettings

    for cls, data, message in [
            (TrainSettings, {"sample_prompts": ["a", None]}, r"sample_prompts\[1\]: a value is required"),
            (TrainSettings, {"control_prompts": [{"a": 1}]}, r"control_prompts\[0\]: \{'a': 1\} is not a valid str"),
            (TrainSettings, {"sample_prompts": [["a"]]}, r"sample_prompts\[0\]: \['a'\] is not a valid str"),
            (CompareSettings, {"seeds": [True]}, r"seeds\[0\]: True is not a valid int"),
            (CompareSettings, {"seeds": [1, 1.5]}, r"seeds\[1\]: 1.5 is not a valid int"),
            (CompareSettings, {"weights": [1, "nan"]}, r"weights\[1\]: nan is not a finite number"),
            (CompareSettings, {"weights": [float("inf")]}, r"weights\[0\]: inf is not a finite number"),
            (CompareSettings, {"epochs": "1, x"}, r"epochs\[1\]: 'x' is not a valid int")]:
        with pytest.raises(UserError, match="^" + message):
            cls.from_dict(data)
    ok = CompareSettings.from_dict({"prompts": ["zwx", 5], "seeds": "1, 2", "weights": [1, "0.5", -1]})
    assert (ok.prompts, ok.seeds, ok.weights) == (["zwx", "5"], [1, 2], [1.0, 0.5, -1.0])


def test_a_settings_text_has_a_length_limit():
    """A 20 MB caption_prefix sent to the API was accepted: the job then spent minutes on it, deaf to Stop, and the
    jobs behind it waited (session 23's API audit). A setting's text (and each text of a list) is at most
    100,000 characters; refused with its name and length before anything runs."""
    from lib_sdtrain.config import MAX_TEXT

    long = "x" * (MAX_TEXT + 1)
    for data, where in [({"caption_prefix": long}, "caption_prefix"), ({"sample_prompts": ["a", long]},
                                                                        r"sample_prompts\[1\]")]:
        with pytest.raises(UserError, match=rf"^{where}: 100,001 characters; a setting's text is at most 100,000"):
            TrainSettings.from_dict(data)
    assert TrainSettings.from_dict({"caption_prefix": "x" * MAX_TEXT}).caption_prefix == "x" * MAX_TEXT


def test_a_settings_table_of_a_newer_version_is_refused_wherever_it_comes_from():
    """A config file of a newer version was refused, but the same table sent to the API ({"version": 99, ...}) was
    trained as if it were ours (session 23's API audit)."""
    with pytest.raises(UserError, match="written by a newer Training Lab .version 99"):
        TrainSettings.from_dict({"version": 99, "name": "x"})
    with pytest.raises(UserError, match="config version 'x' is not valid"):
        TrainSettings.from_dict({"version": "x"})
    assert TrainSettings.from_dict({"version": 1, "name": "x"}).name == "x"


def test_seeds_are_refused_above_the_32_bit_range():
    """A seed of 2**64 or more (JSON 1e300 is one) was accepted and the run failed at its first step with torch's
    "Overflow when unpacking long long" (a crash line, after the API had said 200); a compare seed of 2**70 was an
    HTTP 500, and a compare seed of -1 was drawn although every single seed setting refuses it."""
    from lib_sdtrain.classgen import generate_class_images
    from lib_sdtrain.evaluate.compare import CompareSettings

    top = 2**32 - 1                 # A1111 draws its random seeds below it; kohya's seeds are 32-bit
    for cls, data, message in [(TrainSettings, {"seed": 2**64}, "seed: 18446744073709551616 is above the maximum"),
                               (TrainSettings, {"seed": 1e300}, r"seed: 1e\+300 is above"),   # not 301 digits
                               (TrainSettings, {"sample_seed": 2**32}, "sample_seed: 4294967296 is above"),
                               (TrainSettings, {"method": "dreambooth", "dreambooth": {"class_seed": 2**40}},
                                "dreambooth.class_seed: 1099511627776 is above"),
                               (CompareSettings, {"seeds": [1, 2**70]}, r"seeds\[1\]: 1180591620717411303424 is above"),
                               (CompareSettings, {"seeds": [-1]}, r"seeds\[0\]: -1 is below the minimum 0")]:
        with pytest.raises(UserError, match="^" + message):
            cls.from_dict(data)
    assert TrainSettings.from_dict({"seed": top, "sample_seed": top}).seed == top
    with pytest.raises(UserError, match="seed from 0 to 4294967295"):
        generate_class_images(None, None, "a dog", 1, ".", seed=2**64)


def test_config_file_errors_name_the_file(tmp_path):
    from lib_sdtrain.config import load_config

    broken = tmp_path / "broken.toml"
    broken.write_text("name = [1, 2\n")
    with pytest.raises(UserError, match=r"broken\.toml: TOML syntax error"):
        load_config(TrainSettings, broken)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('learning_rate = "abc"\n')
    with pytest.raises(UserError, match=r"wrong\.toml: learning_rate: 'abc' is not a valid float"):
        load_config(TrainSettings, wrong)
