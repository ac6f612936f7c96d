"""Which modules the LoRA trainer adapts and what it calls them, against A1111 v1.10.1's golden target lists.

Full-size SD1.5 / SD2-768-v / SDXL networks are built on the meta device (no weights allocated) and the
real selection code (`methods.lora.select_targets` → `models.targets.find_targets`) must produce exactly the
golden `kohya_key_prefix` sets per preset. A1111's own LDM/SGM module tree ("ldm" naming) is reproduced on
the meta device from the golden module list, and every golden row's LDM module must get the golden name.
"""

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import golden_rows as _tsv, golden_shape as _shape
from lib_sdtrain.errors import UserError
from lib_sdtrain.formats import kohya
from lib_sdtrain.methods.lora import LoraMethod, LoraSettings, select_targets
from lib_sdtrain.models import checkpoint as ckpt

FAMILIES = {"sd1": "sd15", "sd2": "sd2_768v", "sdxl": "sdxl_base"}
ATTN_PROJ = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q|k|v|out)_proj)$")
TEXT_PREFIX = {"sd15": ["cond_stage_model."], "sd2_768v": ["cond_stage_model."],
               "sdxl_base": ["conditioner.embedders.0.", "conditioner.embedders.1."]}




def _expected(rows, preset):
    if preset == "full":
        return {r["kohya_key_prefix"] for r in rows}
    keep = [r for r in rows if r["group"] != "unet_conv"]
    if preset == "attn":
        keep = [r for r in keep if ATTN_PROJ.search(r["kohya_source_module"])]
    return {r["kohya_key_prefix"] for r in keep}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def full_size(request):
    family, golden = request.param, FAMILIES[request.param]
    sd = {r["key"]: torch.empty(_shape(r["shape"]), device="meta") for r in _tsv(f"{golden}_ldm_state_dict.tsv")}
    arch = ckpt.architecture_from_state_dict(sd, {})
    unet, _, encoders = ckpt.build_modules(arch)          # meta device: shapes only
    parts = SimpleNamespace(family=family, module_naming="diffusers", unet=unet, text_encoders=encoders)
    return family, golden, parts, _tsv(f"{golden}_lora_targets.tsv")


@pytest.mark.parametrize("preset", ["attn", "attn_mlp", "full"])
def test_key_set_equals_golden_per_preset(full_size, preset):
    family, golden, parts, rows = full_size
    targets = select_targets(parts, LoraSettings(targets=preset))
    names = [t.name for t in targets]
    assert len(names) == len(set(names))
    assert set(names) == _expected(rows, preset)
    counts = {"sd1": {"attn": 176, "attn_mlp": 264, "full": 350}, "sd2": {"attn": 220, "attn_mlp": 330, "full": 416},
              "sdxl": {"attn": 736, "attn_mlp": 986, "full": 1052}}[family]
    assert len(names) == counts[preset]


def test_targets_agree_with_golden_rows(full_size):
    """Group, module path and weight shape of each target are the golden kohya source's."""
    family, _, parts, rows = full_size
    by_name = {r["kohya_key_prefix"]: r for r in rows}
    for t in select_targets(parts, LoraSettings(targets="full")):
        r = by_name[t.name]
        assert t.group == r["group"]
        assert t.weight_shape == _shape(r["kohya_source_weight_shape"])
        if t.component == "text_encoder" or family != "sdxl":      # SDXL's golden source is the SGM UNet
            assert t.path == r["kohya_source_module"]


def test_locon_adds_conv_blocks_and_switches(full_size):
    family, _, parts, rows = full_size
    locon = {t.name for t in select_targets(parts, LoraSettings(network_type="locon"))}
    assert locon == _expected(rows, "full")
    unet_only = select_targets(parts, LoraSettings(train_text_encoder=False))
    assert {t.component for t in unet_only} == {"unet"}
    te_only = select_targets(parts, LoraSettings(train_unet=False))
    assert {t.component for t in te_only} == {"text_encoder"}
    assert LoraMethod(LoraSettings(targets="full")).plan(parts) == select_targets(parts, LoraSettings(targets="full"))


def test_a_rank_no_layer_can_use_is_refused_before_any_adapter_is_built(full_size):
    """Every family's widest trained layer takes a rank of at most 1280 (min of outputs and inputs × kernel)."""
    _, _, parts, _ = full_size
    for settings in (LoraSettings(network_dim=1281), LoraSettings(network_type="loha", network_dim=100_000),
                     LoraSettings(network_type="locon", network_dim=16, conv_dim=1281)):
        with pytest.raises(UserError, match="at most 1280 on this model"):
            LoraMethod(settings).attach(parts)         # meta-device modules: refused before peft touches them
    for settings in (LoraSettings(network_dim=1280), LoraSettings(network_type="lokr", network_dim=100_000)):
        LoraMethod(settings)._check_ranks(select_targets(parts, settings))   # LoKr's dim is a factor size


def test_text_layers_targeted_sd2_never_its_last(full_size):
    """SD2's standalone text model keeps all 24 OpenCLIP layers; A1111 uses the penultimate, kohya has 23."""
    family, _, parts, _ = full_size
    layers: dict[int, set[int]] = {}
    for t in select_targets(parts, LoraSettings()):
        if t.component == "text_encoder":
            layers.setdefault(t.index, set()).add(int(re.search(r"layers_(\d+)_", t.name).group(1)))
    built = [enc.config.num_hidden_layers for enc in parts.text_encoders]
    expect = {"sd1": [12], "sd2": [23], "sdxl": [12, 32]}[family]
    assert built == {"sd1": [12], "sd2": [24], "sdxl": [12, 32]}[family]
    assert [layers[i] for i in range(len(built))] == [set(range(n)) for n in expect]


def test_conv_ranks_follow_kohya():
    s = LoraSettings(network_dim=16, network_alpha=8, conv_dim=4, conv_alpha=2)
    conv3 = kohya.Target("n", "unet", 0, "a.conv1", "unet_conv", "conv", (8, 8, 3, 3), (3, 3))
    conv1 = kohya.Target("n", "unet", 0, "a.conv_shortcut", "unet_conv", "conv", (8, 4, 1, 1), (1, 1))
    lin = kohya.Target("n", "unet", 0, "a.time_emb_proj", "unet_conv", "linear", (8, 32))
    assert s.rank_alpha(conv3) == (4, 2.0)
    assert s.rank_alpha(conv1) == (16, 8.0) and s.rank_alpha(lin) == (16, 8.0)
    assert LoraSettings(network_dim=16, network_alpha=0).rank_alpha(lin) == (16, 16.0)  # kohya: alpha 0 = dim
    assert LoraSettings(network_dim=8).rank_alpha(conv3) == (8, 8.0)                    # conv defaults


# ---- A1111's own modules ("ldm" naming) --------------------------------------------------------------------
def _fake_tree(rows, prefix):
    """Meta-device nn.Module tree with the golden LDM/SGM paths; container classes named like LDM/SGM/HF ones."""
    leaves = {r["module"][len(prefix):]: r for r in rows
              if r["module"].startswith(prefix) and r["type"] in ("Linear", "Conv2d", "MultiheadAttention")}
    children: dict[str, set[str]] = {}
    for path in leaves:
        segs = path.split(".")
        for i in range(len(segs)):
            children.setdefault(".".join(segs[:i]), set()).add(segs[i])
        children.setdefault(path, set())

    def cls_name(path):
        kids = children.get(path, set())
        last = path.rsplit(".", 1)[-1]
        if "proj_in" in kids:
            return "SpatialTransformer"
        if "in_layers" in kids:
            return "ResBlock"
        if kids == {"op"}:
            return "Downsample"
        if kids == {"conv"} and path.startswith("output_blocks"):
            return "Upsample"
        if last == "self_attn":
            return "CLIPAttention"
        if last == "mlp" and "fc1" in kids:
            return "CLIPMLP"
        return "Container"

    classes: dict[str, type] = {}
    nodes = {"": nn.Module()}
    for path in sorted(children, key=lambda p: (p.count("."), p)):
        if path == "":
            continue
        parent, _, name = path.rpartition(".")
        if path in leaves:
            shape = _shape(leaves[path]["weight_shape"])
            with torch.device("meta"):
                if leaves[path]["type"] == "MultiheadAttention":   # OpenCLIP: q/k/v stacked in in_proj_weight
                    heads = int(re.search(r"num_heads=(\d+)", leaves[path]["attributes"]).group(1))
                    mod = nn.MultiheadAttention(shape[1], heads)
                else:
                    mod = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2:])
        else:
            name_ = cls_name(path)
            mod = classes.setdefault(name_, type(name_, (nn.Module,), {}))()
        nodes[path] = mod
        nodes[parent].add_module(name, mod)
    return nodes[""]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def ldm_parts(request):
    family, golden = request.param, FAMILIES[request.param]
    rows = _tsv(f"{golden}_ldm_modules.tsv")
    unet = _fake_tree(rows, "model.diffusion_model.")
    encoders = [_fake_tree(rows, p) for p in TEXT_PREFIX[golden]]
    parts = SimpleNamespace(family=family, module_naming="ldm", unet=unet, text_encoders=encoders)
    return family, golden, parts, _tsv(f"{golden}_lora_targets.tsv")


@pytest.mark.parametrize("preset", ["attn", "attn_mlp", "full"])
def test_ldm_modules_give_the_golden_unet_names(ldm_parts, preset):
    family, golden, parts, rows = ldm_parts
    unet_rows = [r for r in rows if r["group"] != "te_attn_mlp"]
    targets = select_targets(parts, LoraSettings(targets=preset, train_text_encoder=False))
    assert {t.name for t in targets} == _expected(unet_rows, preset)
    by_name = {r["kohya_key_prefix"]: r for r in rows}
    for t in targets:   # and each lands on the LDM weight A1111 changes
        assert "model.diffusion_model." + t.path + ".weight" == by_name[t.name]["ldm_weight_key"]


def test_ldm_text_encoders(ldm_parts):
    family, golden, parts, rows = ldm_parts
    targets = select_targets(parts, LoraSettings(train_unet=False))
    assert {t.name for t in targets} == {r["kohya_key_prefix"] for r in rows if r["group"] == "te_attn_mlp"}
    by_name = {r["kohya_key_prefix"]: r for r in rows}
    for t in targets:   # OpenCLIP q/k/v (`mha_slot`) are row blocks of the MultiheadAttention's in_proj_weight
        n = t.weight_shape[0]
        leaf = f"in_proj_weight[{'qkv'.index(t.mha_slot) * n}:{('qkv'.index(t.mha_slot) + 1) * n}]" \
            if t.mha_slot in ("q", "k", "v") else "weight"
        assert TEXT_PREFIX[golden][t.index] + t.path + "." + leaf == by_name[t.name]["ldm_weight_key"]


def test_name_functions_on_every_golden_text_row():
    """HF paths (any wrapper prefix) and OpenCLIP paths (issue 6) name exactly like the golden list."""
    for golden in FAMILIES.values():
        rows = [r for r in _tsv(f"{golden}_lora_targets.tsv") if r["group"] == "te_attn_mlp"]
        count = len(TEXT_PREFIX[golden])
        for r in rows:
            key = r["ldm_weight_key"]
            index = next(i for i, p in enumerate(TEXT_PREFIX[golden]) if key.startswith(p))
            path = re.sub(r"\.(weight|in_proj_weight)(\[\d+:\d+\])?$", "", key[len(TEXT_PREFIX[golden][index]):])
            if r["module_class"] == "MultiheadAttention":
                names = kohya.openclip_kohya_names(path, index, count)
                block = int(re.search(r"\[(\d+):", key).group(1)) // _shape(r["weight_shape"])[1]
                assert names[block] == r["kohya_key_prefix"]
            elif ".resblocks." in path:
                assert kohya.openclip_kohya_names(path, index, count) == [r["kohya_key_prefix"]]
            else:
                assert kohya.text_name(path, index, count) == r["kohya_key_prefix"]
            assert kohya.text_name(r["kohya_source_module"], index, count) == r["kohya_key_prefix"]


@pytest.mark.parametrize("layers", [1, 3])
def test_sd1_unet_with_other_res_block_counts_is_refused_not_misnamed(layers):
    # A1111 turns SD1/SD2 kohya names (diffusers paths) into LDM paths by the stock arithmetic (3 blocks a level):
    # with 1 or 3 res blocks per level the file was written and A1111 would have put its layers on wrong modules
    # (shape errors) or none (silently dropped attention layers of deeper levels)
    from lib_sdtrain.testing.tiny import tiny_architecture

    arch = tiny_architecture("sd1")
    stock_unet, _, encoders = ckpt.build_modules(arch)
    stock = SimpleNamespace(family="sd1", module_naming="diffusers", unet=stock_unet, text_encoders=encoders)
    assert select_targets(stock, LoraSettings(targets="full"))
    arch.unet["layers_per_block"] = layers
    parts = SimpleNamespace(family="sd1", module_naming="diffusers", unet=ckpt.build_modules(arch)[0],
                            text_encoders=encoders)
    with pytest.raises(UserError, match="A1111 places LoRA layers by the stock layout"):
        select_targets(parts, LoraSettings(targets="attn"))
    # the preflight's check from the config alone (no modules) agrees
    from lib_sdtrain.models.targets import a1111_misplaced_module

    assert a1111_misplaced_module(stock_unet.config) is None
    assert a1111_misplaced_module(dict(arch.unet), conv=False)[1:] == (
        "input_blocks_4_1_proj_in", f"input_blocks_{1 + layers + 1}_1_proj_in")
