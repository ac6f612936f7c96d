import importlib
import subprocess
import sys

import pytest
from conftest import ROOT

from lib_sdtrain import cli


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_registered_command_exists(name):
    mod = importlib.import_module(f"lib_sdtrain.commands.{cli.COMMANDS[name][0]}")
    assert callable(mod.add_arguments) and callable(mod.run)


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "lib_sdtrain", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert name in out.stdout


def test_user_error_is_one_line_and_nonzero():
    out = subprocess.run([sys.executable, "-m", "lib_sdtrain", "info", "/nonexistent/model.safetensors"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error:")
    assert "Traceback" not in out.stderr


def test_info_on_a_folder_says_it_is_a_folder_and_what_info_reads(tmp_path, capsys):
    from lib_sdtrain.cli import main

    (tmp_path / "model.safetensors").mkdir()               # a folder named like a model file
    assert main(["info", str(tmp_path / "model.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" not in err
    assert "is a folder" in err and "embedding" in err and "--to single-file" in err


def _all_parsers(parser, path=()):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, path + (name,))


def test_every_commands_help_renders_its_texts():
    """`--help` of every command and subcommand formats (no argparse internals from a stray `%`), and the help
    texts that contain a percent sign print it as written."""
    from lib_sdtrain.cli import _escape, build_parser

    seen = 0
    for path, parser in _all_parsers(build_parser()):
        text = parser.format_help()
        assert "option_strings" not in text and "container" not in text, path
        seen += 1
    assert seen > len(cli.COMMANDS)
    out = subprocess.run([sys.executable, "-m", "lib_sdtrain", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "option_strings" not in out.stdout
    assert "30% slower" in " ".join(out.stdout.split())
    assert _escape("50% of %(default)s, 10%% off") == "50%% of %(default)s, 10%% off"


def test_info_describes_a_network_file_and_flags_broken_weights(tmp_path, capsys):
    """`info` on a kohya LoRA: module types and parts, ranks, alphas, the training record from its metadata,
    the largest changes, and modules whose weights are not finite (kohya GUI's "Verify LoRA")."""
    import json

    import torch
    from safetensors.torch import save_file

    from lib_sdtrain.cli import main
    from lib_sdtrain.commands.info import describe_network, is_network_file
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out, inp, rank, alpha) in {"lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32, 4, 2.0),
                                          "lora_unet_mid_block_attentions_0_proj_out": (64, 64, 8, 8.0),
                                          "lora_te_text_model_encoder_layers_0_mlp_fc1": (128, 32, 4, 4.0)}.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    tensors["lora_unet_mid_block_attentions_0_proj_out.lora_up.weight"] *= 10          # the largest change
    meta = {"ss_steps": "900", "ss_epoch": "3", "ss_learning_rate": "0.006", "ss_output_name": "zwx",
            "ss_tag_frequency": json.dumps({"10_zwx": {"zwx": 12, "red": 5}}), "ss_sd_model_name": "toy-sd1"}
    save_file(tensors, str(tmp_path / "zwx.safetensors"), metadata=meta)
    d = describe_network(str(tmp_path / "zwx.safetensors"))
    assert d["modules"] == {"unet": 2, "te": 1} and d["ranks"] == [4, 8] and d["alphas"] == [2.0, 4.0, 8.0]
    assert d["kind"] == "network (lora)" and d["not_finite"] == [] and d["base_model"] == "toy-sd1"
    assert d["change_largest"][0].endswith("lora_unet_mid_block_attentions_0_proj_out")
    assert "steps 900" in d["trained"] and d["top_tags"] == "zwx (12), red (5)"
    assert main(["info", str(tmp_path / "zwx.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert "network (lora)" in shown and "not_finite" in shown and "WARNING" not in shown
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=meta)
    assert main(["info", str(tmp_path / "broken.safetensors")]) == 0
    assert "WARNING: lora_unet_down_blocks_0_attentions_0_proj_in" in capsys.readouterr().out
    model = make_tiny_checkpoint(tmp_path / "tiny.safetensors", "sd1")
    assert not is_network_file(str(model)) and is_network_file(str(tmp_path / "zwx.safetensors"))
    # LyCORIS kinds: a LoHa and a LoKr module; the LoKr change is |w1| |w2| (a Kronecker product's norm)
    w1, w2 = torch.full((2, 2), 1.0), torch.full((16, 16), 0.5)
    lyco = {"lora_unet_a.hada_w1_a": torch.ones(32, 2), "lora_unet_a.hada_w1_b": torch.ones(2, 32),
            "lora_unet_a.hada_w2_a": torch.ones(32, 2), "lora_unet_a.hada_w2_b": torch.ones(2, 32),
            "lora_unet_a.alpha": torch.tensor(2.0), "lora_unet_b.lokr_w1": w1, "lora_unet_b.lokr_w2": w2}
    save_file(lyco, str(tmp_path / "lyco.safetensors"))
    d = describe_network(str(tmp_path / "lyco.safetensors"))
    assert d["kind"] == "network (loha, lokr)" and d["ranks"] == [2]
    sizes = dict(reversed(x.split(" ")) for x in d["change_largest"])
    assert float(sizes["lora_unet_b"]) == pytest.approx(2.0 * 8.0)            # |w1| = 2, |w2| = 8, scale 1
    assert float(sizes["lora_unet_a"]) == pytest.approx(128.0)                # (2 · 2 over 32 × 32) · alpha/rank 1


def test_info_describes_embeddings_and_hypernetworks_without_running_pickles(tmp_path, capsys):
    """`info` on an A1111 embedding (.pt SD1, .safetensors SDXL) and a hypernetwork .pt: vectors, widths and the
    family they fit, the prompt word, steps and base; non-finite weights flagged; a pickle that would run code is
    refused by the safe unpickler and runs nothing."""
    import os

    import torch
    from safetensors.torch import save_file

    from lib_sdtrain.cli import main
    from lib_sdtrain.commands.info import describe_any
    from lib_sdtrain.errors import UserError
    from lib_sdtrain.formats.a1111 import (
        embedding_pt_layout,
        hypernetwork_layout,
        write_torch_pt,
    )

    vec = torch.zeros(2, 768)
    vec[0, 0], vec[1, 1] = 3.0, 4.0
    write_torch_pt(tmp_path / "zwx-style.pt", embedding_pt_layout(vec, name="other", step=300, sd_checkpoint="abcd1234",
                                                                  sd_checkpoint_name="toy-sd1"))
    d, addon = describe_any(str(tmp_path / "zwx-style.pt"))
    assert addon and d["kind"].startswith("embedding") and d["prompt_word"] == "zwx-style"   # the file name calls it
    assert (d["vectors"], d["widths"], d["family"], d["vector_norms"]) == (2, [768], "SD1", ["3", "4"])
    assert (d["steps"], d["base_model"], d["base_hash"], d["not_finite"]) == ("300", "toy-sd1", "abcd1234", [])
    save_file({"clip_l": torch.ones(3, 768), "clip_g": torch.full((3, 1280), float("nan"))}, str(tmp_path / "xl.safetensors"))
    d, _ = describe_any(str(tmp_path / "xl.safetensors"))
    assert (d["vectors"], d["widths"], d["family"], d["not_finite"]) == (3, [768, 1280], "SDXL", ["vectors 1"])
    save_file({"emb_params": torch.ones(1, 1000)}, str(tmp_path / "odd.safetensors"))
    assert describe_any(str(tmp_path / "odd.safetensors"))[0]["family"].startswith("unknown")

    def pair(width):
        return tuple({"linear.0.weight": torch.ones(2 * width, width), "linear.0.bias": torch.zeros(2 * width),
                      "linear.1.weight": torch.ones(width, 2 * width), "linear.1.bias": torch.zeros(width)}
                     for _ in "kv")

    modules = {320: pair(320), 768: pair(768)}
    modules[768][1]["linear.1.bias"][0] = float("inf")
    write_torch_pt(tmp_path / "hn.pt", hypernetwork_layout(
        modules, name="hn", step=5, layer_structure=[1, 2, 1], activation_func="swish", is_layer_norm=True,
        weight_initialization="Normal", sd_checkpoint=None, sd_checkpoint_name="toy-sd1", activate_output=False,
        use_dropout=True, dropout_structure=[0, 0.1, 0]))
    d, addon = describe_any(str(tmp_path / "hn.pt"))
    assert addon and d["kind"] == "hypernetwork" and d["widths"] == [320, 768] and d["activation"] == "swish"
    assert d["layer_structure"] == [1.0, 2.0, 1.0] and d["layer_norm"] and d["dropout"] == [0, 0.1, 0]
    assert d["parameters"] == 2 * sum(2 * w * w * 2 + 3 * w for w in (320, 768)) and d["steps"] == "5"
    assert d["not_finite"] == ["768.v.linear.1.bias"]
    assert main(["info", str(tmp_path / "hn.pt")]) == 0
    assert "WARNING: 768.v.linear.1.bias" in capsys.readouterr().out

    class Runs:   # what a hostile .pt does: a global that runs a command when unpickled
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    torch.save({"string_to_param": {"*": Runs()}}, tmp_path / "hostile.pt")
    with pytest.raises(UserError):
        describe_any(str(tmp_path / "hostile.pt"))
    assert main(["info", str(tmp_path / "hostile.pt")]) != 0 and not (tmp_path / "ran").exists()


def _bare_checkpoint(path, family, *, layout="stock", **unet):
    """A tiny checkpoint of `family` with `unet` changes to its UNet config, saved without our metadata (as
    published checkpoints are: nothing says the layout or the heads)."""
    from safetensors.torch import save_file

    from lib_sdtrain.models import checkpoint as ckpt
    from lib_sdtrain.testing.tiny import tiny_architecture

    arch = tiny_architecture(family, layout=layout)
    arch.unet.update(unet)
    parts = ckpt.build_modules(arch, empty=False)
    save_file({k: v.contiguous() for k, v in ckpt.ldm_state_dict(arch, *parts).items()}, str(path))
    return path


def test_info_says_what_the_tool_sees_in_a_checkpoint(tmp_path, capsys):
    """Family, prediction type and native size with where each came from; the UNet layout against the family's
    stock one; the heads and where they came from; the LoRA targets A1111 places right; whether it trains. These
    were not shown: a distilled SDXL and a stock one looked alike, and a model LoRA training refuses did not say so."""
    import json

    from lib_sdtrain.cli import main
    from lib_sdtrain.commands.info import describe, unet_description
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint, tiny_architecture

    # stock SD1 (our own file: its metadata gives prediction, size and heads); the blocks are SD1's, the widths tiny
    d = describe(str(make_tiny_checkpoint(tmp_path / "sd1.safetensors", "sd1")), with_hash=False)
    assert (d["family"], d["prediction"], d["prediction_from"]) == ("SD1", "eps", "the file's lab.architecture metadata")
    assert (d["native_size"], d["native_size_from"]) == (64, "lab.architecture metadata")
    assert d["unet_layout"]["differs"] == ["widths"] and d["attention_heads"] == "2 per layer"
    assert d["attention_heads_from"] == "the file's lab.architecture metadata"
    assert d["lora_targets"] == ["attn", "attn_mlp", "full"] and d["training"] == "supported"
    assert main(["info", str(tmp_path / "sd1.safetensors"), "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "stock SD1 blocks at other widths: 32, 32, 64, 64 (stock 320, 640, 1280, 1280)" in out
    assert len(out.splitlines()) == len(d)            # short: one line per field
    # at stock widths the layout is one word
    stock = unet_description("sdxl", {**tiny_architecture("sdxl").unet, "block_out_channels": [320, 640, 1280],
                                      "transformer_layers_per_block": [1, 2, 10]})[0]
    assert stock["stock"] and stock["differs"] == []

    # a distilled SDXL without metadata: its own depths, the stock head rule assumed, everything trains
    path = _bare_checkpoint(tmp_path / "distilled.safetensors", "sdxl", layout="distilled")
    d = describe(str(path), with_hash=False)
    assert (d["family"], d["prediction_from"]) == ("SDXL", "SDXL's default")
    assert d["native_size_from"] == "a small UNet (32 channels, no size in the metadata)"
    layout = d["unet_layout"]
    assert layout["differs"] == ["widths", "down", "up", "middle"] and layout["res_blocks"] == 2
    assert layout["down"] == [[0, 0], [2, 1], [1, 1]] and layout["up"] == [[2, 1, 3], [1, 1, 2], [0, 0, 0]]
    assert layout["middle"] == {"res_blocks": 1, "depth": 0}
    assert d["attention_heads"] == "-, 1, 1 per level"          # 64 wide at 64 channels per head; level 0 has none
    assert d["attention_heads_from"].startswith("SDXL's stock rule, 64 channels per head (assumed")
    assert d["lora_targets"] == ["attn", "attn_mlp", "full"] and d["training"] == "supported"
    assert main(["info", str(path), "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "not the stock SDXL layout" in out
    assert "down depths   0 0 | 2 1 | 1 1   (stock 0 0 | 2 2 | 10 10)" in out
    assert "middle block  one res block, no attention   (stock res, 10 transformer block(s), res)" in out
    assert "res blocks    2 per level\n" in out                 # what does not differ names no stock value
    assert main(["info", str(path), "--no-hash", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unet_layout"] == layout      # the same fields in JSON
    # heads from a .yaml beside the file, as A1111 reads it
    path.with_suffix(".yaml").write_text("model:\n  params:\n    unet_config:\n      params:\n        num_heads: 4\n")
    d = describe(str(path), with_hash=False)
    assert d["attention_heads"] == "-, 4, 4 per level"
    assert d["attention_heads_from"] == "distilled.yaml beside the file (num_heads 4)"

    # SD1 with one res block per level: A1111 would misplace every UNet LoRA layer, so LoRA on the UNet is refused
    path = _bare_checkpoint(tmp_path / "one.safetensors", "sd1", layers_per_block=1)
    d = describe(str(path), with_hash=False, prediction="v")
    assert (d["prediction"], d["prediction_from"]) == ("v", "given (override)")
    assert d["unet_layout"]["res_blocks"] == 1 and "res_blocks" in d["unet_layout"]["differs"]
    assert d["lora_targets"] == []
    assert d["training"].startswith("LoRA-family runs that train the UNet are refused: this SD1 UNet's layout is "
                                    "not the stock one")
    assert "'down_blocks.1.attentions.0.proj_in' would go to 'input_blocks_4_1_proj_in'" in d["training"]
    assert d["training"].endswith("(text-encoder-only LoRA, embeddings, hypernetworks, DreamBooth, fine-tuning) are "
                                  "supported")
    assert main(["info", str(path), "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "res blocks    1 per level   (stock 2)" in out
    assert "lora_targets" in out and "none A1111 places right on the UNet (text encoder only)" in out


def _full_load_description(path, prediction=None):
    """What `info` read from a checkpoint when it loaded the whole model (modules built, every weight assigned):
    the reference the header-only reading must match."""
    from lib_sdtrain.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(path, prediction=prediction)
    def count(m) -> int:
        return sum(p.numel() for p in m.parameters())

    params = {"unet": count(loaded.unet), "vae": count(loaded.vae)}
    for i, enc in enumerate(loaded.text_encoders):
        params[f"text_encoder{'' if i == 0 else '_' + str(i + 1)}"] = count(enc)
    return {"arch": loaded.arch, "parameters": params, "sources": loaded.sources, "extras": len(loaded.extras),
            "dtypes": sorted({str(d).replace("torch.", "") for d in loaded.dtypes.values() if d.is_floating_point})}


def _tiny_checkpoints(tmp_path):
    """(file, prediction override) for each tiny family: our own files (metadata), fp16, a distilled SDXL, an SD2
    without metadata (A1111's test decides), an override and a pickled .ckpt."""
    import torch
    from safetensors.torch import load_file

    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    files = [(make_tiny_checkpoint(tmp_path / f"{f}.safetensors", f), None) for f in ("sd1", "sd2", "sdxl")]
    files.append((make_tiny_checkpoint(tmp_path / "sdxl16.safetensors", "sdxl", dtype=torch.float16), None))
    files.append((_bare_checkpoint(tmp_path / "distilled.safetensors", "sdxl", layout="distilled"), None))
    files.append((_bare_checkpoint(tmp_path / "bare-sd2.safetensors", "sd2"), None))
    files.append((files[0][0], "v"))
    sd = load_file(str(files[0][0]))          # a pickled SD1 .ckpt in a lightning wrapper, with an EMA copy
    torch.save({"state_dict": {**sd, "model_ema.decay": torch.tensor(0.99)}}, tmp_path / "sd1.ckpt")
    files.append((tmp_path / "sd1.ckpt", None))
    return files


def test_info_on_a_checkpoint_gives_what_the_full_load_gave(tmp_path):
    """`info` reads a checkpoint's header instead of loading the model: family, prediction and its source, heads
    and their source, layout, parameter counts per part, dtypes and extra tensors are those the full load gives,
    on tiny SD1, SD2-v, SDXL (float32 and float16), a distilled SDXL and an SD2 without metadata."""
    from lib_sdtrain.commands.info import describe

    for path, prediction in _tiny_checkpoints(tmp_path):
        ref = _full_load_description(path, prediction)
        d = describe(str(path), prediction=prediction, with_hash=False)
        arch = ref["arch"]
        assert d["family"].split()[0] == arch.family.upper(), path
        assert (d["prediction"], d["prediction_from"]) == (arch.prediction, ref["sources"]["prediction"]), path
        assert d["attention_heads_from"] == ref["sources"]["heads"], path
        assert d["parameters"] == ref["parameters"] and list(d["parameters"]) == list(ref["parameters"]), path
        assert d["parameters_total"] == sum(ref["parameters"].values())
        assert (d["dtypes"], d["extra_tensors"]) == (ref["dtypes"], ref["extras"]), path
        assert d["latent_scale"] == arch.latent_scale and d["context_dim"] == arch.unet["cross_attention_dim"]
        assert d["text_layers"] == [t["num_hidden_layers"] for t in arch.text]
        from lib_sdtrain.commands.info import training_support, unet_description

        assert (d["unet_layout"], d["attention_heads"]) == unet_description(arch.family, arch.unet)
        assert {k: d[k] for k in ("lora_targets", "training")} == training_support(arch.family, arch.unet)
        assert (d["prediction_from"] == "given (override)") == bool(prediction)
    assert describe(str(tmp_path / "sdxl16.safetensors"), with_hash=False)["dtypes"] == ["float16"]
    assert describe(str(tmp_path / "sdxl.safetensors"), with_hash=False)["dtypes"] == ["float32"]


def test_info_on_a_checkpoint_builds_no_model_and_reads_no_weights(tmp_path, monkeypatch):
    """`info` built the whole model (diffusers and transformers modules) and read every weight to describe a
    checkpoint: many GB and a long wait on a real SDXL file. Now the header is enough; only an SD2 file that
    nothing says the prediction type of has its UNet (alone) built and read, for A1111's test."""
    from lib_sdtrain.commands.info import describe
    from lib_sdtrain.formats import safetensors_io
    from lib_sdtrain.models import checkpoint as ckpt

    files = _tiny_checkpoints(tmp_path)
    read_safetensors, build_unet = safetensors_io.read_safetensors, ckpt.build_unet

    def refused(*args, **kwargs):
        raise AssertionError("the model was loaded")

    read, built = [], []
    monkeypatch.setattr(ckpt, "build_modules", refused)
    monkeypatch.setattr(ckpt, "load_from_state_dict", refused)
    monkeypatch.setattr(ckpt, "read_state_dict", refused)
    monkeypatch.setattr(safetensors_io, "read_safetensors", lambda path, keys=None: read.append(keys) or
                        (refused() if keys is None else read_safetensors(path, keys)))
    monkeypatch.setattr(ckpt, "build_unet", lambda arch, **kw: built.append(arch.family) or build_unet(arch, **kw))
    for path, prediction in files:
        read.clear(), built.clear()
        d = describe(str(path), prediction=prediction, with_hash=False)
        if path.name == "bare-sd2.safetensors":
            assert built == ["sd2"] and len(read) == 1 and read[0]
            assert all(k.startswith("model.diffusion_model.") for k in read[0])      # the UNet's weights only
            assert d["prediction_from"].startswith("A1111's SD2 test")
        else:
            assert (read, built) == ([], []), path
    assert d["family"] == "SD1" and d["parameters"]["unet"] > 0 and d["file"].endswith(".ckpt")


def test_a_device_this_computer_lacks_is_one_line_not_a_traceback(tmp_path, capsys):
    """--device bogus / CPU / cuda on a machine without CUDA / cuda:99 reached torch as it was typed: sample, toy
    evaluate, toy pretrain, compare and the app stopped with a RuntimeError or AssertionError traceback."""
    import torch

    from lib_sdtrain.cli import main
    from lib_sdtrain.hosts.standalone import resolve_device
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "tiny.safetensors", "sd1")
    out = tmp_path / "s.png"
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    for device, why in (("bogus", "unknown device 'bogus'"), (missing, f"device {missing}:"),
                        ("cuda:99", "device cuda:99:"), ("xla", "device xla:")):
        assert main(["sample", str(model), "--out", str(out), "--steps", "1", "--device", device]) == 2, device
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
        assert main(["toy", "evaluate", str(model), "--n", "1", "--steps", "1", "--device", device]) == 2
        assert main(["toy", "pretrain", "--out", str(tmp_path / "p" / "m.safetensors"), "--device", device]) == 2
        assert why in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "p").exists()    # refused before any file or folder was made
    assert resolve_device(" CPU ") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda")
    assert resolve_device("") == resolve_device(None)


def test_info_prints_a_files_names_and_metadata_with_control_characters_escaped(tmp_path, capsys):
    """`info` printed the file name and a network's metadata (base model, output name, tags) as they were: a
    downloaded LoRA's escape sequences reached the terminal (clear the screen, set the title) and a newline broke
    the table. JSON keeps them exact."""
    import json

    import torch
    from safetensors.torch import save_file

    from lib_sdtrain.cli import main

    tensors = {"lora_unet_a.lora_down.weight": torch.ones(2, 8), "lora_unet_a.lora_up.weight": torch.ones(8, 2),
               "lora_unet_a.alpha": torch.tensor(2.0)}
    meta = {"ss_sd_model_name": "toy\x1b[2J\x1b]0;title\x07", "ss_output_name": "two\nlines",
            "ss_tag_frequency": json.dumps({"1_x": {"red\x1b[31m": 3}})}
    path = tmp_path / "odd\x1bname.safetensors"
    save_file(tensors, str(path), metadata=meta)
    assert main(["info", str(path), "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "toy\\x1b[2J" in out and "two\\nlines" in out
    assert main(["info", str(path), "--no-hash", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["base_model"] == meta["ss_sd_model_name"] and d["file"] == str(path)
    assert [line.split()[0] for line in out.splitlines()] == list(d), out          # one line per key


def test_info_check_loads_every_weight_and_finds_what_the_header_cannot(tmp_path, capsys):
    """`info` reads a checkpoint's header alone (fast, little memory), which cannot see a tensor missing inside a
    block; `--check` loads the model as training does and refuses such a file with the loader's reason."""
    from safetensors.torch import load_file, save_file

    from lib_sdtrain.cli import main
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    good = make_tiny_checkpoint(tmp_path / "good.safetensors", "sd1")
    assert main(["info", str(good), "--no-hash", "--check"]) == 0
    tensors = load_file(str(good))
    gone = next(k for k in sorted(tensors) if k.startswith("model.diffusion_model.input_blocks.1.0.")
                and k.endswith("in_layers.0.bias"))
    del tensors[gone]
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged))
    capsys.readouterr()
    assert main(["info", str(damaged), "--no-hash"]) == 0      # the header alone describes it
    assert main(["info", str(damaged), "--no-hash", "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_info_check_on_an_sd2_file_without_a_hint_tests_its_prediction_once(tmp_path, monkeypatch, capsys):
    """`--check` loads the model, which runs A1111's prediction test on an SD2 file nothing describes; the header
    reading after it takes that answer instead of building and running the UNet a second time."""
    import json

    from lib_sdtrain.cli import main
    from lib_sdtrain.models import checkpoint as ckpt

    path = _bare_checkpoint(tmp_path / "bare-sd2.safetensors", "sd2")
    assert main(["info", str(path), "--no-hash", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    runs, real = [], ckpt.probe_v_prediction

    def counted(unet):
        runs.append(1)
        return real(unet)

    monkeypatch.setattr(ckpt, "probe_v_prediction", counted)
    assert main(["info", str(path), "--no-hash", "--json", "--check"]) == 0
    assert json.loads(capsys.readouterr().out) == plain and len(runs) == 1
    assert plain["prediction_from"] and plain["family"].startswith("SD2")
