"""LoRA/LoHa/LoKr on A1111's OpenCLIP text encoders (SD2; SDXL's second) under "ldm" module naming.

OpenCLIP keeps q/k/v stacked in an `nn.MultiheadAttention`; the trainer stands in an
`AdaptedMultiheadAttention` while adapters are attached. Checked here on the fake A1111 (tests/fake_webui, real
`nn.MultiheadAttention`s loaded from tiny checkpoints):
  - the stand-in computes exactly what `nn.MultiheadAttention` computes (every flag open_clip and torch use);
  - the file written through the A1111 host has the standalone host's kohya names and tensor shapes, and the same
    adapter weights give the same text conditioning on both hosts;
  - after training through `WebUIHost`, A1111's merge of the saved file (q/k/v deltas stacked into
    `in_proj_weight`, out into `out_proj.weight`; `a1111_lora_math`) reproduces the trained text conditioning;
  - detach gives back the MultiheadAttention objects, flags and weights bit-exactly;
  - full-size SD2 / SDXL OpenCLIP towers (the fake's classes on the meta device) give the golden kohya names,
    each landing on the golden A1111 weight (row slice of `in_proj_weight`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import a1111_lora_math as a1111  # noqa: E402
import fake_webui  # noqa: E402
from conftest import golden_rows, golden_shape, make_dataset  # noqa: E402

from lib_sdtrain.errors import UserError  # noqa: E402
from lib_sdtrain.formats.safetensors_io import read_safetensors  # noqa: E402
from lib_sdtrain.methods import lora as lora_mod  # noqa: E402
from lib_sdtrain.methods.lora import LoraMethod, LoraSettings, select_targets  # noqa: E402
from lib_sdtrain.methods.openclip_attention import AdaptedMultiheadAttention  # noqa: E402
from lib_sdtrain.testing.tiny import make_tiny_checkpoint  # noqa: E402
from lib_sdtrain.train.settings import TrainSettings  # noqa: E402

sys.path.remove(str(Path(__file__).resolve().parent))

PROMPTS = ["zwx toy, red square", "a blue circle on grass, zwx"]
TE_NAME = re.compile(r"lora_te(\d?)_text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc1|mlp_fc2)")


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    with fake_webui.installed(root) as dirs:
        for fam in ("sd2", "sdxl"):
            make_tiny_checkpoint(dirs["checkpoint"] / f"tiny-{fam}.safetensors", fam)
        from modules import sd_models, shared

        sd_models.list_models()
        fake_webui.load_lora_extension()
        shared.opts.data["training_xattention_optimizations"] = False
        import lib_sdtrain.hosts.webui as webui_mod

        yield SimpleNamespace(dirs=dirs, host=webui_mod.WebUIHost, mod=webui_mod)


def load_family(fam):
    from modules import sd_models, shared

    current = sd_models.model_data.sd_model
    if current is None or not current.sd_model_checkpoint.endswith(f"tiny-{fam}.safetensors"):
        sd_models.load_model(sd_models.checkpoint_aliases[f"tiny-{fam}"])
    return shared.sd_model


def openclip_towers(parts):
    return [enc for enc in parts.text_encoders if hasattr(enc, "transformer") and hasattr(enc.transformer, "resblocks")]


def snapshot(model):
    """Everything detach must give back: weights, flags, and the very module objects (MultiheadAttention's own)."""
    mha_flags = {n: {k: v for k, v in vars(m).items() if not k.startswith("_") or k == "_qkv_same_embed_dim"}
                 for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "objects": {n: m for n, m in model.named_modules()},
        "mha": mha_flags,
    }


def assert_same(before, model):
    after = snapshot(model)
    assert set(after["tensors"]) == set(before["tensors"])
    changed = [k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])]
    assert not changed, changed[:5]
    assert after["grads"] == before["grads"] and after["modes"] == before["modes"]
    assert after["objects"].keys() == before["objects"].keys()
    assert all(after["objects"][n] is m for n, m in before["objects"].items())      # same objects, not copies
    assert after["mha"] == before["mha"] and len(before["mha"]) > 0


def settings(tmp_path, name, **lora):
    return TrainSettings.from_dict({
        "data": str(make_dataset(tmp_path / f"data-{name}", n=2, repeats=2)), "name": name, "resolution": 64,
        "min_bucket": 64, "max_bucket": 64, "batch_size": 1, "epochs": 1, "max_steps": 3, "learning_rate": 1e-2,
        "save_every_n_epochs": 0, "save_state": False, "tensorboard": False, "sample_every_n_epochs": 0,
        "lora": {"network_dim": 2, "network_alpha": 2, "train_text_encoder": True, "save_dtype": "fp32", **lora}})


def encode(parts):
    with torch.no_grad():
        cond = parts.encode_text(PROMPTS)
    return cond.context.clone(), None if cond.pooled is None else cond.pooled.clone()


# ---- the stand-in itself ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_stand_in_computes_what_multihead_attention_computes(batch_first, training):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).train(training)
    mha.in_proj_bias.data.normal_()   # torch initialises it to zero; make the rows count
    mha.out_proj.bias.data.normal_()
    wrapper = AdaptedMultiheadAttention(mha)
    x, y = torch.randn(3, 5, 16), torch.randn(3, 7, 16)      # batch 3, 5 queries, 7 keys
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    causal = torch.full((5, 5), float("-inf")).triu(1)      # what open_clip passes
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 4:] = True
    calls = [((x, x, x), dict(need_weights=False, attn_mask=causal)),
             ((x, x, x), dict(need_weights=False, attn_mask=causal, is_causal=True)),
             ((x, x, x), dict(attn_mask=torch.isinf(causal), average_attn_weights=False)),
             ((x, x, x), dict(attn_mask=torch.randn(12, 5, 5))),
             ((x, y, y), dict(key_padding_mask=padding)),
             ((x, y, y), dict(need_weights=False, key_padding_mask=padding)),
             ((x[0] if batch_first else x[:, 0],) * 3, {})]          # unbatched
    for args, kwargs in calls:
        want, want_w = mha(*args, **kwargs)
        got, got_w = wrapper(*args, **kwargs)
        assert torch.equal(got, want), (kwargs, (got - want).abs().max())
        assert (got_w is None) == (want_w is None) and (got_w is None or torch.equal(got_w, want_w))
    assert wrapper.batch_first is batch_first and wrapper.embed_dim == 16     # reads through to the module
    # the q/k/v slots are views of in_proj rows, not copies
    assert wrapper.k.weight.data_ptr() == mha.in_proj_weight[16:32].data_ptr()
    assert torch.equal(wrapper.v.bias, mha.in_proj_bias[32:])


def test_stand_in_with_adapters_equals_the_merged_projection():
    """A LoRA on slot k acts like the same delta added to rows 16..32 of in_proj_weight, with gradients."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 2).requires_grad_(False)
    wrapper = AdaptedMultiheadAttention(mha)
    from peft.tuners.lora.layer import Linear as LoraLinear

    for slot in ("k", "out"):
        layer = LoraLinear(getattr(wrapper, slot), "default", r=2, lora_alpha=4)
        layer.lora_B["default"].weight.data.normal_()
        setattr(wrapper, slot, layer)
    x = torch.randn(6, 2, 16)
    mask = torch.full((6, 6), float("-inf")).triu(1)
    out = wrapper(x, x, x, need_weights=False, attn_mask=mask)[0]
    out.square().sum().backward()
    assert wrapper.k.lora_A["default"].weight.grad.abs().sum() > 0
    merged = nn.MultiheadAttention(16, 2)
    merged.load_state_dict(mha.state_dict())
    with torch.no_grad():
        merged.in_proj_weight[16:32] += wrapper.k.get_delta_weight("default")
        merged.out_proj.weight += wrapper.out.get_delta_weight("default")
        want = merged(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert torch.allclose(out, want, atol=1e-6) and not torch.allclose(out, mha(x, x, x, attn_mask=mask)[0])


def test_layouts_open_clip_never_builds_are_refused():
    for mha in (nn.MultiheadAttention(8, 2, kdim=4, vdim=4), nn.MultiheadAttention(8, 2, add_bias_kv=True),
                nn.MultiheadAttention(8, 2, add_zero_attn=True)):
        with pytest.raises(UserError, match="MultiheadAttention"):
            AdaptedMultiheadAttention(mha)


# ---- the A1111 host versus the standalone host ---------------------------------------------------------------
@pytest.mark.parametrize("fam", ["sd2", "sdxl"])
@pytest.mark.parametrize("network_type", ["lora", "loha", "lokr", "dora"])
def test_same_file_layout_and_outputs_as_the_standalone_host(webui, fam, network_type, tmp_path):
    from lib_sdtrain.hosts.standalone import StandaloneHost

    model = load_family(fam)
    before = snapshot(model)
    host = webui.host()
    parts = host.load()
    ref = StandaloneHost(device="cpu", dtype="fp32").load(model.sd_model_checkpoint)
    s = LoraSettings(network_type=network_type, network_dim=2, network_alpha=1, save_dtype="fp32")
    ours, theirs = LoraMethod(s), LoraMethod(s)
    try:
        ours.attach(parts)
        theirs.attach(ref)
        assert any(isinstance(m, AdaptedMultiheadAttention) for enc in openclip_towers(parts) for m in enc.modules())
        a = read_safetensors(ours.save(tmp_path / "ldm.safetensors", {}))[0]
        b = read_safetensors(theirs.save(tmp_path / "diffusers.safetensors", {}))[0]
        assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)
        te = {k.split(".")[0] for k in a if k.startswith("lora_te")}
        prefix = "lora_te" if fam == "sd2" else "lora_te2"
        assert {f"{prefix}_text_model_encoder_layers_0_self_attn_{p}_proj" for p in "qkv"} <= te
        # the same (non-zero) adapter weights on both hosts → the same text conditioning
        torch.manual_seed(3)
        with torch.no_grad():
            for a_ in theirs._layers.values():
                for _, p in lora_mod._adapter_params(a_.layer):
                    p.copy_(torch.randn_like(p) * 0.2)
        ours.load_training_state(theirs.training_state())
        got = encode(parts)
        with torch.no_grad():
            c = ref.encode_text(PROMPTS)
        want = (c.context, c.pooled)
        assert torch.allclose(got[0], want[0], atol=1e-4), (got[0] - want[0]).abs().max()
        if fam == "sdxl":
            assert torch.allclose(got[1], want[1], atol=1e-4)
        ours.detach()
        plain = encode(parts)
        assert (got[0] - plain[0]).abs().max() > 1e-2          # the adapters did change the conditioning
    finally:
        ours.detach()
        theirs.detach()
        host.release(parts)
    assert_same(before, model)


# ---- training through the A1111 host, then A1111's own merge of the file -----------------------------------------
def _a1111_merge(parts, tensors, fam):
    """A1111 v1.10's `network_apply_weights` for the text modules of a file (multiplier 1), in place.

    Names resolve like A1111's `convert_diffusers_name_to_compvis` (`self_attn→attn`, `mlp_fc1→mlp_c_fc`,
    `mlp_fc2→mlp_c_proj`); on OpenCLIP `_q/_k/_v/_out_proj` belong to the MultiheadAttention, which is changed
    only when all four are in the file: q/k/v deltas (each against its row block) stacked into `in_proj_weight`.
    Returns {parameter: original value} to put back.
    """
    backups: dict[torch.Tensor, torch.Tensor] = {}
    attention: dict[tuple[int, int], dict[str, dict]] = {}

    def add(param, delta):
        backups.setdefault(param, param.detach().clone())
        with torch.no_grad():
            param += delta.to(param.dtype)

    for name, w in a1111.split_modules(tensors).items():
        m = TE_NAME.fullmatch(name)
        if not m:
            assert name.startswith("lora_unet_"), name
            continue
        index = int(m.group(1)) - 1 if m.group(1) else 0
        layer, what, slot = int(m.group(2)), m.group(3), m.group(4)
        enc = parts.text_encoders[index]
        if hasattr(enc, "text_model"):    # HF CLIP (SDXL's first encoder)
            leaf = what.replace("attn_", "attn.").replace("mlp_", "mlp.")
            lin = enc.get_submodule(f"text_model.encoder.layers.{layer}.{leaf}")
            add(lin.weight, a1111.updown(w, lin.weight))
        elif slot:
            attention.setdefault((index, layer), {})[slot] = w
        else:
            lin = enc.get_submodule(f"transformer.resblocks.{layer}.mlp.{'c_fc' if what == 'mlp_fc1' else 'c_proj'}")
            add(lin.weight, a1111.updown(w, lin.weight))
    assert attention, "no OpenCLIP attention in the file"
    for (index, layer), slots in attention.items():
        assert set(slots) == {"q", "k", "v", "out"}, f"A1111 would ignore layer {layer}: only {sorted(slots)}"
        mha = parts.text_encoders[index].get_submodule(f"transformer.resblocks.{layer}.attn")
        assert isinstance(mha, nn.MultiheadAttention)
        rows = mha.in_proj_weight.chunk(3, 0)
        add(mha.in_proj_weight, torch.vstack([a1111.updown(slots[s], r) for s, r in zip("qkv", rows)]))
        add(mha.out_proj.weight, a1111.updown(slots["out"], mha.out_proj.weight))
    return backups


@pytest.mark.parametrize("fam,network_type", [("sd2", "lora"), ("sd2", "loha"), ("sd2", "lokr"), ("sd2", "dora"),
                                              ("sdxl", "lora"), ("sdxl", "lokr"), ("sdxl", "dora")])
def test_a1111_merge_of_the_trained_file_reproduces_the_trained_text_encoder(webui, fam, network_type, tmp_path,
                                                                              monkeypatch):
    from lib_sdtrain.train.loop import train

    model = load_family(fam)
    before = snapshot(model)
    host = webui.host()
    parts = host.load()
    try:
        plain = encode(parts)
    finally:                    # a failure here must not leave the queue lock held for the tests after it
        host.release(parts)

    trained = {}
    real_detach = LoraMethod.detach

    def detach_spy(self):            # the loop's final detach: read the trained encoder first
        if self._layers and "cond" not in trained:
            trained["cond"] = encode(self._parts)
            trained["mha_kinds"] = {type(m).__name__ for enc in openclip_towers(self._parts) for m in enc.modules()}
        real_detach(self)

    monkeypatch.setattr(LoraMethod, "detach", detach_spy)
    result = train(settings(tmp_path, f"oc-{fam}-{network_type}", network_type=network_type), host)
    monkeypatch.undo()
    assert result.stopped == "" and result.steps == 3 and result.final.is_file()
    assert "AdaptedMultiheadAttention" in trained["mha_kinds"]
    assert_same(before, model)                     # given back bit-exactly after training

    tensors, meta = read_safetensors(result.final)
    assert meta["ss_network_module"] == ("networks.lora" if network_type == "lora" else "lycoris.kohya")
    if network_type == "dora":   # each q/k/v/out slot has its own magnitude, per input column of its weight
        scales = {k: v for k, v in tensors.items() if k.endswith("_proj.dora_scale") and k.startswith("lora_te")}
        assert len(scales) >= 4 and all(
            tuple(v.shape) == (1, tensors[k.replace("dora_scale", "lora_down.weight")].shape[1])
            for k, v in scales.items())
    cond, pooled = trained["cond"]
    assert (cond - plain[0]).abs().max() > 1e-3, "training did not move the text conditioning"

    parts = host.load()
    try:
        backups = _a1111_merge(parts, tensors, fam)
        merged = encode(parts)
        assert torch.allclose(merged[0], cond, atol=2e-5, rtol=1e-4), (merged[0] - cond).abs().max()
        if fam == "sdxl":
            assert torch.allclose(merged[1], pooled, atol=2e-5, rtol=1e-4)
            assert (pooled - plain[1]).abs().max() > 1e-3       # SDXL's pooled output uses the last block too
        with torch.no_grad():
            for param, value in backups.items():
                param.copy_(value)
        if network_type in ("lora", "dora"):    # the file loads back into adapters that give the same conditioning
            method = LoraMethod(LoraSettings(network_type=network_type, network_dim=2, network_alpha=2))
            method.attach(parts)
            try:
                assert method.load_weights(result.final) == []
                again = encode(parts)
            finally:
                method.detach()
            assert torch.allclose(again[0], cond, atol=1e-6)
    finally:
        host.release(parts)
    assert_same(before, model)


def test_attach_failure_puts_everything_back(webui, monkeypatch):
    model = load_family("sd2")
    before = snapshot(model)
    host = webui.host()
    parts = host.load()
    real = LoraMethod._wrap
    seen = []

    def fail_late(self, root, target, classes):
        seen.append(target)
        if target.mha_slot == "out":       # after q/k/v of the first attention were wrapped
            raise RuntimeError("simulated failure while attaching")
        return real(self, root, target, classes)

    monkeypatch.setattr(LoraMethod, "_wrap", fail_late)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            LoraMethod(LoraSettings(train_unet=False)).attach(parts)
    finally:
        host.release(parts)
    assert [t.mha_slot for t in seen] == ["q", "k", "v", "out"]
    assert_same(before, model)


def test_attn_preset_takes_the_four_projections_of_every_block(webui):
    load_family("sdxl")
    host = webui.host()
    parts = host.load()
    try:
        targets = [t for t in select_targets(parts, LoraSettings(targets="attn", train_unet=False)) if t.index == 1]
        blocks = len(parts.text_encoders[1].transformer.resblocks)
    finally:
        host.release(parts)
    # SDXL's pooled output reads the last block, so every block is trained (SD2 skips its last one)
    assert [t.mha_slot for t in targets] == ["q", "k", "v", "out"] * blocks
    assert [t.name.rsplit("_", 2)[-2] for t in targets] == ["q", "k", "v", "out"] * blocks


# ---- full size on the meta device: the golden names and weights ------------------------------------------------
FULL = {"sd2": ("sd2_768v", ["cond_stage_model.model."]),
        "sdxl": ("sdxl_base", ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."])}


@pytest.mark.parametrize("fam", ["sd2", "sdxl"])
def test_full_size_ldm_text_encoders_give_the_golden_names(webui, fam):
    from accelerate import init_empty_weights
    from modules import sd_models

    from lib_sdtrain.models import checkpoint as ckpt

    golden, prefixes = FULL[fam]
    sd = {r["key"]: torch.empty(golden_shape(r["shape"]), device="meta")
          for r in golden_rows(f"{golden}_ldm_state_dict.tsv")}
    arch = ckpt.architecture_from_state_dict(sd, {})
    with init_empty_weights(include_buffers=False):
        encoders = [sd_models._open_clip(cfg) if (fam == "sd2" or i == 1) else sd_models._hf_clip(cfg)
                    for i, cfg in enumerate(arch.text)]
    assert all(p.is_meta for enc in encoders for p in enc.parameters())
    assert sum(isinstance(m, nn.MultiheadAttention) for m in encoders[-1].modules()) == {"sd2": 24, "sdxl": 32}[fam]
    parts = SimpleNamespace(family=fam, module_naming="ldm", unet=None, text_encoders=encoders)
    rows = [r for r in golden_rows(f"{golden}_lora_targets.tsv") if r["group"] == "te_attn_mlp"]
    by_name = {r["kohya_key_prefix"]: r for r in rows}
    for preset, proj_only in (("attn_mlp", False), ("attn", True)):
        targets = select_targets(parts, LoraSettings(targets=preset, train_unet=False))
        names = [t.name for t in targets]
        want = {r["kohya_key_prefix"] for r in rows
                if not proj_only or re.search(r"self_attn_(q|k|v|out)_proj$", r["kohya_key_prefix"])}
        assert len(names) == len(set(names)) and set(names) == want
    assert len(targets) == {"sd2": 23 * 4, "sdxl": 12 * 4 + 32 * 4}[fam]
    for t in select_targets(parts, LoraSettings(train_unet=False)):
        r = by_name[t.name]
        key = prefixes[t.index] + t.path
        if t.mha_slot in ("q", "k", "v"):
            rows_ = t.weight_shape[0]
            i = "qkv".index(t.mha_slot)
            key += f".in_proj_weight[{i * rows_}:{(i + 1) * rows_}]"
        else:
            key += ".weight"
        assert key == r["ldm_weight_key"]                     # lands on the weight A1111 changes
        assert t.weight_shape == golden_shape(r["kohya_source_weight_shape"])
