"""Hypernetworks on tiny SD1, SD2-v and SDXL models, checked against A1111 v1.10.1's own rules.

- The k/v modules have A1111's Sequential layout (the golden `hn_tiny_121.pt` sizes 32/64/128 with the UI
  defaults, and the index shifts an activation / LayerNorm / Dropout cause) and its initialisation.
- A run through `train()` writes `NAME.pt` with the golden structure (keys in A1111's order, int width keys,
  (k, v) tuples of OrderedDict state dicts, float32) that passes A1111's safe-loading check.
- Loaded the A1111 way and applied the A1111 way (every attention's to_k/to_v input through the module of
  its width, `x + linear(x) * multiplier`), the file gives the trained model's output; `detach` restores the
  model bit for bit.
"""

import json

import pytest
import torch
from a1111_ti_hn import (
    A1111HypernetworkModule,
    a1111_check_pt,
    a1111_hypernetwork_layers,
    a1111_load,
    apply_hypernetwork_hooks,
    describe,
    skeleton,
)
from conftest import GOLDEN, load_tiny, write_pictures
from torch import nn

from lib_sdtrain.formats.safe_pickle import load_checkpoint
from lib_sdtrain.errors import UserError
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.methods.hypernetwork import (
    HypernetworkMethod,
    HypernetworkSettings,
    _classes,
    attention_projections,
    model_sizes,
)
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings

FORMATS = GOLDEN / "a1111_formats"
FAMILIES = ["sd1", "sd2", "sdxl"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_pictures(tmp_path_factory.mktemp("data") / "2_toy", 4, seed=1, box=(8, 40, 20, 52), colour=(0, 0, 255),
                          captions="blue square, picture {i}").parent


def module(dim, **kw):
    s = HypernetworkSettings(**kw)
    cls, _ = _classes()
    return cls(dim, s.structure(), s.activation, s.weight_init, s.layer_norm, s.activate_output, s.dropouts())


# ---- A1111's module ---------------------------------------------------------------------------------
def test_default_module_matches_the_golden_file():
    golden = json.loads((FORMATS / "hn_tiny_121.pt.json").read_text())
    for size, (count, shapes) in golden["a1111_Hypernetwork_load"]["layers"].items():
        sd = module(int(size)).state_dict()
        assert count == 2 and [list(v.shape) for v in sd.values()] == shapes
        want = golden["unpickled_structure"]["items"][f"<int {size}>"]["items"][0]["items"]
        assert list(sd) == list(want) and all(str(v.dtype) == want[k]["dtype"] for k, v in sd.items())
    real = torch.load(FORMATS / "hn_tiny_121.pt", weights_only=True)
    ours = module(32)
    ours.load_state_dict(real[32][0])        # strict: A1111's file fits our module exactly


@pytest.mark.parametrize("kw,keys", [
    # derived from A1111's constructor: per step Linear, activation (not after the last unless activate_output),
    # LayerNorm, Dropout where dropout_structure[i+1] > 0
    ({"activation": "relu"}, ["linear.0", "linear.2"]),
    ({"activation": "relu", "activate_output": True}, ["linear.0", "linear.2"]),
    ({"activation": "relu", "layer_norm": True, "use_dropout": True}, ["linear.0", "linear.2", "linear.3", "linear.4"]),
    ({"activation": "relu", "layer_norm": True, "use_dropout": True, "last_layer_dropout": True},
     ["linear.0", "linear.2", "linear.4", "linear.5"]),
    ({"activation": "prelu", "activate_output": True}, ["linear.0", "linear.1", "linear.2", "linear.3"]),
    ({"layer_structure": "1, 1.5, 2, 1", "use_dropout": True, "last_layer_dropout": True},
     ["linear.0", "linear.2", "linear.4"]),
    ({"layer_structure": "1, 1.5, 2, 1", "use_dropout": True, "dropout_structure": "0, 0, 0.2, 0"},
     ["linear.0", "linear.1", "linear.3"]),
])
def test_sequential_indices_follow_a1111(kw, keys):
    ours = module(16, **kw)
    assert sorted({k.rsplit(".", 1)[0] for k in ours.state_dict()}) == keys
    s = HypernetworkSettings(**kw)
    ref = A1111HypernetworkModule(16, ours.state_dict(), s.structure(), s.activation, s.layer_norm,
                                  s.activate_output, s.dropouts())   # strict load into A1111's layout
    x = torch.randn(2, 5, 16)
    ours.eval(), ref.eval()
    if s.activation in ("linear", "relu"):
        assert torch.equal(ours(x), ref(x))


def test_initialisation_follows_a1111():
    torch.manual_seed(0)
    m = module(256, layer_norm=True)
    lin, norm = m.linear[0], m.linear[1]
    assert abs(lin.weight.std().item() - 0.01) < 1e-3 and not lin.bias.any()
    assert abs(norm.weight.std().item() - 0.01) < 3e-3 and not norm.bias.any()   # A1111 quirk: LayerNorm ~ N(0, .01)
    xu = module(256, weight_init="XavierUniform").linear[0]
    bound = (6 / (256 + 512)) ** 0.5
    assert xu.weight.abs().max() <= bound and xu.weight.abs().max() > 0.9 * bound and not xu.bias.any()
    kn = module(256, weight_init="KaimingNormal", activation="leakyrelu").linear[0]
    assert abs(kn.weight.std().item() - (2 / (1 + 0.01 ** 2) / 256) ** 0.5) < 0.01
    m = module(8)
    assert m.training and m.multiplier == 1.0


def test_attention_finder_works_on_ldm_names():
    class Attn(nn.Module):
        def __init__(self, q, c):
            super().__init__()
            self.to_q, self.to_k, self.to_v = nn.Linear(q, q), nn.Linear(c, q), nn.Linear(c, q)

    root = nn.Module()
    block = nn.Module()
    block.attn1, block.attn2 = Attn(320, 320), Attn(320, 768)
    root.add_module("input_blocks", nn.ModuleList([nn.Sequential(nn.Identity(), nn.Module())]))
    root.input_blocks[0][1].add_module("transformer_blocks", nn.ModuleList([block]))
    names = [n for n, _ in attention_projections(root)]
    assert names == ["input_blocks.0.1.transformer_blocks.0.attn1", "input_blocks.0.1.transformer_blocks.0.attn2"]
    assert model_sizes(root) == [768, 320]    # A1111's UI order: the context width first


# ---- end to end ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_train_writes_the_golden_format(tmp_path, tiny_checkpoints, dataset, family):
    cfg = TrainSettings.from_dict({
        "method": "hypernetwork", "model": str(tiny_checkpoints[family]), "data": str(dataset), "name": "hn",
        "output": str(tmp_path / "out"), "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 2,
        "max_steps": 3, "learning_rate": 1e-3, "tensorboard": False})
    result = train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs"))
    assert result.stopped == "" and result.final.name == "hn.pt" and result.steps == 3
    a1111_check_pt(result.final)
    data = a1111_load(result.final)
    golden = json.loads((FORMATS / "hn_tiny_121.pt.json").read_text())["unpickled_structure"]
    ours = describe(data)
    parts = load_tiny(tiny_checkpoints, family)
    sizes = model_sizes(parts.unet)
    assert [k for k in data if type(k) is int] == sizes
    assert [k for k in data if type(k) is str] == [k for k in golden["items"] if not k.startswith("<int")]
    assert ours["key_types"] == golden["key_types"] == ["int", "str"]
    entry = skeleton(golden["items"]["<int 32>"])
    flexible = {"sd_checkpoint", "sd_checkpoint_name", "optional_info"}   # None when created, str when trained
    for key, value in ours["items"].items():
        if key.startswith("<int"):
            assert skeleton(value) == entry
            w = int(key[5:-1])
            assert [list(t.shape) for t in data[w][0].values()] == [[2 * w, w], [2 * w], [w, 2 * w], [w]]
        elif key in flexible:
            assert value["type"] in ("str", golden["items"][key]["type"])
        else:
            assert skeleton(value) == skeleton(golden["items"][key]), key
    assert data["step"] == 3 and data["name"] == "hn" and data["layer_structure"] == [1.0, 2.0, 1.0]
    assert data["sd_checkpoint"] == parts.info.fill_hashes().sha256[:10]
    assert data["sd_checkpoint_name"] == f"tiny-{family}"
    info = json.loads(data["optional_info"])
    assert info["lab.method"] == "hypernetwork" and info["ss_steps"] == "3"
    assert json.loads(info["lab.hypernetwork"])["layer_structure"] == "1, 2, 1"
    assert any(not torch.equal(t, torch.zeros_like(t)) for t in data[sizes[0]][0].values())
    # our own safe reader agrees
    again = load_checkpoint(result.final)
    assert all(torch.equal(a, b) for a, b in zip(again[sizes[0]][1].values(), data[sizes[0]][1].values()))


# ---- A1111's application reproduces the trained model --------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_a1111_application_reproduces_the_trained_model(tmp_path, tiny_checkpoints, family):
    parts = load_tiny(tiny_checkpoints, family)
    roots = [parts.unet, *parts.text_encoders]
    snap = [({k: v.clone() for k, v in r.state_dict().items()}, {n: p.requires_grad for n, p in r.named_parameters()},
             {n: m.training for n, m in r.named_modules()}, [(n, type(m)) for n, m in r.named_modules()]) for r in roots]
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([200, 800])
    with torch.no_grad():
        cond = parts.encode_text(["blue square", "a photo"])
        before = parts.predict(x, t, cond)

    settings = HypernetworkSettings(activation="relu", layer_norm=True, use_dropout=True,
                                    dropout_structure="0, 0.2, 0", weight_init="XavierNormal")
    method = HypernetworkMethod(settings)
    torch.manual_seed(0)
    sizes = model_sizes(parts.unet)
    groups = method.attach(parts, unet_lr=1e-2)
    assert list(method.modules) == sizes and len(sizes) == (1 if family == "sdxl" else 2)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(parts.predict(x, t, cond), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
    method.set_multiplier(0.7)
    with torch.no_grad():      # eval semantics: no dropout, multiplier applied
        trained = parts.predict(x, t, cond)
        assert torch.equal(parts.predict(x, t, cond), trained)
    path = method.save(tmp_path / "hn.pt", {"ss_steps": "3", "ss_output_name": "hn"})
    method.detach()

    for r, (state, grads, modes, classes) in zip(roots, snap):
        now = r.state_dict()
        assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
        assert {n: p.requires_grad for n, p in r.named_parameters()} == grads
        assert {n: m.training for n, m in r.named_modules()} == modes
        assert [(n, type(m)) for n, m in r.named_modules()] == classes
    with torch.no_grad():
        assert torch.equal(parts.predict(x, t, cond), before)
    assert (trained - before).abs().max() > 1e-4

    layers = a1111_hypernetwork_layers(a1111_load(path), multiplier=0.7)
    handles = apply_hypernetwork_hooks(parts.unet, layers)
    try:
        with torch.no_grad():
            out = parts.predict(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(out, trained, atol=1e-5, rtol=0), (out - trained).abs().max()
    # our own loader (used to evaluate saved files) puts the same network back
    again = HypernetworkMethod(settings)
    again.attach(parts)
    try:
        assert again.load_weights(path) == []
        again.set_multiplier(0.7)
        with torch.no_grad():
            assert torch.equal(parts.predict(x, t, cond), trained)
    finally:
        again.detach()
    other = HypernetworkMethod(HypernetworkSettings())
    other.attach(parts)
    try:
        with pytest.raises(UserError, match="activation_func"):
            other.load_weights(path)
    finally:
        other.detach()


def test_sizes_choice_and_errors(tiny_checkpoints):
    parts = load_tiny(tiny_checkpoints, "sd1")
    widths = model_sizes(parts.unet)
    method = HypernetworkMethod(HypernetworkSettings(sizes=str(widths[0])))
    method.attach(parts)
    try:
        assert list(method.modules) == widths[:1]
        attns = [m for n, m in parts.unet.named_modules() if n.endswith((".attn1", ".attn2"))]
        wrapped = [a for a in attns if type(a.to_k) is not nn.Linear]
        assert wrapped and len(wrapped) < len(attns)       # the 64-wide attentions keep their plain Linear
        assert all(a.to_k.in_features == widths[0] and type(a.to_v) is type(a.to_k) for a in wrapped)
        state = {k: v * 0 + 0.5 for k, v in method.training_state().items()}
        method.load_training_state(state)
        assert all(torch.equal(v, state[k]) for k, v in method.training_state().items())
    finally:
        method.detach()
    with pytest.raises(UserError, match="no attention layer"):
        HypernetworkMethod(HypernetworkSettings(sizes="999")).attach(parts)
    for bad in ({"layer_structure": "2, 1"}, {"sizes": "x"}, {"use_dropout": True, "dropout_structure": "0, 1"}):
        with pytest.raises(UserError):
            HypernetworkSettings(**bad).validate()
