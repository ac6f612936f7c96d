"""The bundled toy model (lib_sdtrain/toy/data/toy-sd1.safetensors), its LDM yaml, and installing it into A1111."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lib_sdtrain.errors import UserError

DATA = Path(__file__).resolve().parents[1] / "lib_sdtrain" / "toy" / "data"
MODEL = DATA / "toy-sd1.safetensors"
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="the bundled toy model is not built yet")


@pytest.fixture(scope="module")
def parts():
    from lib_sdtrain.hosts.standalone import StandaloneHost

    return StandaloneHost(device="cpu", dtype="fp32").load(MODEL)


@needs_model
def test_model_loads_as_small_sd1_with_metadata(parts):
    assert MODEL.stat().st_size <= 25_000_000
    assert parts.family == "sd1" and parts.prediction == "eps"
    assert parts.text_encoders[0].get_input_embeddings().weight.shape[0] == 49408
    assert parts.text_encoders[0].config.max_position_embeddings == 77
    meta = parts.loaded.metadata
    acc = json.loads(meta["lab.accuracy"])
    assert acc["colour"] >= 0.80 and acc["shape"] >= 0.70          # the gate, as measured by the pretraining
    cfg = json.loads(meta["lab.pretrain_config"])
    assert cfg["size"] == 64 and json.loads(meta["lab.pretrain_steps"])["unet"] > 0
    assert 0.05 < parts.latent_scale < 2.0


@needs_model
def test_yaml_beside_model_matches_weights(parts):
    import yaml

    doc = yaml.safe_load(MODEL.with_suffix(".yaml").read_text(encoding="utf-8"))
    params = doc["model"]["params"]
    unet = params["unet_config"]["params"]
    cfg = parts.unet.config
    assert [unet["model_channels"] * m for m in unet["channel_mult"]] == list(cfg.block_out_channels)
    assert unet["context_dim"] == cfg.cross_attention_dim == parts.text_encoders[0].config.hidden_size
    assert unet["num_res_blocks"] == cfg.layers_per_block
    assert params["scale_factor"] == pytest.approx(parts.latent_scale, rel=1e-6)
    dd = params["first_stage_config"]["params"]["ddconfig"]
    assert [dd["ch"] * m for m in dd["ch_mult"]] == list(parts.vae.config.block_out_channels)
    assert params["cond_stage_config"]["target"].endswith("FrozenCLIPEmbedder")


@needs_model
def test_model_draws_the_asked_colour(parts):
    """One prompt per colour, fixed seeds, 20 Euler steps: the detector names the prompted colour."""
    from lib_sdtrain.toy import world
    from lib_sdtrain.toy.detector import default_detector
    from lib_sdtrain.toy.evaluate import sample_batch

    scenes = [world.Scene(shape, colour, "large", "centre", bg) for colour, shape, bg in zip(
        world.COLOUR_NAMES, ("circle", "square", "triangle", "cross", "circle", "square"),
        ("gray", "white", "black", "gray", "gradient", "white"))]
    images = sample_batch(parts, [s.caption() for s in scenes], list(range(100, 100 + len(scenes))), steps=20)
    found = default_detector().detect(images)
    hits = [d.colour == s.colour for d, s in zip(found, scenes)]
    assert sum(hits) >= len(scenes) - 1, [(s.colour, d.colour) for d, s in zip(found, scenes)]
    # and the background: the large flat areas are the easiest thing to get right
    assert sum(d.background == s.background for d, s in zip(found, scenes)) >= len(scenes) - 1


def _tiny(tmp_path: Path) -> Path:
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path / "toy-tiny.safetensors", "sd1")


def test_install_writes_model_yaml_and_text_folder(tmp_path):
    import yaml
    from transformers import CLIPTextConfig, CLIPTokenizer

    from lib_sdtrain.models.tokenizer import make_tokenizers
    from lib_sdtrain.toy.install import install_toy_model

    model = _tiny(tmp_path)
    webui = tmp_path / "webui"
    webui.mkdir()
    (webui / "webui.py").write_text("# stand-in\n")
    dest = install_toy_model(webui, model=model)
    sd = webui / "models" / "Stable-diffusion"
    assert dest == (sd / model.name).resolve() and dest.read_bytes() == model.read_bytes()
    doc = yaml.safe_load(dest.with_suffix(".yaml").read_text(encoding="utf-8"))
    version = Path(doc["model"]["params"]["cond_stage_config"]["params"]["version"])
    assert version.is_absolute() and version == (sd / "toy-tiny.tokenizer").resolve()
    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (version / name).is_file(), name

    # what A1111's FrozenCLIPEmbedder(version=...) reads: the tokenizer and the text config
    hf = CLIPTokenizer.from_pretrained(str(version))
    ours = make_tokenizers("sd1")[0]
    for prompt in ("a large red zwx shape in the centre of a gray background", "a small cyan cross, in zkz style",
                   "Café (emphasis:1.2) 42 <lora:x:1>"):
        assert hf(prompt)["input_ids"] == [ours.start_id, *ours.encode(prompt), ours.end_id]
    assert hf.model_max_length == 77 and hf.pad_token == "<|endoftext|>"
    cfg = CLIPTextConfig.from_pretrained(str(version))
    from lib_sdtrain.testing.tiny import tiny_architecture

    text = tiny_architecture("sd1").text[0]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size,
            cfg.max_position_embeddings, cfg.hidden_act) == (
        text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], 49408, 77, text["hidden_act"])

    # the installed copy loads (our loader reads the yaml too) and finds its tokenizer folder
    from lib_sdtrain.hosts.standalone import StandaloneHost

    loaded = StandaloneHost(device="cpu", dtype="fp32").load(dest)
    assert loaded.family == "sd1" and Path(loaded.tokenizers[0].source) == version


def test_install_keeps_user_files_and_accepts_the_models_folder(tmp_path):
    from lib_sdtrain.toy.install import install_toy_model

    model = _tiny(tmp_path)
    sd = tmp_path / "a1111" / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    first = install_toy_model(sd, model=model)
    assert install_toy_model(sd, model=model) == first           # an identical copy: nothing to refuse
    other = sd / model.name
    other.write_bytes(b"someone else's file")
    with pytest.raises(UserError, match="already exists"):
        install_toy_model(sd, model=model)
    assert other.read_bytes() == b"someone else's file"
    install_toy_model(sd, model=model, overwrite=True)
    assert other.read_bytes() == model.read_bytes()
    with pytest.raises(UserError, match="AUTOMATIC1111"):
        install_toy_model(tmp_path / "a1111" / "models", model=model)   # neither root nor checkpoint folder
    with pytest.raises(UserError, match="not a folder"):
        install_toy_model(tmp_path / "missing", model=model)


def test_reinstalling_leaves_identical_files_untouched_and_an_edited_yaml_to_overwrite(tmp_path):
    """Installing over an identical copy rewrote its .yaml and tokenizer files, an edited yaml too, without
    --overwrite. Now identical files keep their bytes and times; an edited one refuses the install (nothing
    written) until --overwrite."""
    import os

    from lib_sdtrain.toy.install import install_toy_model

    model = _tiny(tmp_path)
    sd = tmp_path / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    dest = install_toy_model(sd, model=model)
    yaml_path, vocab = dest.with_suffix(".yaml"), sd / "toy-tiny.tokenizer" / "vocab.json"
    for p in (dest, yaml_path, vocab):
        os.utime(p, (1_000_000_000, 1_000_000_000))
    generated = yaml_path.read_bytes()
    assert install_toy_model(sd, model=model) == dest
    assert [p.stat().st_mtime for p in (dest, yaml_path, vocab)] == [1_000_000_000] * 3
    edited = generated + b"# my note: keep this\n"
    yaml_path.write_bytes(edited)
    with pytest.raises(UserError, match=r"toy-tiny\.yaml differs .*--overwrite"):
        install_toy_model(sd, model=model)
    assert yaml_path.read_bytes() == edited
    vocab.write_text("{}")                                # a tokenizer file changed: refused the same way
    yaml_path.write_bytes(generated)
    with pytest.raises(UserError, match=r"vocab\.json differs"):
        install_toy_model(sd, model=model)
    assert vocab.read_text() == "{}" and yaml_path.read_bytes() == generated
    install_toy_model(sd, model=model, overwrite=True)
    assert yaml_path.read_bytes() == generated and vocab.read_text() != "{}"


def test_install_refuses_a_file_without_architecture(tmp_path):
    from safetensors.torch import save_file

    from lib_sdtrain.toy.install import install_toy_model

    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    (tmp_path / "Stable-diffusion").mkdir()
    with pytest.raises(UserError, match="architecture"):
        install_toy_model(tmp_path / "Stable-diffusion", model=bare)


def test_ldm_config_follows_the_architecture():
    from lib_sdtrain.toy.ldm_config import ldm_config
    from lib_sdtrain.toy.pretrain import PretrainConfig, toy_architecture

    arch = toy_architecture(PretrainConfig(), latent_scale=0.3)
    p = ldm_config(arch, "/abs/text")["model"]["params"]
    unet = p["unet_config"]["params"]
    assert unet["attention_resolutions"] == [1, 2, 4]                 # SD1: attention on all levels but the last
    assert unet["channel_mult"] == [1, 2, 2, 2] and unet["model_channels"] == 32
    assert unet["num_head_channels"] == 8 and unet["num_heads"] == -1 and unet["context_dim"] == 128
    assert p["scale_factor"] == 0.3 and p["cond_stage_config"]["params"]["version"] == "/abs/text"
    arch.family = "sdxl"
    with pytest.raises(UserError):
        ldm_config(arch, "x")


def test_evaluate_cli_reports_figures(tmp_path, capsys):
    from lib_sdtrain.cli import main

    model = _tiny(tmp_path)
    grid = tmp_path / "grid.png"
    assert main(["toy", "evaluate", str(model), "--n", "3", "--steps", "2", "--device", "cpu", "--json",
                 "--grid", str(grid)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("colour", "shape", "background", "size", "position"):
        assert 0.0 <= out[key] <= 1.0
    assert out["samples"] == 3 and grid.is_file()
    assert main(["toy", "evaluate", str(model), "--n", "0"]) == 2


def test_evaluate_and_quality_refuse_a_grid_path_that_is_not_a_new_png_before_any_work(tmp_path, capsys,
                                                                                      monkeypatch):
    """`toy evaluate --grid x.txt` wrote PNG bytes under .txt, and an existing grid was refused only after the
    sampling, with "allow overwriting" naming no flag (evaluate has none). Both are refused before the model
    loads; quality's message names its --overwrite."""
    import lib_sdtrain.hosts.standalone as S
    import lib_sdtrain.toy.quality as Q
    from lib_sdtrain.cli import main

    model = _tiny(tmp_path)
    loads, runs = [], []
    monkeypatch.setattr(S.StandaloneHost, "load", lambda self, m: loads.append(m))
    monkeypatch.setattr(Q, "run_quality", lambda *a, **kw: runs.append(a))
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"the user's picture")
    for grid, words in (("x.txt", "name ending in .png"), ("x.jpg", "name ending in .png"),
                        (str(tmp_path), "is a folder"), (str(taken), "never replaces a file")):
        assert main(["toy", "evaluate", str(model), "--n", "1", "--steps", "1", "--grid", grid]) == 2
        err = capsys.readouterr().err
        assert words in err and "--grid" in err and err.count("\n") == 1, err
        assert main(["toy", "quality", "--work", str(tmp_path / "w"), "--grid", grid]) == 2
        err = capsys.readouterr().err
        assert words.replace("never replaces a file", "pass --overwrite") in err, err
    assert loads == [] and runs == [] and taken.read_bytes() == b"the user's picture"
    assert not (tmp_path / "x.txt").exists() and not (tmp_path / "w").exists()


def test_pretrain_cli_refuses_bad_input(tmp_path, capsys):
    from lib_sdtrain.cli import main

    assert main(["toy", "pretrain", "--out", str(tmp_path / "m.ckpt"), "--minutes", "0", "0"]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main(["toy", "pretrain", "--out", str(tmp_path / "m.safetensors"), "--minutes", "-1", "0"]) == 2
    # NaN passed the old "m < 0 or m > 1440" test and started a pretraining with no time budget
    assert main(["toy", "pretrain", "--out", str(tmp_path / "m.safetensors"), "--minutes", "nan", "1"]) == 2
    assert "--minutes" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()


def test_resume_cli_takes_a_size_batch_and_cache_and_refuses_bad_ones(tmp_path, capsys, monkeypatch):
    """`toy resume --size 128` trains a 64-px model at 128 px (session 11's trial): the options reach the
    pretraining config the resume runs with; bad values are refused before anything loads."""
    import lib_sdtrain.toy.pretrain as P
    from lib_sdtrain.cli import main

    model = _tiny(tmp_path)
    out = tmp_path / "r.safetensors"
    for flag, value in (("--size", "100"), ("--size", "32"), ("--batch", "0"), ("--latent-pictures", "3")):
        assert main(["toy", "resume", str(model), "--out", str(out), flag, value]) == 2
        assert flag in capsys.readouterr().err
    seen = {}

    def fake_resume(model, out, minutes, cfg, **kw):
        seen.update(size=cfg.size, batch=cfg.unet_batch, pictures=cfg.latent_pictures, minutes=minutes)
        raise P.UserError("stop here")

    monkeypatch.setattr(P, "resume_unet", fake_resume)
    assert main(["toy", "resume", str(model), "--out", str(out), "--size", "128", "--batch", "32",
                 "--latent-pictures", "6000", "--minutes", "1"]) == 2
    assert seen == {"size": 128, "batch": 32, "pictures": 6000, "minutes": 1.0} and not out.exists()


def test_resume_polish_and_combine_check_threads_as_pretrain_does(tmp_path, capsys, monkeypatch):
    """`toy resume/polish/combine --threads` skipped pretrain's range check: -5 became 0 without a word and
    99999999999999999999 reached torch.set_num_threads (an OverflowError traceback) after the model was read."""
    import lib_sdtrain.toy.pretrain as P
    from lib_sdtrain.cli import main

    model = _tiny(tmp_path)
    out = tmp_path / "r.safetensors"
    seen = []

    def fake(*args, **kw):
        seen.append(args[-1].threads)          # the config, the last positional argument of each
        raise P.UserError("stop here")

    for name in ("resume_unet", "polish", "combine"):
        monkeypatch.setattr(P, name, fake)
    commands = (["resume", str(model)], ["polish", str(model)], ["combine", "--unet", str(model), "--vae", str(model)])
    for command in commands:
        for value in ("-5", "99999999999999999999", "257"):
            assert main(["toy", *command, "--out", str(out), "--threads", value]) == 2, (command, value)
            assert "--threads must be from 0 to 256" in capsys.readouterr().err
        assert main(["toy", *command, "--out", str(out), "--threads", "3"]) == 2   # "stop here" from the fake
    assert seen == [3, 3, 3] and not out.exists()


def test_evaluate_refuses_a_guidance_scale_no_sampling_box_takes(tmp_path, capsys, monkeypatch):
    """`toy evaluate --cfg nan` (inf, -1, 1e300) drew pictures of NaN and reported them as figures (100 % empty
    pictures, 0 % position), exit 0. Refused now, before the model loads; 0 and 30 still score."""
    import lib_sdtrain.toy.evaluate as E
    from lib_sdtrain.cli import main

    model = _tiny(tmp_path)
    for value in ("nan", "inf", "-1", "1e300", "30.5"):
        assert main(["toy", "evaluate", str(model), "--n", "1", "--steps", "1", "--device", "cpu", "--cfg", value]) == 2
        err = capsys.readouterr().err
        assert "--cfg must be from 0 to 30" in err and err.count("\n") == 1, err
    seen = []
    monkeypatch.setattr(E, "evaluate_parts", lambda parts, **kw: seen.append(kw["cfg_scale"]) or
                        {k: 1.0 for k in ("colour", "shape", "background", "size", "position", "empty", "samples")})
    for value in ("0", "30"):
        assert main(["toy", "evaluate", str(model), "--n", "1", "--steps", "1", "--device", "cpu", "--json",
                     "--cfg", value]) == 0
    assert seen == [0.0, 30.0]
