"""Single-file checkpoint ↔ diffusers folder for tiny SD1, SD2-v and SDXL models.

- file → folder: diffusers' own `StableDiffusion(XL)Pipeline.from_pretrained(local_files_only=True)` loads the
  folder; its modules hold the file's weights, its tokenizer gives A1111's ids, SD2's folder text encoder
  (diffusers layout: last layer dropped) gives exactly A1111's penultimate-layer conditioning, and the
  scheduler carries the prediction type;
- file → folder → file is bit-exact (keys, values, dtypes), also for an fp16 file with an EMA tensor;
- a folder without our extras file (what diffusers itself ships) still becomes a loadable single file;
- refusals: existing outputs, non-SD folders, inpainting UNets; and the CLI routes.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_sdtrain.cli import main as cli_main
from lib_sdtrain.convert import diffusers_folder as df
from lib_sdtrain.errors import UserError
from lib_sdtrain.models.checkpoint import load_checkpoint
from lib_sdtrain.models.tokenizer import make_tokenizers
from lib_sdtrain.testing.tiny import make_tiny_checkpoint

FAMILIES = ["sd1", "sd2", "sdxl"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Per family: (source file, folder) made once for the module."""
    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for family in FAMILIES:
        src = make_tiny_checkpoint(root / f"{family}.safetensors", family)
        if family == "sd1":   # fp16 weights, an EMA tensor and float32 buffers: mixed dtypes must survive
            sd = load_file(src)
            sd = {k: v.half() if k.startswith("model.diffusion_model.") else v for k, v in sd.items()}
            sd["model_ema.decay"] = torch.tensor(0.9999)
            save_file(sd, str(src), metadata={"lab.note": "tiny", "modelspec.title": "t"})
        result = df.file_to_folder(src, root / f"{family}-folder")
        assert result.status == "converted" and result.kind == "diffusers"
        out[family] = (src, result.output, result)
    return out


def assert_same_file(a, b):
    x, y = load_file(a), load_file(b)
    assert set(x) == set(y), sorted(set(x) ^ set(y))[:5]
    diff = [k for k in x if x[k].dtype != y[k].dtype or x[k].shape != y[k].shape or not torch.equal(x[k], y[k])]
    assert not diff, diff[:5]
    return x


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_in_diffusers(made, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    src, folder, result = made[family]
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(folder), local_files_only=True)
    loaded = load_checkpoint(src)
    for ours, theirs in [(loaded.unet, pipe.unet), (loaded.vae, pipe.vae)]:
        a, b = ours.state_dict(), theirs.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k].to(b[k].dtype), b[k]) for k in a)  # diffusers loads fp32
    stored = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16 if family == "sd1" else torch.float32}
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert pipe.vae.config.scaling_factor == pytest.approx(loaded.arch.latent_scale)

    prompt = "a photo of a (red) cat, 4k"
    toks = make_tokenizers(family)
    pipe_toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    for ours, theirs in zip(toks, pipe_toks):
        assert theirs(prompt).input_ids == [ours.start_id, *ours.encode(prompt), ours.end_id]
        assert theirs.pad_token_id == ours.pad_id
    # the pipeline's text features equal A1111's choice of layer on the single-file model
    ids = torch.tensor([[49406, *toks[0].encode(prompt), 49407]])
    with torch.no_grad():
        mine = loaded.text_encoders[0](ids, output_hidden_states=True)
        theirs = pipe.text_encoder(ids, output_hidden_states=True)
        if family == "sd2":     # A1111: penultimate OpenCLIP layer, then ln_final; diffusers: 23 layers, final LN
            want = loaded.text_encoders[0].text_model.final_layer_norm(mine.hidden_states[-2])
            assert pipe.text_encoder.config.num_hidden_layers == loaded.text_encoders[0].config.num_hidden_layers - 1
            torch.testing.assert_close(theirs.last_hidden_state, want, rtol=1e-5, atol=1e-6)  # thread-count rounding
        else:
            torch.testing.assert_close(theirs.hidden_states[-2], mine.hidden_states[-2], rtol=1e-5, atol=1e-6)
        if family == "sdxl":
            torch.testing.assert_close(pipe.text_encoder_2(ids).text_embeds, loaded.text_encoders[1](ids).text_embeds,
                                       rtol=1e-5, atol=1e-6)   # the pipeline may pick another attention kernel
    latents = pipe(prompt="a cat", num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
                   output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == cls.__name__


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(made, family, tmp_path):
    src, folder, _ = made[family]
    result = df.folder_to_file(folder, tmp_path / "back.safetensors")
    assert result.status == "converted" and result.kind == "checkpoint"
    assert set(result.hashes) == {"sha256", "shorthash", "model_hash"}
    x = assert_same_file(src, result.output)
    from lib_sdtrain.formats.safetensors_io import read_metadata

    meta = read_metadata(result.output)
    assert meta["converted_from_format"] == "diffusers folder" and meta["lab.note"]
    if family == "sd1":
        assert x["model_ema.decay"].item() == pytest.approx(0.9999)
        assert x["model.diffusion_model.out.2.weight"].dtype == torch.float16
        assert x["alphas_cumprod"].dtype == torch.float32
        assert meta["modelspec.title"] == "t"             # the source file's metadata comes back
    # refuses to overwrite
    with pytest.raises(UserError, match="already exists"):
        df.folder_to_file(folder, result.output)


def test_plain_diffusers_folder_without_extras(made, tmp_path):
    """What diffusers itself ships has no extras file: SD2 gets its 24th layer and projection as zeros."""
    for family in FAMILIES:
        src, folder, _ = made[family]
        plain = tmp_path / f"{family}-plain"
        shutil.copytree(folder, plain)
        (plain / df.EXTRAS_NAME).unlink()
        result = df.folder_to_file(plain, tmp_path / f"{family}.safetensors")
        original, new = load_file(src), load_file(result.output)
        assert set(new) == set(original) - {"model_ema.decay"}
        same = [k for k in new if torch.equal(new[k].to(original[k].dtype), original[k])]
        if family == "sd2":
            padded = [k for k in new if k not in same]
            assert padded and all(".resblocks.1." in k or k.endswith("text_projection") for k in padded)
            assert all(not new[k].any() for k in padded) and result.warnings
        else:
            assert len(same) == len(new)
        reloaded = load_checkpoint(result.output)            # our loader (and its family detection) takes it
        assert reloaded.arch.family == family
        assert reloaded.arch.prediction == ("v" if family == "sd2" else "eps")


def test_refusals(made, tmp_path):
    src, folder, _ = made["sd1"]
    with pytest.raises(UserError, match="already exists"):
        df.file_to_folder(src, folder)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="not a diffusers folder"):
        df.file_to_folder(src, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "x.txt").is_file()
    bad = tmp_path / "flux"
    shutil.copytree(folder, bad)
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="FluxPipeline"):
        df.folder_state_dict(bad)
    inpaint = tmp_path / "inpaint"
    shutil.copytree(folder, inpaint)
    cfg = json.loads((inpaint / "unet" / "config.json").read_text())
    (inpaint / "unet" / "config.json").write_text(json.dumps({**cfg, "in_channels": 9}))
    with pytest.raises(UserError, match="9 input channels"):
        df.folder_state_dict(inpaint)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    cfg = json.loads((broken / "vae" / "config.json").read_text())
    (broken / "vae" / "config.json").write_text(json.dumps({**cfg, "latent_channels": 8}))
    with pytest.raises(UserError, match="VAE weights do not fit"):
        df.folder_state_dict(broken)
    # overwrite of one of our folders works and keeps it loadable
    again = df.file_to_folder(src, folder, overwrite=True)
    assert again.status == "converted" and (folder / "model_index.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]     # no temp folders left


def test_cli_routes(made, tmp_path, capsys):
    src, folder, _ = made["sdxl"]
    out = tmp_path / "out"
    assert cli_main(["convert", str(folder), "--output", str(out)]) == 0          # auto: folder -> single file
    assert_same_file(src, out / f"{folder.name}.safetensors")
    assert cli_main(["convert", str(src), "--to", "diffusers", "--output", str(out)]) == 0
    assert (out / src.stem / "model_index.json").is_file()
    assert cli_main(["convert", str(src), "--output", str(out)]) == 1             # .safetensors needs --to
    assert cli_main(["convert", str(src), "--to", "single-file", "--output", str(out)]) == 1
    text = capsys.readouterr().out
    assert "REFUSED" in text and "--to diffusers" in text and "not a diffusers folder" in text


@pytest.mark.parametrize("component, key, value", [("unet", "block_out_channels", "x"),
                                                   ("vae", "latent_channels", [1]),
                                                   ("text_encoder", "hidden_size", "big")])
def test_a_config_value_of_the_wrong_kind_is_refused_by_name(made, tmp_path, component, key, value):
    # were ValueError / TypeError tracebacks from diffusers and transformers
    _, folder, _ = made["sd1"]
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    cfg = json.loads((odd / component / "config.json").read_text())
    (odd / component / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(UserError, match=f"{component}/config.json describes no network that can be built"):
        df.folder_state_dict(odd)
