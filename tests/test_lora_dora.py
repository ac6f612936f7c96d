"""DoRA (network_type "dora") trains what A1111 v1.10 applies: a magnitude per input column (`dora_scale`).

Checked on tiny SD1 / SDXL models built in code, with the convolutions included (targets = full):
  - a fresh network reproduces the base model bit-exactly;
  - after a few training steps on random data, A1111's formula (`a1111_lora_math`: W + ΔW rescaled per input
    column to dora_scale, minus W, times the multiplier) applied to the saved file gives the trained model's
    output, at multiplier 1 and at 0.5 (then the weight change is half of W_new − W, and the standalone host's
    `set_strength(0.5)` gives the same output);
  - `dora_scale` has the shape A1111 broadcasts against every golden A1111 layer of the full-size SD1/SD2/SDXL
    models (q/k/v slices of OpenCLIP's in_proj_weight included), so no name is unmatched and no shape breaks;
  - save → load round trip and the resume state restore the same outputs;
  - what A1111 would apply differently is refused with a UserError that says why.
(The float64 comparison for every family, OpenCLIP under A1111's own module names, and fp16 models are in
test_lora_train.py and test_lora_openclip_ldm.py.)
"""

import json

import pytest
import torch
import torch.nn as nn

import a1111_lora_math as a1111
from conftest import golden_rows, golden_shape
from lib_sdtrain.errors import UserError
from lib_sdtrain.formats import kohya
from lib_sdtrain.formats.safetensors_io import read_safetensors, write_safetensors
from lib_sdtrain.methods.lora import LoraMethod, LoraSettings
from lib_sdtrain.testing.tiny import build_tiny
from test_lora_train import TinyParts, forward, make_inputs, roots, train

pytestmark = pytest.mark.usefixtures("one_thread")
GOLDEN_FILES = {"sd1": "sd15_lora_targets.tsv", "sd2": "sd2_768v_lora_targets.tsv",
                "sdxl": "sdxl_base_lora_targets.tsv"}


def dora_settings(**kw):
    base = dict(network_type="dora", network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=1.0,
                targets="full", save_dtype="fp32")
    base.update(kw)
    return LoraSettings(**base)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def tiny(request):
    return TinyParts(build_tiny(request.param))


def base_weights(parts, targets):
    """{weight key: base weight}, {kohya name: weight key} of the trained targets (the model detached)."""
    weights, where = {}, {}
    for t in targets:
        key = f"{t.component}{t.index}:{t.path}.weight"
        weights[key] = roots(parts)[(t.component, t.index)].get_submodule(t.path).weight.detach().clone()
        where[t.name] = key
    return weights, where


def replaced(targets, merged, where):
    out = {}
    for t in targets:
        out.setdefault((t.component, t.index), {})[t.path + ".weight"] = merged[where[t.name]]
    return out


def test_fresh_network_is_the_base_model(tiny):
    inp = make_inputs(tiny, 5)
    with torch.no_grad():
        before = forward(tiny, inp)
    method = LoraMethod(dora_settings())
    method.attach(tiny)
    try:
        targets = method.attached_targets()
        assert any(t.kind == "conv" and t.is_conv3x3 for t in targets)       # LoCon-style convolutions too
        with torch.no_grad():
            after = forward(tiny, inp)
        state = method.state_dict()
    finally:
        method.detach()
    assert torch.equal(before, after)
    for t in targets:   # the magnitude starts at the input-column norms of the base weight
        w = roots(tiny)[(t.component, t.index)].get_submodule(t.path).weight.detach()
        axes = [a for a in range(w.dim()) if a != 1]
        assert torch.allclose(state[f"{t.name}.dora_scale"], w.square().sum(axes, keepdim=True).sqrt(), rtol=1e-6)


def test_a_dead_input_column_gives_no_nan():
    # a zero input column of W (a pruned or dead input): its norm is 0, and m / 0 must not turn the output NaN
    import torch.nn as nn

    from lib_sdtrain.methods.lora import _layer_classes

    base = nn.Linear(4, 3)
    with torch.no_grad():
        base.weight[:, 2] = 0
    layer = _layer_classes()[("dora", "linear")](base, "default", r=2, lora_alpha=2)
    layer.add_magnitude("default")
    x = torch.randn(5, 4)
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y).all() and torch.allclose(y, base(x), atol=1e-6)


def test_saved_file_under_a1111_formula_gives_the_trained_model(tiny, tmp_path):
    method = LoraMethod(dora_settings())
    train(tiny, method, steps=3)
    targets = method.attached_targets()
    check = make_inputs(tiny, 42)
    try:
        with torch.no_grad():
            y_trained = forward(tiny, check, torch.float32)
            method.set_strength(0.5)
            y_half = forward(tiny, check, torch.float32)
            method.set_strength(1.0)
            assert torch.equal(forward(tiny, check, torch.float32), y_trained)
        path = method.save(tmp_path / "dora.safetensors", {"ss_output_name": "dora"})
    finally:
        method.detach()
    tensors, meta = read_safetensors(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"
    assert json.loads(meta["ss_network_args"])["wd_on_output"] == "False"
    modules = a1111.split_modules(tensors)
    assert set(modules) == {t.name for t in targets}
    assert all(set(w) == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"} for w in modules.values())
    for t in targets:
        want = (1, t.weight_shape[1]) + (1, 1) * (t.kind == "conv")
        assert tuple(modules[t.name]["dora_scale"].shape) == want, t.name

    weights, where = base_weights(tiny, targets)
    full, unmatched = a1111.apply_network(weights, tensors, where)
    assert unmatched == []
    half, _ = a1111.apply_network(weights, tensors, where, {t.name: 0.5 for t in targets})
    with torch.no_grad():
        y_base = forward(tiny, check, torch.float32)
        y_a1111 = forward(tiny, check, torch.float32, replaced(targets, full, where))
        y_a1111_half = forward(tiny, check, torch.float32, replaced(targets, half, where))
    assert (y_trained - y_base).abs().max() > 1e-2, "training changed nothing; the comparison would be empty"
    assert (y_trained - y_a1111).abs().max() < 1e-4, (y_trained - y_a1111).abs().max()
    assert (y_half - y_a1111_half).abs().max() < 1e-4, (y_half - y_a1111_half).abs().max()
    assert (y_half - y_trained).abs().max() > 1e-3                    # the strength does something
    for t in targets:   # the multiplier scales the decomposed difference W_new − W, not the LoRA product
        key, w = where[t.name], modules[t.name]
        base = weights[key].double()
        lora = (w["lora_up.weight"].double().flatten(1) @ w["lora_down.weight"].double().flatten(1))
        merged = base + lora.reshape(base.shape) * (w["alpha"].item() / w["lora_down.weight"].shape[0])
        axes = [a for a in range(base.dim()) if a != 1]
        w_new = merged / merged.square().sum(axes, keepdim=True).sqrt() * w["dora_scale"].double()
        assert torch.allclose(half[key].double() - base, 0.5 * (w_new - base), atol=1e-6), t.name
        assert torch.allclose(full[key].double() - base, w_new - base, atol=1e-6), t.name


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_dora_scale_fits_every_golden_a1111_layer(family):
    """Full-size stock models (meta device): each target's dora_scale broadcasts onto the weight A1111 gives that
    module (for OpenCLIP's q/k/v: its row block of in_proj_weight) exactly as the trained layer's own weight."""
    from lib_sdtrain.convert.lora import stock_targets

    ours = stock_targets(family)                  # kohya name -> trained weight shape, every group
    rows = {r["kohya_key_prefix"]: r for r in golden_rows(GOLDEN_FILES[family])}
    assert set(ours) == set(rows)
    for name, shape in ours.items():
        row = rows[name]
        a1111_shape = golden_shape(row["weight_shape"])
        if row["module_class"] == "MultiheadAttention":           # A1111 passes the q/k/v chunk
            a1111_shape = (a1111_shape[0] // 3, a1111_shape[1])
        scale = kohya.dora_scale_shape(shape)
        assert torch.broadcast_shapes(scale, a1111_shape) == a1111_shape == tuple(shape), name
        assert scale == (1, a1111_shape[1], *[1] * (len(a1111_shape) - 2)), name


def test_save_load_round_trip_and_resume(tiny, tmp_path):
    method = LoraMethod(dora_settings())
    train(tiny, method, steps=2)
    check = make_inputs(tiny, 7)
    try:
        with torch.no_grad():
            y_trained = forward(tiny, check)
        state = method.training_state()
        assert any(k.endswith(".dora_scale") for k in state)
        path = method.save(tmp_path / "dora.safetensors", {})
    finally:
        method.detach()
    again = LoraMethod(dora_settings())
    again.attach(tiny)
    try:
        again.set_strength(0.3)
        assert again.load_weights(path) == []              # loading puts the strength back to 1
        with torch.no_grad():
            assert torch.equal(forward(tiny, check), y_trained)
        assert all(torch.equal(v, state[k]) for k, v in again.training_state().items())
        with torch.no_grad():
            for _, p in again._layers.items():
                p.layer.dora_scale["default"].mul_(1.5)
            assert not torch.equal(forward(tiny, check), y_trained)
        again.load_training_state(state)                  # the resume state restores the magnitude too
        with torch.no_grad():
            assert torch.equal(forward(tiny, check), y_trained)
    finally:
        again.detach()


def test_what_a1111_would_apply_differently_is_refused(tiny, tmp_path):
    from lib_sdtrain.evaluate.apply import _lora_settings_from_metadata

    dora = LoraMethod(dora_settings(targets="attn_mlp", train_text_encoder=False))
    dora.attach(tiny)
    try:
        dora_file = dora.save(tmp_path / "dora.safetensors", {})
    finally:
        dora.detach()
    plain = LoraMethod(dora_settings(network_type="lora", targets="attn_mlp", train_text_encoder=False))
    plain.attach(tiny)
    try:
        plain_file = plain.save(tmp_path / "plain.safetensors", {})
        with pytest.raises(UserError, match=r"has DoRA magnitude \(dora_scale\), this network is lora"):
            plain.load_weights(dora_file)
    finally:
        plain.detach()
    tensors, meta = read_safetensors(dora_file)
    # LyCORIS's wd_on_output layout: one magnitude per output row
    name = next(k for k in tensors if k.endswith(".dora_scale") and "ff_net_2" in k).split(".")[0]
    rows = tensors[f"{name}.lora_up.weight"].shape[0]
    assert rows != tensors[f"{name}.dora_scale"].shape[1]
    per_row = dict(tensors, **{f"{name}.dora_scale": torch.ones(rows, 1)})
    per_row_file = write_safetensors(tmp_path / "per-row.safetensors", per_row, meta)
    again = LoraMethod(dora_settings(targets="attn_mlp", train_text_encoder=False))
    again.attach(tiny)
    try:
        with pytest.raises(UserError, match=r"has no DoRA magnitude \(dora_scale\), this network is dora"):
            again.load_weights(plain_file)
        with pytest.raises(UserError, match="per output row .*wd_on_output"):
            again.load_weights(per_row_file)
    finally:
        again.detach()
    # another trainer's file, read by its metadata (comparing epochs)
    assert _lora_settings_from_metadata({"ss_network_args": json.dumps(
        {"algo": "lora", "dora_wd": "True"}), "ss_network_dim": "4"}).network_type == "dora"
    with pytest.raises(UserError, match="per output row"):
        _lora_settings_from_metadata({"ss_network_args": json.dumps(
            {"algo": "locon", "dora_wd": "True", "wd_on_output": "True"})})
    with pytest.raises(UserError, match="DoRA on loha"):
        _lora_settings_from_metadata({"ss_network_args": json.dumps({"algo": "loha", "dora_wd": "True"})})


class Transformer2DModel(nn.Module):
    """kohya's parent class name, holding a grouped convolution (not in Stable Diffusion's targets)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        return self.conv(x)


def test_grouped_convolution_is_refused():
    unet = nn.Sequential(Transformer2DModel()).requires_grad_(False)
    parts = type("P", (), {"family": "sd1", "module_naming": "diffusers", "unet": unet, "text_encoders": []})()
    method = LoraMethod(dora_settings(train_text_encoder=False))
    with pytest.raises(UserError, match="DoRA cannot train lora_unet_0_conv .*grouped convolution"):
        method.attach(parts)
    assert type(unet[0].conv) is nn.Conv2d and not any(p.requires_grad for p in unet.parameters())
