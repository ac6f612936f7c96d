"""diffusers / PEFT LoRA → kohya: A1111's arithmetic on the converted file reproduces the peft model's output.

For tiny SD1, SD2-v and SDXL models (float64) a peft LoRA is put on the UNet (attention, feed-forward,
proj_in/out and ResNet convolutions) and the text encoder(s), saved in one of the layouts people meet
(diffusers `save_lora_weights` with an adapter_config.json beside it; PEFT `save_pretrained` folders per
component; the pre-PEFT diffusers keys), converted, and then A1111 v1.10's formula (`a1111_lora_math`) is
applied to the base model's *single-file* weights at the golden `ldm_weight_key` of each converted name
(OpenCLIP q/k/v into their `in_proj_weight` rows). The model rebuilt from those weights must give the peft
model's output. Full-size names: a rank-1 LoRA on every golden target, written from the golden diffusers
module paths, converts with the family detected from its shapes to exactly the golden name set.
"""

import json
import re

import pytest
import torch

import a1111_lora_math as a1111
from conftest import golden_rows, golden_shape
from lib_sdtrain.cli import main as cli_main
from lib_sdtrain.convert import lora as conv
from lib_sdtrain.errors import UserError
from lib_sdtrain.formats import hashes
from lib_sdtrain.formats.safetensors_io import read_safetensors, write_safetensors
from lib_sdtrain.models.checkpoint import ldm_state_dict, load_from_state_dict
from lib_sdtrain.testing.tiny import build_tiny

FAMILIES = {"sd1": "sd15", "sd2": "sd2_768v", "sdxl": "sdxl_base"}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SLICE = re.compile(r"^(.+)\[(\d+):(\d+)\]$")


@pytest.fixture(autouse=True)
def float64_one_thread():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)    # models and adapters in float64: only the algebra is compared
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def golden_keys(family):
    return {r["kohya_key_prefix"]: r["ldm_weight_key"] for r in golden_rows(f"{FAMILIES[family]}_lora_targets.tsv")}


def forward(loaded, seed=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49408, (1, 6), generator=g)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    hidden, kwargs = [], {}
    with torch.no_grad():
        for i, enc in enumerate(loaded.text_encoders):
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.last_hidden_state)
            if loaded.arch.family == "sdxl" and i == 1:
                kwargs["added_cond_kwargs"] = {"text_embeds": out.text_embeds,
                                               "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        return loaded.unet(x, torch.tensor([500]), encoder_hidden_states=torch.cat(hidden, -1), **kwargs).sample


def apply_like_a1111(base, tensors, where):
    """A1111's merge of a kohya file into single-file weights, at the golden LDM weight of each module name."""
    out = dict(base)
    for name, w in a1111.split_modules(tensors).items():
        key = where[name]                       # KeyError = a name A1111 would not find
        m = SLICE.match(key)
        if m:                                   # OpenCLIP q/k/v: one third of in_proj_weight (tiny width)
            key, start, stop = m.group(1), int(m.group(2)), int(m.group(3))
            third = start // (stop - start)
            width = out[key].shape[0] // 3
            rows = slice(third * width, (third + 1) * width)
            new = out[key].clone()
            new[rows] = new[rows] + a1111.updown(w, new[rows])
            out[key] = new
        else:
            out[key] = out[key] + a1111.updown(w, out[key])
    return out


def add_peft(module, r, alpha, targets, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(r * 31 + len(targets))
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)
    return get_peft_model(module, cfg), cfg


def state(pm):
    from peft import get_peft_model_state_dict

    return {k[len("base_model.model."):]: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}


OLD = [(".lora_A.weight", ".lora.down.weight"), (".lora_B.weight", ".lora.up.weight")]
OLD_TEXT = [(".lora_A.weight", ".lora_linear_layer.down.weight"), (".lora_B.weight", ".lora_linear_layer.up.weight")]


def rename(sd, table):
    out = {}
    for k, v in sd.items():
        for a, b in table:
            if k.endswith(a):
                k = k[: -len(a)] + b
        out[k] = v
    return out


def make_lora(family, layout, tmp_path):
    """Tiny model with peft adapters + the LoRA saved in `layout`; returns (loaded, base ldm sd, input path)."""
    loaded = build_tiny(family)
    base = {k: v.detach().clone() for k, v in ldm_state_dict(loaded.arch, loaded.unet, loaded.vae,
                                                             loaded.text_encoders, loaded.extras).items()}
    names = ["text_encoder", "text_encoder_2"]
    if layout == "diffusers+config":          # one file, one adapter_config.json (alpha_pattern exercised)
        kw = dict(alpha_pattern={"to_k": 2.0, "k_proj": 1.0})
        pu, cfg = add_peft(loaded.unet, 4, 8, UNET_TARGETS + TEXT_TARGETS, **kw)
        pts = [add_peft(e, 4, 8, UNET_TARGETS + TEXT_TARGETS, **kw)[0] for e in loaded.text_encoders]
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        out = tmp_path / f"{family}-diffusers"
        pipe = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        layers = {"unet_lora_layers": state(pu), **{f"{n}_lora_layers": state(p) for n, p in zip(names, pts)}}
        pipe.save_lora_weights(str(out), **layers)
        cfg.save_pretrained(str(out))
        path = out / "pytorch_lora_weights.safetensors"
    elif layout == "peft-folders":            # PEFT save_pretrained per component, own rank/alpha/rsLoRA each
        path = tmp_path / f"{family}-peft"
        pu, _ = add_peft(loaded.unet, 4, 8, UNET_TARGETS, use_rslora=True)
        pu.save_pretrained(str(path / "unet"))
        for n, e, (r, a) in zip(names, loaded.text_encoders, [(2, 3), (3, 5)]):
            add_peft(e, r, a, TEXT_TARGETS)[0].save_pretrained(str(path / n))
    else:                                     # pre-PEFT diffusers keys, no alphas anywhere (scale 1)
        pu, _ = add_peft(loaded.unet, 4, 4, UNET_TARGETS)
        sd = {"unet." + k: v for k, v in rename(state(pu), OLD).items()}
        for n, e in zip(names, loaded.text_encoders):
            sd.update({f"{n}.{k}": v for k, v in rename(state(add_peft(e, 2, 2, TEXT_TARGETS)[0]), OLD_TEXT).items()})
        path = write_safetensors(tmp_path / f"{family}_old_style.safetensors", sd, {"format": "pt"})
    return loaded, base, path


CASES = [("sd1", "diffusers+config"), ("sd2", "peft-folders"), ("sdxl", "old-diffusers"),
         ("sdxl", "peft-folders")]


@pytest.mark.parametrize("family,layout", CASES)
def test_converted_lora_matches_peft_in_a1111(family, layout, tmp_path):
    loaded, base, path = make_lora(family, layout, tmp_path)
    y_peft = forward(loaded)
    out = tmp_path / "out" / conv.output_name(path)
    result = conv.convert_lora(path, out, family=family)   # tiny widths: the family must be given
    assert result.status == "converted" and result.output == out
    tensors, meta = read_safetensors(out)

    # names: every one is a golden full-size target name, and all three kohya leaves are there
    where = golden_keys(family)
    modules = a1111.split_modules(tensors)
    assert set(modules) <= set(where), sorted(set(modules) - set(where))[:3]
    assert all(set(w) == {"lora_down.weight", "lora_up.weight", "alpha"} for w in modules.values())
    n_text = sum(n.startswith("lora_te") for n in modules)
    assert n_text and len(modules) - n_text > 0
    if family == "sdxl":
        assert {n.split("_text_model")[0] for n in modules if n.startswith("lora_te")} == {"lora_te1", "lora_te2"}

    # A1111's math on the single-file weights, model rebuilt from them = the peft model
    merged = apply_like_a1111(base, tensors, where)
    rebuilt = load_from_state_dict(merged, loaded.arch)
    y_a1111 = forward(rebuilt)
    y_base = forward(load_from_state_dict(base, loaded.arch))
    scale = y_peft.abs().max().item()
    assert (y_peft - y_base).abs().max().item() / scale > 1e-2      # the LoRA does something
    err = (y_peft - y_a1111).abs().max().item() / scale
    assert err < 1e-9, err

    # metadata A1111 and kohya tools read
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[family]
    assert meta["ss_v2"] == str(family == "sd2")
    assert meta["converted_kind"] == "lora" and meta["converted_from_sha256"]
    assert meta["sshs_model_hash"] == hashes.addnet_hash(out) == result.hashes["addnet_hash"]
    assert result.hashes["shorthash"] == result.hashes["addnet_hash"][:12]
    expect_dim = {"sd1": "4", "sd2": "4", "sdxl": "4"}[family]
    assert meta["ss_network_dim"] == expect_dim
    if layout == "peft-folders":
        assert json.loads(meta["lab.rank_alpha"])["ranks"]     # ranks differ per component: recorded
    assert all(tensors[k].dtype == torch.float64 for k in tensors if not k.endswith(".alpha"))


def test_full_size_names_are_golden_and_family_is_detected(tmp_path):
    """Rank-1 LoRA on every golden target (paths from the golden diffusers tables), family auto-detected."""
    for family, golden in FAMILIES.items():
        rows = golden_rows(f"{golden}_lora_targets.tsv")
        unet_paths = {}
        if family == "sdxl":
            unet_paths = {r["ldm_key"]: r["diffusers_key"] for r in golden_rows("sdxl_base_diffusers_to_ldm_unet.tsv")}
        sd = {}
        for r in rows:
            name = r["kohya_key_prefix"]
            shape = golden_shape(r["kohya_source_weight_shape"])
            if name.startswith("lora_unet_"):
                comp = "unet"
                path = unet_paths[r["ldm_weight_key"]][: -len(".weight")] if family == "sdxl" else r["kohya_source_module"]
            else:
                comp = "text_encoder_2" if name.startswith("lora_te2_") else "text_encoder"
                path = r["kohya_source_module"]
            sd[f"{comp}.{path}.lora_A.weight"] = torch.zeros(1, *shape[1:], dtype=torch.float16)
            sd[f"{comp}.{path}.lora_B.weight"] = torch.zeros(shape[0], 1, *[1] * (len(shape) - 2), dtype=torch.float16)
        source = conv.read_lora(write_safetensors(tmp_path / f"{family}.safetensors", sd, {}))
        assert conv.detect_family(source) == family
        result = conv.to_kohya(source)
        assert result.family == family
        assert set(a1111.split_modules(result.tensors)) == {r["kohya_key_prefix"] for r in rows}
        assert set(conv.stock_targets(family)) == {r["kohya_key_prefix"] for r in rows}
        assert all(float(v) == 1.0 for k, v in result.tensors.items() if k.endswith(".alpha"))  # scale 1
        if family == "sd1":   # a module that is no kohya target is refused, named
            bad = dict(sd, **{"unet.conv_in.lora_A.weight": torch.zeros(1, 4, 3, 3),
                              "unet.conv_in.lora_B.weight": torch.zeros(320, 1, 1, 1)})
            with pytest.raises(UserError, match="unet.conv_in"):
                conv.to_kohya(conv.read_lora(write_safetensors(tmp_path / "bad.safetensors", bad, {})))


def test_alpha_sources_and_key_layouts(tmp_path):
    down, up = torch.ones(4, 32), torch.ones(32, 4)
    p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    sd = {f"unet.{p}.to_q.lora_A.weight": down, f"unet.{p}.to_q.lora_B.weight": up,
          f"unet.{p}.to_k.lora.down.weight": down, f"unet.{p}.to_k.lora.up.weight": up,
          f"unet.{p}.to_k.alpha": torch.tensor(2.0),                        # an alpha tensor wins
          f"{p}.processor.to_v_lora.down.weight": down, f"{p}.processor.to_v_lora.up.weight": up,
          f"{p}.processor.to_out_lora.down.weight": down, f"{p}.processor.to_out_lora.up.weight": up,
          "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": down,
          "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": up}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 1.0,
                                                 "text_encoder.r": 4, "text_encoder.lora_alpha": 8})}
    f = write_safetensors(tmp_path / "mixed.safetensors", sd, meta)
    out = conv.to_kohya(conv.read_lora(f), family="sd1")
    alpha = {k[: -len(".alpha")]: float(v) for k, v in out.tensors.items() if k.endswith(".alpha")}
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    assert alpha == {f"{base}_to_q": 1.0, f"{base}_to_k": 2.0, f"{base}_to_v": 1.0, f"{base}_to_out_0": 1.0,
                     "lora_te_text_model_encoder_layers_0_self_attn_q_proj": 8.0}
    # --lora-alpha overrides every source
    forced = conv.to_kohya(conv.read_lora(f), family="sd1", lora_alpha=4.0, dtype="fp16")
    assert {float(v) for k, v in forced.tensors.items() if k.endswith(".alpha")} == {4.0}
    assert {v.dtype for k, v in forced.tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    # peft's pattern rule: `.*\.key$`
    assert conv._pattern_value({"to_k": 3}, "a.attn1.to_k") == 3 and conv._pattern_value({"to_k": 3}, "a.to_kx") is None


def test_refusals(tmp_path):
    def write(name, sd, cfg=None):
        folder = tmp_path / name
        folder.mkdir()
        write_safetensors(folder / "adapter_model.safetensors", sd, {})
        if cfg is not None:
            (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return folder

    pair = {"base_model.model.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.ones(2, 8),
            "base_model.model.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.ones(16, 2)}
    # peft's DoRA: magnitude per output row, which no A1111 v1.10 file can express (its dora_scale is per column)
    with pytest.raises(UserError, match="DoRA adapter: peft's DoRA keeps its magnitude per output row.*"
                                        "network_type dora"):
        conv.read_lora(write("dora", {**pair, "base_model.model.text_model.encoder.layers.0.mlp.fc1."
                                              "lora_magnitude_vector": torch.ones(16)}))
    with pytest.raises(UserError, match="DoRA adapter: .*per input column"):
        conv.to_kohya(conv.read_lora(write("dora2", pair, {"r": 2, "lora_alpha": 2, "use_dora": True})), family="sd1")
    with pytest.raises(UserError, match="rank 4"):
        conv.to_kohya(conv.read_lora(write("rank", pair, {"r": 4, "lora_alpha": 2})), family="sd1")
    with pytest.raises(UserError, match="not diffusers/PEFT LoRA weights, e.g. weird.key"):
        conv.read_lora(write("unknown", {**pair, "weird.key": torch.ones(1)}))
    with pytest.raises(UserError, match="half"):
        conv.read_lora(write("half", {k: v for k, v in pair.items() if "lora_A" in k}))
    with pytest.raises(UserError, match="already a kohya"):
        conv.read_lora(write("kohya", {"lora_unet_x.lora_down.weight": torch.ones(1, 1)}))
    with pytest.raises(UserError, match="--family"):   # tiny widths fit no stock model
        conv.to_kohya(conv.read_lora(write("tiny", pair)))
    with pytest.raises(UserError, match="no LoRA weights"):
        conv.read_lora(tmp_path / "missing")
    # A1111 needs q, k, v and out_proj together on OpenCLIP encoders: a partial layer is reported
    q = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(1, 32),
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(32, 1)}
    out = conv.to_kohya(conv.read_lora(write_safetensors(tmp_path / "q.safetensors", q, {})), family="sd2")
    assert out.warnings and "all four" in out.warnings[0]


def test_cli_to_kohya_and_exit_codes(tmp_path, capsys):
    p = "text_model.encoder.layers.0.mlp.fc1"
    good = write_safetensors(tmp_path / "in" / "mine.safetensors",
                             {f"text_encoder.{p}.lora_A.weight": torch.ones(2, 32),
                              f"text_encoder.{p}.lora_B.weight": torch.ones(64, 2)}, {})
    bad = write_safetensors(tmp_path / "in" / "bad.safetensors", {"nonsense": torch.ones(1)}, {})
    out = tmp_path / "out"
    assert cli_main(["convert", str(good), "--to", "kohya", "--family", "sd1", "--output", str(out)]) == 0
    tensors, meta = read_safetensors(out / "mine.safetensors")
    assert set(tensors) == {f"lora_te_{p.replace('.', '_')}.{leaf}" for leaf in ("lora_down.weight",
                                                                                 "lora_up.weight", "alpha")}
    text = capsys.readouterr().out
    assert "mine.safetensors" in text and hashes.addnet_hash(out / "mine.safetensors")[:12] in text
    # existing output is refused (exit 1), a bad input too; auto-detection picks the LoRA path
    assert cli_main(["convert", str(good), "--family", "sd1", "--output", str(out)]) == 1
    assert cli_main(["convert", str(bad), "--to", "kohya", "--output", str(out)]) == 1
    assert "REFUSED" in capsys.readouterr().out
    assert cli_main(["convert", str(good), "--family", "sd1", "--output", str(tmp_path / "o2")]) == 0
    assert (tmp_path / "o2" / "mine.safetensors").is_file()


def test_two_inputs_of_one_batch_never_write_the_same_output(tmp_path):
    """Only pickles were checked for a shared output name: two diffusers LoRAs named alike (or a LoRA and a
    pickle) both 'converted', and with --overwrite the second replaced the first's output."""
    from lib_sdtrain.convert.output import ConvertConfig
    from lib_sdtrain.convert.report import convert_inputs

    p = "text_model.encoder.layers.0.mlp.fc1"
    inputs = [write_safetensors(tmp_path / d / "mine.safetensors",
                                {f"text_encoder.{p}.lora_A.weight": torch.full((2, 32), v),
                                 f"text_encoder.{p}.lora_B.weight": torch.ones(64, 2)}, {})
              for d, v in (("a", 1.0), ("b", 2.0))]
    torch.save({"string_to_param": {"*": torch.ones(2, 768)}, "name": "mine"}, tmp_path / "b" / "mine.pt")
    out = tmp_path / "out"
    results = convert_inputs([*inputs, tmp_path / "b" / "mine.pt"], out, ConvertConfig(overwrite=True),
                             family="sd1")
    assert [r.status for r in results] == ["converted", "refused", "refused"]
    assert all(f"would write mine.safetensors like {inputs[0]}" in r.message for r in results[1:])
    down = read_safetensors(out / "mine.safetensors")[0][f"lora_te_{p.replace('.', '_')}.lora_down.weight"]
    assert torch.equal(down, torch.ones(2, 32))     # the first input's, not replaced by the second
    # a pickle first keeps the name too (it is converted after the others)
    results = convert_inputs([tmp_path / "b" / "mine.pt", inputs[0]], tmp_path / "o2", ConvertConfig(), family="sd1")
    assert [r.status for r in results] == ["refused", "converted"] and "like" in results[0].message


@pytest.mark.parametrize("cfg, match", [
    ({"r": 2, "lora_alpha": "big"}, "lora_alpha is 'big'"),                    # was ValueError
    ({"r": 2, "lora_alpha": float("nan")}, "lora_alpha is nan"),               # was a LoRA of NaN
    ({"r": 2.5, "lora_alpha": 2}, "r is 2.5"),
    ({"r": "two", "lora_alpha": 2}, "r is 'two'"),                             # was ValueError
    ({"r": 2, "lora_alpha": 2, "alpha_pattern": ["fc1"]}, "alpha_pattern is list"),   # was AttributeError
    ({"r": 2, "lora_alpha": 2, "rank_pattern": {"(": 2}}, "pattern '\\('"),    # was re.error
])
def test_odd_adapter_config_values_are_refused(tmp_path, cfg, match):
    folder = tmp_path / "adapter"
    folder.mkdir()
    write_safetensors(folder / "adapter_model.safetensors",
                      {"base_model.model.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.ones(2, 8),
                       "base_model.model.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.ones(16, 2)}, {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=match):
        conv.to_kohya(conv.read_lora(folder), family="sd1")


def test_non_finite_alphas_are_refused_and_non_finite_weights_told(tmp_path):
    p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    pair = {f"{p}.lora_A.weight": torch.ones(4, 32), f"{p}.lora_B.weight": torch.ones(32, 4)}
    good = write_safetensors(tmp_path / "good.safetensors", pair, {})
    for value in (float("nan"), float("inf")):          # --lora-alpha nan / inf wrote that alpha into every module
        with pytest.raises(UserError, match="not a finite number"):
            conv.to_kohya(conv.read_lora(good), family="sd1", lora_alpha=value)
    nan_alpha = write_safetensors(tmp_path / "a.safetensors", {**pair, f"{p}.alpha": torch.tensor(float("nan"))}, {})
    with pytest.raises(UserError, match="alpha tensor is nan"):
        conv.to_kohya(conv.read_lora(nan_alpha), family="sd1")
    nan_weights = write_safetensors(tmp_path / "w.safetensors",
                                    {**pair, f"{p}.lora_A.weight": torch.full((4, 32), float("nan"))}, {})
    out = conv.to_kohya(conv.read_lora(nan_weights), family="sd1")      # converted as it is, with a warning
    assert any("NaN or infinite weights" in w for w in out.warnings)
    assert not any("NaN" in w for w in conv.to_kohya(conv.read_lora(good), family="sd1").warnings)


def test_a_lora_alpha_of_zero_below_or_past_float32_is_refused_before_any_file(tmp_path, capsys):
    """--lora-alpha 0 and -1 were written as they were (0 switches the LoRA off in A1111, -1 turns it round), and
    1e300 became an alpha tensor of inf in float32: each a "converted" file that A1111 draws wrongly with."""
    from lib_sdtrain.ui.convert_tab import parse_alpha

    p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    good = write_safetensors(tmp_path / "in.safetensors",
                             {f"{p}.lora_A.weight": torch.ones(4, 32), f"{p}.lora_B.weight": torch.ones(32, 4)}, {})
    out = tmp_path / "out"
    for value, why in (("0", "more than 0"), ("-1", "more than 0"), ("1e300", "float32"), ("nan", "finite")):
        assert cli_main(["convert", str(good), "--to", "kohya", "--family", "sd1", "--output", str(out),
                         "--lora-alpha", value]) == 2, value
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
        with pytest.raises(UserError, match=why):
            conv.to_kohya(conv.read_lora(good), family="sd1", lora_alpha=float(value))
        with pytest.raises(UserError, match=why):          # the Convert tab's box: the same rule
            parse_alpha(value)
    assert not out.exists()
    assert cli_main(["convert", str(good), "--to", "kohya", "--family", "sd1", "--output", str(out),
                     "--lora-alpha", "1e30"]) == 0
    alpha = read_safetensors(out / "in.safetensors")[0]["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]
    assert torch.isfinite(alpha) and float(alpha) == pytest.approx(1e30, rel=1e-6)
