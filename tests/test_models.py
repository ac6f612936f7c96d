"""The standalone loader and saver against the golden A1111 data and tiny models of each family."""

import re

import pytest
import torch

from conftest import GOLDEN, golden_rows as _tsv, golden_shape as _shape
from lib_sdtrain.errors import UserError
from lib_sdtrain.models import checkpoint as ckpt
from lib_sdtrain.models import ldm_text, ldm_unet, ldm_vae
from lib_sdtrain.models.schedule import alphas_cumprod, ldm_schedule_buffers
from lib_sdtrain.testing.tiny import make_tiny_checkpoint

FAMILIES = {"sd1": "sd15", "sd2": "sd2_768v", "sdxl": "sdxl_base"}




def _golden_meta_state_dict(golden):
    return {r["key"]: torch.empty(_shape(r["shape"]), device="meta") for r in _tsv(f"{golden}_ldm_state_dict.tsv")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def full_size(request):
    family, golden = request.param, FAMILIES[request.param]
    sd = _golden_meta_state_dict(golden)
    arch = ckpt.architecture_from_state_dict(sd, {})
    return family, golden, sd, arch


def test_family_detected_from_golden_keys(full_size):
    family, _, sd, arch = full_size
    assert arch.family == family


def test_full_size_model_on_meta_saves_exactly_the_golden_keys(full_size):
    family, golden, sd, arch = full_size
    unet, vae, encoders = ckpt.build_modules(arch)           # parameters on the meta device
    out = ckpt.ldm_state_dict(arch, unet, vae, encoders, {})
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_stock_architectures_match_published_configs(full_size):
    family, _, _, arch = full_size
    expect = {"sd1": ([320, 640, 1280, 1280], 768, [8, 8, 8, 8]),
              "sd2": ([320, 640, 1280, 1280], 1024, [5, 10, 20, 20]),
              "sdxl": ([320, 640, 1280], 2048, [5, 10, 20])}[family]
    assert (arch.unet["block_out_channels"], arch.unet["cross_attention_dim"], arch.unet["attention_head_dim"]) == expect
    assert [t["num_hidden_layers"] for t in arch.text] == {"sd1": [12], "sd2": [24], "sdxl": [12, 32]}[family]
    # stock layouts get no per-block or middle-block entries, so their configs (and our metadata) stay as they were
    assert "reverse_transformer_layers_per_block" not in arch.unet and "mid_block_type" not in arch.unet
    if family == "sdxl":
        assert arch.unet["transformer_layers_per_block"] == [1, 2, 10]
        assert arch.unet["projection_class_embeddings_input_dim"] == 2816


@pytest.mark.parametrize("component", ["unet", "vae"])
def test_name_maps_equal_diffusers_conversion_tables(component, full_size):
    family, golden, _, arch = full_size
    m, prefix = ((ldm_unet.unet_prefix_map(arch.unet), ldm_unet.PREFIX) if component == "unet"
                 else (ldm_vae.vae_prefix_map(arch.vae), ldm_vae.PREFIX))
    rows = _tsv(f"{golden}_diffusers_to_ldm_{component}.tsv")
    assert len(rows) in (248, 686, 1680)
    for r in rows:
        assert prefix + m.a_to_b(r["diffusers_key"]) == r["ldm_key"], r
        assert m.b_to_a(r["ldm_key"][len(prefix):]) == r["diffusers_key"], r


@pytest.mark.parametrize("table,prefix", [
    ("sd2_768v_diffusers_to_ldm_text_encoder.tsv", "cond_stage_model.model."),
    ("sdxl_base_diffusers_to_ldm_text_encoder_2.tsv", "conditioner.embedders.1.model."),
])
def test_openclip_text_conversion_equals_golden_table(table, prefix):
    rows = _tsv(table)
    # Values that encode (key number, row) so that slices and transposes are checked, not only names.
    ldm = {}
    for i, r in enumerate(rows):
        if r["ldm_key"] and r["ldm_key"] not in ldm:
            shape = _shape(r["ldm_shape"])
            t = torch.arange(shape[0] if shape else 1, dtype=torch.float32).reshape(-1, *[1] * (len(shape) - 1))
            ldm[r["ldm_key"]] = (t + 100000.0 * (i + 1)).expand(*shape) if shape else torch.tensor(float(i))
    hf, rest = ldm_text.openclip_to_hf({k[len(prefix):]: v for k, v in ldm.items()})
    for r in rows:
        if r["transform"] in ("not produced by conversion",):
            continue
        if r["transform"] == "dropped by conversion":
            assert r["ldm_key"][len(prefix):] in rest or "resblocks.23" in r["ldm_key"] or "text_projection" in r["ldm_key"]
            continue
        src = ldm[r["ldm_key"]]
        got = hf[r["diffusers_key"]]
        if r["transform"] == "identity":
            expect = src
        elif r["transform"] == "transpose":
            expect = src.t()
        else:  # "rows a:b of dim0"
            a, b = map(int, r["transform"].split()[1].split(":"))
            expect = src[a:b]
        assert torch.equal(got, expect), r["diffusers_key"]
    back = ldm_text.hf_to_openclip(hf)
    for k, v in back.items():
        assert torch.equal(v, ldm[prefix + k]), k


def test_schedule_equals_a1111():
    import json

    golden = json.loads((GOLDEN / "a1111_defaults.json").read_text())["alphas_cumprod_sd1"]
    values = next(v for k, v in golden.items() if isinstance(v, list) and len(v) == 1000)
    assert torch.allclose(alphas_cumprod().double(), torch.tensor(values, dtype=torch.float64), atol=1e-7)
    buffers = ldm_schedule_buffers()
    assert len(buffers) == 12 and torch.equal(buffers["alphas_cumprod"], alphas_cumprod())


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_checkpoint(d / f"tiny-{f}.safetensors", f) for f in FAMILIES}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loads_where_clip_position_ids_are_persistent(tiny_files, tmp_path, monkeypatch, family):
    """transformers < 4.31 (A1111 v1.10 pins 4.30.2) keeps `position_ids` in CLIP's state dict; the loader sets the
    file's copy aside, so the module's own 0..76 must fill it instead of failing the strict load. Emulated here
    on the installed transformers by making the buffer persistent again."""
    build = ckpt.build_modules

    def old_transformers(arch, **kw):
        unet, vae, encoders = build(arch, **kw)
        for enc in encoders:
            enc.text_model.embeddings._non_persistent_buffers_set.discard("position_ids")
        return unet, vae, encoders

    monkeypatch.setattr(ckpt, "build_modules", old_transformers)
    loaded = ckpt.load_checkpoint(tiny_files[family])
    for enc in loaded.text_encoders:
        assert "text_model.embeddings.position_ids" in enc.state_dict()
        assert torch.equal(enc.text_model.embeddings.position_ids.flatten(), torch.arange(77))
    out = ckpt.save_checkpoint(tmp_path / "again.safetensors", loaded)
    a, _ = ckpt.read_state_dict(tiny_files[family])
    b, _ = ckpt.read_state_dict(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_then_save_is_bit_exact(tiny_files, tmp_path, family):
    loaded = ckpt.load_checkpoint(tiny_files[family])
    assert loaded.arch.family == family
    assert loaded.arch.prediction == ("v" if family == "sd2" else "eps")
    out = ckpt.save_checkpoint(tmp_path / "again.safetensors", loaded)
    a, _ = ckpt.read_state_dict(tiny_files[family])
    b, meta = ckpt.read_state_dict(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert "lab.architecture" in meta


def test_fp16_file_keeps_fp16_and_roundtrips(tmp_path):
    p = make_tiny_checkpoint(tmp_path / "half.safetensors", "sd1", dtype=torch.float16)
    loaded = ckpt.load_checkpoint(p, dtype=torch.float32)        # trained in fp32 ...
    out = ckpt.save_checkpoint(tmp_path / "again.safetensors", loaded)  # ... saved back as the file was
    a, _ = ckpt.read_state_dict(p)
    b, _ = ckpt.read_state_dict(out)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert a["model.diffusion_model.out.2.weight"].dtype == torch.float16


def test_save_refuses_to_overwrite(tiny_files, tmp_path):
    loaded = ckpt.load_checkpoint(tiny_files["sd1"])
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"user data")
    with pytest.raises(UserError, match="already exists"):
        ckpt.save_checkpoint(target, loaded)
    assert target.read_bytes() == b"user data"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unet_forward_with_family_conditioning(tiny_files, family):
    loaded = ckpt.load_checkpoint(tiny_files[family])
    unet = loaded.unet
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    x = torch.randn(2, 4, 8, 8)
    kwargs = {}
    if family == "sdxl":  # pooled bigG vector + (original, crop, target) size embeddings
        pooled = torch.randn(2, loaded.text_encoders[1].config.projection_dim)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}
    out = unet(x, torch.tensor([10, 900]), encoder_hidden_states=ctx, **kwargs).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    if family == "sdxl":  # the size conditioning must reach the output
        kwargs["added_cond_kwargs"]["time_ids"] = torch.tensor([[128., 64, 8, 0, 64, 64]] * 2)
        out2 = unet(x, torch.tensor([10, 900]), encoder_hidden_states=ctx, **kwargs).sample
        assert not torch.allclose(out, out2)


@pytest.mark.parametrize("bad,match", [
    ({"lora_unet_x.lora_down.weight": torch.zeros(1)}, "LoRA"),
    ({"emb_params": torch.zeros(1, 4)}, "embedding"),
    ({"foo": torch.zeros(1)}, "not a Stable Diffusion checkpoint"),
])
def test_wrong_files_get_clear_errors(tmp_path, bad, match):
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file(bad, str(p))
    with pytest.raises(UserError, match=match):
        ckpt.load_checkpoint(p)


def test_garbage_and_pickles_are_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x00" * 5)
    with pytest.raises(UserError):
        ckpt.load_checkpoint(p)
    with pytest.raises(UserError, match="unsupported"):
        ckpt.load_checkpoint(tmp_path / "x.txt") if (tmp_path / "x.txt").write_text("x") else None


def _stock_file_state_dict(family, **unet):
    """A tiny model's tensors as a file without our `lab.architecture` metadata (another tool's file): the
    architecture must come from the shapes alone. `unet` overrides the tiny UNet config."""
    from lib_sdtrain.testing.tiny import tiny_architecture

    arch = tiny_architecture(family)
    arch.unet.update(unet)
    torch.manual_seed(0)
    u, v, encoders = ckpt.build_modules(arch, empty=False)
    return ckpt.ldm_state_dict(arch, u, v, encoders), arch


def test_sdxl_size_embedding_width_is_read_from_the_shapes():
    # tiny SDXL's size/crop embeddings are 8 wide, not the stock 256: assuming 256 built a UNet whose add_embedding
    # did not fit its inputs, and the first training step died with a matmul traceback
    sd, arch = _stock_file_state_dict("sdxl")
    got = ckpt.architecture_from_state_dict(sd, {})
    assert got.unet["addition_time_embed_dim"] == arch.unet["addition_time_embed_dim"] == 8
    sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(64, 35)      # 35 - 32 pooled: not six of anything
    with pytest.raises(UserError, match="size conditioning takes 35 inputs"):
        ckpt.architecture_from_state_dict(sd, {})


def _drop(sd, part):
    return {k: v for k, v in sd.items() if part not in k}


@pytest.mark.parametrize("mutate,match", [
    (lambda sd: _drop(sd, "first_stage_model."), "no VAE"),                        # was a KeyError traceback
    (lambda sd: _drop(sd, "encoder.down.0.block.0.conv2"), "VAE weights are incomplete"),
    (lambda sd: _drop(sd, "out.2.weight"), "UNet weights are incomplete"),
    # a damaged level: was read as a level without attention, its other attention weights kept as "extras", and
    # a model without them trained and saved
    (lambda sd: _drop(sd, "input_blocks.1.1.proj_in"), r"UNet weights do not fit.*proj_in"),
    (lambda sd: {**sd, "model.diffusion_model.extra.weight": torch.zeros(2)}, r"1 unexpected.*extra\.weight"),
])
def test_damaged_checkpoints_are_refused_by_name(mutate, match):
    sd = mutate(_stock_file_state_dict("sd1")[0])
    with pytest.raises(UserError, match=match):
        ckpt.load_from_state_dict(sd, ckpt.architecture_from_state_dict(sd, {}))


def test_unknown_keys_outside_the_unet_and_ema_copies_are_kept():
    sd, _ = _stock_file_state_dict("sd1")
    sd.update({"model_ema.decay": torch.tensor(0.999), "model_ema.input_blocks10weight": torch.zeros(2),
               "foo.bar": torch.zeros(3)})
    loaded = ckpt.load_from_state_dict(sd, ckpt.architecture_from_state_dict(sd, {}))
    assert {"model_ema.decay", "model_ema.input_blocks10weight", "foo.bar"} <= set(loaded.extras)


# ---- UNet layouts other than the stock one (distilled SDXL models) --------------------------------------------
_LAYOUTS = {
    # SSD-1B / Segmind Vega kind: uneven depths per block, up side unlike the down side, single-res middle block
    "distilled": {"transformer_layers_per_block": [1, [2, 1], 1],
                  "reverse_transformer_layers_per_block": [[2, 1, 3], [1, 1, 2], [1, 1, 1]],
                  "mid_block_type": "UNetMidBlock2D"},
    # KOALA-700M kind: no middle block at all
    "no middle block": {"transformer_layers_per_block": [1, 2, 3], "mid_block_type": None},
    # attention on the up side's middle level only
    "attention on one side": {"down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
                              "transformer_layers_per_block": [1, 1, 2],
                              "reverse_transformer_layers_per_block": [[2, 2, 2], [3, 3, 3], [1, 1, 1]]},
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_unet_layout_is_read_block_by_block(layout):
    # was: the stock depth per level assumed, and every such file refused with "UNet weights do not fit"
    sd, arch = _stock_file_state_dict("sdxl", **_LAYOUTS[layout])
    got = ckpt.architecture_from_state_dict(sd, {})
    for key in ("down_block_types", "up_block_types", "transformer_layers_per_block",
                "reverse_transformer_layers_per_block", "mid_block_type"):
        assert got.unet.get(key, "stock") == arch.unet.get(key, "stock"), key
    loaded = ckpt.load_from_state_dict(sd, got)
    out = ckpt.ldm_state_dict(got, loaded.unet, loaded.vae, loaded.text_encoders)
    assert all(torch.equal(out[k], v) for k, v in sd.items()) and set(out) == set(sd)


def _rename(sd, old, new):
    return {k.replace(old, new): v for k, v in sd.items()}


@pytest.mark.parametrize("mutate,match", [
    (lambda sd: _drop(sd, "input_blocks.5.1."),
     r"down side's level 1, input_blocks\.4 have attention but input_blocks\.5 have none"),
    (lambda sd: _drop(sd, "output_blocks.1.1."), r"up side's level 2, output_blocks\.0, output_blocks\.2 have attention"),
    (lambda sd: _drop(sd, "middle_block.1.transformer_blocks.1."),
     "middle block has 1 transformer block.s. and the last down level's first block 2"),
    (lambda sd: _drop(sd, "middle_block.1."), "middle block has two res blocks but no attention"),
    (lambda sd: _drop(sd, "input_blocks.4.1.transformer_blocks."), r"input_blocks\.4\.1 has attention weights but no"),
])
def test_unet_layouts_diffusers_cannot_build_are_refused_by_name(mutate, match):
    sd = mutate(_stock_file_state_dict("sdxl")[0])
    with pytest.raises(UserError, match=match):
        ckpt.architecture_from_state_dict(sd, {})


def test_uneven_res_blocks_per_level_are_refused_by_name():
    sd, _ = _stock_file_state_dict("sdxl")
    sd = _drop(sd, "model.diffusion_model.input_blocks.8.")           # level 2: one res block, not two
    with pytest.raises(UserError, match="level 2 has 1 res blocks, level 0 has 2"):
        ckpt.architecture_from_state_dict(sd, {})


# ---- attention heads: weight shapes cannot tell them ----------------------------------------------------------
def _unet_yaml(path, **unet_params):
    lines = ["model:", "  params:", "    unet_config:", "      params:"]
    path.with_suffix(".yaml").write_text("\n".join(lines + [f"        {k}: {v}" for k, v in unet_params.items()]) + "\n")


@pytest.mark.parametrize("params,heads", [
    ({}, [8, 8, 8, 8]),                                          # nothing given: SD1's stock rule
    ({"num_heads": 4}, [4, 4, 4, 4]),
    ({"num_head_channels": 16}, [2, 2, 4, 4]),                   # widths 32, 32, 64, 64
    ({"num_heads": 4, "num_head_channels": 16}, [2, 2, 4, 4]),   # as LDM reads its yaml: channels win (was: heads)
    ({"num_heads": -1, "num_head_channels": 32}, [1, 1, 2, 2]),
])
def test_attention_heads_come_from_the_yaml_beside_the_checkpoint(tmp_path, params, heads):
    from safetensors.torch import save_file

    from lib_sdtrain.models import detect

    sd, _ = _stock_file_state_dict("sd1")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))       # no lab.architecture metadata
    if params:
        _unet_yaml(path, **params)
    loaded = ckpt.load_checkpoint(path)
    assert loaded.arch.unet["attention_head_dim"] == heads
    assert loaded.unet.down_blocks[2].attentions[0].transformer_blocks[0].attn1.heads == heads[2]
    hints = detect.unet_hints(detect.read_yaml_hints(path))
    assert (ldm_unet.assumed_heads("sd1", hints) is None) == bool(params)


@pytest.mark.parametrize("params,match", [
    ({"num_head_channels": 0}, "model.yaml: num_head_channels is 0, not a positive whole number"),   # was: ZeroDivision
    ({"num_heads": "abc"}, "model.yaml: num_heads is 'abc', not a positive whole number"),          # was: ValueError
    ({"num_heads": 2.5}, "model.yaml: num_heads is 2.5, not a positive whole number"),
    ({"num_heads": 3}, "attention heads from model.yaml: 3 heads do not divide level 0's width 32"),  # was: "Error(s)
])                                                                                                 # in loading"
def test_heads_a_yaml_gets_wrong_are_refused_by_name(tmp_path, params, match):
    from safetensors.torch import save_file

    sd, _ = _stock_file_state_dict("sd1")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    _unet_yaml(path, **params)
    with pytest.raises(UserError, match=re.escape(match)):
        ckpt.load_checkpoint(path)
    # our metadata's heads are the user's input too
    shapes = {k[len(ldm_unet.PREFIX):]: tuple(v.shape) for k, v in sd.items() if k.startswith(ldm_unet.PREFIX)}
    with pytest.raises(UserError, match="the model's metadata: attention_head_dim has 3 entries for 4 levels"):
        ldm_unet.unet_config_from_ldm(shapes, "sd1", {"attention_head_dim": [2, 2, 2]})
    with pytest.raises(UserError, match="the model's metadata: attention_head_dim is 'x'"):
        ldm_unet.unet_config_from_ldm(shapes, "sd1", {"attention_head_dim": "x"})


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_stock_layout_table_is_the_released_models(family):
    # `STOCK_LAYOUTS` is what `info` and the memory estimate compare a file's UNet with: the stock configs (the
    # LoRA converter's, and the GPU benchmark's full-size ones) must give exactly it
    from lib_sdtrain.convert.lora import stock_architecture
    from lib_sdtrain.models.ldm_unet import STOCK_CONTEXT, STOCK_LAYOUTS, unet_layout
    from lib_sdtrain.testing import fullsize

    arch = stock_architecture(family)
    assert unet_layout(arch.unet) == STOCK_LAYOUTS[family]
    assert arch.unet["cross_attention_dim"] == STOCK_CONTEXT[family]
    full = {"sd1": fullsize.sd15_architecture, "sdxl": fullsize.sdxl_architecture}.get(family)
    if full:
        assert unet_layout(full().unet) == STOCK_LAYOUTS[family]


def test_layout_of_the_tiny_distilled_sdxl_is_its_own():
    from lib_sdtrain.models.ldm_unet import unet_layout
    from lib_sdtrain.testing.tiny import tiny_architecture

    distilled = unet_layout(tiny_architecture("sdxl", layout="distilled").unet)
    assert distilled["down"] == [[0, 0], [2, 1], [1, 1]] and distilled["up"] == [[2, 1, 3], [1, 1, 2], [0, 0, 0]]
    assert distilled["middle"] == {"res_blocks": 1, "depth": 0}
