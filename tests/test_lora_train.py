"""Train LoRA / LoCon / LoHa / LoKr on tiny SD1, SD2-v and SDXL models, save, and check the file with A1111's math.

For every family × network type: attach to the tiny model's own modules, take two optimizer steps on a
dummy loss (UNet on text-encoder conditioning), save the kohya file, then
  - its module names are golden names (the tiny models keep the stock topology) and land on the golden
    LDM weights;
  - A1111 v1.10.1's formulas (`a1111_lora_math`) applied to the base weights reproduce the trained model's
    output (both evaluated in float64, so only the algebra is compared) and peft's per-module delta;
  - loading the file back (`load_weights`) and the resume state reproduce the adapters;
  - `detach()` leaves the model bit-identical: state dict, requires_grad and train/eval flags, module classes,
    no peft attributes.
"""

import json
import re
import time

import pytest
import torch
import torch.nn as nn

import a1111_lora_math as a1111
from conftest import GOLDEN
from lib_sdtrain.errors import UserError
from lib_sdtrain.formats.safetensors_io import read_safetensors
from lib_sdtrain.hosts import ModelInfo, ModelParts
from lib_sdtrain.methods import lora as lora_mod
from lib_sdtrain.methods.lora import LoraMethod, LoraSettings
from lib_sdtrain.models.ldm_unet import unet_prefix_map
from lib_sdtrain.testing.tiny import build_tiny

FAMILIES = {"sd1": "sd15", "sd2": "sd2_768v", "sdxl": "sdxl_base"}
TYPES = ["lora", "locon", "loha", "lokr", "dora"]
RESULTS: dict[tuple[str, str], dict[str, float]] = {}   # printed at the end (-s) for the report


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyParts(ModelParts):
    """The attributes the LoRA method reads, over a tiny `LoadedCheckpoint` (standalone, diffusers naming)."""

    def __init__(self, loaded):
        self.family, self.prediction = loaded.arch.family, loaded.arch.prediction
        self.unet, self.vae, self.text_encoders = loaded.unet, loaded.vae, loaded.text_encoders
        self.tokenizers, self.module_naming, self.clip_skip = [], "diffusers", 1
        self.info = ModelInfo(name=f"tiny-{self.family}", sha256="ab" * 32, legacy_hash="12345678")


def roots(parts):
    return {("unet", 0): parts.unet, **{("text_encoder", i): e for i, e in enumerate(parts.text_encoders)}}


def make_inputs(parts, seed):
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 49408, (1, 8), generator=g), "x": torch.randn(1, 4, 8, 8, generator=g),
            "t": torch.tensor([500]), "target": torch.randn(1, 4, 8, 8, generator=g)}


def forward(parts, inp, dtype=None, replace=None):
    """UNet output on the text encoders' conditioning (A1111-style layer choice).

    With `dtype`, every floating parameter/buffer is cast (through `torch.func.functional_call`, so the model
    itself is untouched) and `replace` {(component, index): {param name: tensor}} overrides weights.
    """
    def call(key, module, *args, **kwargs):
        if dtype is None:
            return module(*args, **kwargs)
        state = {n: v.to(dtype) if v.is_floating_point() else v
                 for n, v in [*module.named_parameters(), *module.named_buffers()]}
        state.update({n: v.to(dtype) for n, v in (replace or {}).get(key, {}).items()})
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)   # transformers builds its causal mask in the default dtype
        try:
            return torch.func.functional_call(module, state, args, kwargs)
        finally:
            torch.set_default_dtype(default)

    hidden, pooled = [], None
    for i, enc in enumerate(parts.text_encoders):
        out = call(("text_encoder", i), enc, inp["ids"], output_hidden_states=True)
        hidden.append(out.last_hidden_state if parts.family == "sd1" else out.hidden_states[-2])
        if parts.family == "sdxl" and i == 1:
            pooled = out.text_embeds
    x = inp["x"] if dtype is None else inp["x"].to(dtype)
    kwargs = {}
    if parts.family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled,
                                       "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=x.dtype)}
    return call(("unet", 0), parts.unet, x, inp["t"], encoder_hidden_states=torch.cat(hidden, -1), **kwargs).sample


def model_snapshot(parts):
    snap = {}
    for key, root in roots(parts).items():
        snap[key] = {
            "state": {k: v.clone() for k, v in root.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in root.named_parameters()},
            "modes": {n: m.training for n, m in root.named_modules()},
            "classes": [(n, type(m)) for n, m in root.named_modules()],
            "attrs": set(vars(root)),
        }
    return snap


def assert_unchanged(parts, snap):
    for key, root in roots(parts).items():
        before = snap[key]
        state = root.state_dict()
        assert set(state) == set(before["state"]), key
        assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in before["state"].items()), key
        assert {n: p.requires_grad for n, p in root.named_parameters()} == before["grad"], key
        assert {n: m.training for n, m in root.named_modules()} == before["modes"], key
        assert [(n, type(m)) for n, m in root.named_modules()] == before["classes"], key
        assert set(vars(root)) == before["attrs"], key
        # (diffusers models carry a class-level `_hf_peft_config_loaded = False`; only instance state counts)
        assert "peft_config" not in vars(root) and "_hf_peft_config_loaded" not in vars(root)
        assert not any("lora_" in n or "hada_" in n or "lokr_" in n or "base_layer" in n
                       for n, _ in root.named_parameters())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request):
    loaded = build_tiny(request.param)
    parts = TinyParts(loaded)
    return parts, model_snapshot(parts)


@pytest.fixture(scope="module")
def golden_rows():
    out = {}
    for family, golden in FAMILIES.items():
        lines = (GOLDEN / f"{golden}_lora_targets.tsv").read_text().splitlines()
        head = lines[0].split("\t")
        out[family] = {r["kohya_key_prefix"]: r for r in (dict(zip(head, l.split("\t"))) for l in lines[1:])}
    return out


def settings_for(network_type, **kw):
    # small ranks; conv_dim differs from network_dim so both rank paths are exercised; fp32 file for exactness
    base = dict(network_type=network_type, network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=1.0,
                save_dtype="fp32", lokr_factor=-1)
    base.update(kw)
    return LoraSettings(**base)


def train(parts, method, steps=2):
    torch.manual_seed(0)
    groups = method.attach(parts, unet_lr=1e-2, text_encoder_lr=5e-3)
    for root in roots(parts).values():
        root.train()            # detach must put the host's eval mode back
    opt = torch.optim.Adam(groups)
    for step in range(steps):
        inp = make_inputs(parts, step)
        loss = (forward(parts, inp) - inp["target"]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for root in roots(parts).values():
        root.eval()
    return groups


@pytest.mark.parametrize("network_type", TYPES)
def test_train_save_and_apply_like_a1111(tiny, golden_rows, tmp_path, network_type):
    parts, snap = tiny
    t0 = time.perf_counter()
    method = LoraMethod(settings_for(network_type))
    groups = train(parts, method)
    assert [g["name"] for g in groups] == ["unet", "text_encoder"]
    assert [g["lr"] for g in groups] == [1e-2, 5e-3]
    assert all(p.dtype == torch.float32 and p.requires_grad for g in groups for p in g["params"])
    targets = method.attached_targets()

    # names: golden ones for the stock topology, landing on the golden LDM weight
    golden = golden_rows[parts.family]
    assert {t.name for t in targets} <= set(golden)
    assert any(t.group == "unet_conv" for t in targets) == (network_type == "locon")
    umap = unet_prefix_map(dict(parts.unet.config))
    for t in targets:
        if t.component == "unet":
            assert "model.diffusion_model." + umap.a_to_b(t.path) + ".weight" == golden[t.name]["ldm_weight_key"]
        else:
            assert t.path == golden[t.name]["kohya_source_module"]

    check = make_inputs(parts, 99)
    with torch.no_grad():
        y_trained = forward(parts, check, torch.float64)
    peft_deltas = method.delta_weights()
    path = method.save(tmp_path / f"{network_type}.safetensors", {"ss_output_name": "tiny"})
    state = method.training_state()
    method.detach()
    assert_unchanged(parts, snap)

    # A1111's arithmetic on the saved file
    tensors, meta = read_safetensors(path)
    assert meta["ss_network_module"] == ("networks.lora" if network_type in ("lora", "locon") else "lycoris.kohya")
    assert any(k.endswith(".dora_scale") for k in tensors) == (network_type == "dora")
    if network_type == "lokr":
        assert not any(k.endswith(("_a", "_b")) for k in tensors)      # full matrices only (see formats/kohya.py)
    weights, where = {}, {}
    for t in targets:
        key = f"{t.component}{t.index}:{t.path}.weight"
        weights[key] = roots(parts)[(t.component, t.index)].get_submodule(t.path).weight.detach()
        where[t.name] = key
    merged, unmatched = a1111.apply_network(weights, tensors, where, out_dtype=torch.float64)
    assert unmatched == []
    weight_err = max(((merged[where[n]].double() - weights[where[n]].double()) - d.double()).abs().max().item()
                     / d.double().abs().max().item() for n, d in peft_deltas.items() if d.abs().max() > 0)
    replace = {}
    for t in targets:
        replace.setdefault((t.component, t.index), {})[t.path + ".weight"] = merged[where[t.name]]
    with torch.no_grad():
        y_a1111 = forward(parts, check, torch.float64, replace)
        y_base = forward(parts, check, torch.float64)
    scale = y_trained.abs().max().item()
    out_err = (y_trained - y_a1111).abs().max().item() / scale
    effect = (y_trained - y_base).abs().max().item() / scale
    assert effect > 1e-3, "training did not change the output; the comparison would be empty"
    assert out_err < 1e-7, out_err   # LoRA/LoHa ~1e-15; LoKr stores kron factors in fp32
    assert weight_err < 1e-6, weight_err

    # the file back into adapters (resume/convert path) and the exact resume state
    again = LoraMethod(settings_for(network_type))
    again.attach(parts)
    assert again.load_weights(path) == []
    load_err = max((d - peft_deltas[n]).abs().max().item() / peft_deltas[n].abs().max().item()
                   for n, d in again.delta_weights().items() if peft_deltas[n].abs().max() > 0)
    assert load_err < 1e-5, load_err
    again.load_training_state(state)
    assert all(torch.equal(v, state[k]) for k, v in again.training_state().items())
    again.detach()
    assert_unchanged(parts, snap)
    RESULTS[(parts.family, network_type)] = {"output_rel_err": out_err, "weight_rel_err": weight_err,
                                             "load_rel_err": load_err, "effect": effect,
                                             "modules": len(targets), "seconds": time.perf_counter() - t0}


def test_report_results(capsys):
    """Prints the measured errors (run with -s); always passes when the cases above did."""
    if RESULTS:
        with capsys.disabled():
            print("\nfamily type   modules  output_rel_err  weight_rel_err  load_rel_err  effect  seconds")
            for (family, kind), r in sorted(RESULTS.items()):
                print(f"{family:6} {kind:6} {r['modules']:7d}  {r['output_rel_err']:.1e}         "
                      f"{r['weight_rel_err']:.1e}         {r['load_rel_err']:.1e}       {r['effect']:.3f}   "
                      f"{r['seconds']:.1f}")


# ---- attach/detach edge cases ------------------------------------------------------------------------------
def test_detach_after_failed_attach_restores_everything(tiny, monkeypatch):
    parts, snap = tiny
    method = LoraMethod(settings_for("loha"))
    real = lora_mod._layer_classes()
    calls = {"n": 0}

    class Boom(Exception):
        pass

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise Boom()
        return real[("loha", "linear")](*args, **kwargs)

    monkeypatch.setattr(lora_mod, "_layer_classes", lambda: {**real, ("loha", "linear"): flaky})
    with pytest.raises(Boom):
        method.attach(parts)
    assert_unchanged(parts, snap)
    method.detach()  # a second detach is harmless
    assert_unchanged(parts, snap)


def test_attach_twice_is_refused_and_freezes_only_base(tiny):
    parts, snap = tiny
    method = LoraMethod(settings_for("lora", train_text_encoder=False))
    groups = method.attach(parts)
    try:
        assert [g["name"] for g in groups] == ["unet"] and "lr" not in groups[0]
        trainable = {id(p) for p in groups[0]["params"]}
        assert all(p.requires_grad == (id(p) in trainable) for p in parts.unet.parameters())
        assert not method.trains_text_encoder()
        with pytest.raises(RuntimeError):
            method.attach(parts)
        parts.unet.peft_config = {"default": None}            # as peft's tuner API would leave it
    finally:
        method.detach()
    assert_unchanged(parts, snap)


class Transformer2DModel(nn.Module):
    """A stand-in with kohya's parent class name: one Linear and one 3×3 Conv2d."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):                    # [B, 8, H, W]
        return self.conv(self.lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("network_type", ["lora", "loha", "lokr", "dora"])
def test_low_precision_model_gets_fp32_adapters(network_type, dtype):
    torch.manual_seed(0)
    unet = nn.Sequential(Transformer2DModel()).to(dtype).requires_grad_(False)
    parts = type("P", (), {"family": "sd1", "module_naming": "diffusers", "unet": unet, "text_encoders": []})()
    method = LoraMethod(settings_for(network_type, train_text_encoder=False))
    groups = method.attach(parts)
    assert all(p.dtype == torch.float32 for p in groups[0]["params"])
    out = unet(torch.randn(2, 8, 4, 4, dtype=dtype))           # no autocast: must not fail on mixed dtypes
    assert out.dtype == dtype
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in groups[0]["params"])
    assert unet[0].lin.base_layer.weight.dtype == dtype
    method.detach()
    assert type(unet[0].lin) is nn.Linear and not any(p.requires_grad for p in unet.parameters())


def test_load_weights_rejects_other_networks(tiny, tmp_path):
    parts, snap = tiny
    a = LoraMethod(settings_for("lora", train_text_encoder=False))
    a.attach(parts)
    path = a.save(tmp_path / "unet-only.safetensors", {})
    a.detach()
    b = LoraMethod(settings_for("loha", train_text_encoder=False))
    b.attach(parts)
    try:
        with pytest.raises(UserError, match="is lora, this network is loha"):
            b.load_weights(path)
    finally:
        b.detach()
    c = LoraMethod(settings_for("lora"))                       # also trains the text encoder
    c.attach(parts)
    try:
        with pytest.raises(UserError, match="does not fit"):
            c.load_weights(path)
        assert c.load_weights(path, strict=False)               # the text encoder's modules stay untrained
        with pytest.raises(UserError, match="does not fit this network"):
            c.load_training_state({"nope": torch.zeros(1)})
    finally:
        c.detach()
    assert_unchanged(parts, snap)
    assert json.loads(read_safetensors(path)[1]["lab.network"])["network_type"] == "lora"


@pytest.mark.parametrize("network_type", ["lora", "dora"])
def test_loraplus_gives_the_up_matrices_their_own_rate(tiny, network_type):
    """LoRA+: the up (lora_B) matrices form their own groups at ratio × the component's rate, everything else
    (down matrices, DoRA magnitudes) keeps the component's rate; no parameter is lost or doubled, and one Adam
    step from the zero-initialised up matrices moves them by about ratio × rate."""
    parts, snap = tiny
    plain = LoraMethod(settings_for(network_type))
    before = plain.attach(parts, unet_lr=1e-3, text_encoder_lr=5e-4)
    plain_ids = sorted(id(p) for g in before for p in g["params"])
    plain.detach()
    method = LoraMethod(settings_for(network_type, loraplus_lr_ratio=16))
    try:
        torch.manual_seed(0)
        groups = method.attach(parts, unet_lr=1e-3, text_encoder_lr=5e-4)
        by_name = {g["name"]: g for g in groups}
        assert sorted(by_name) == ["text_encoder", "text_encoder_up", "unet", "unet_up"]
        assert by_name["unet_up"]["lr"] == pytest.approx(16e-3) and by_name["unet"]["lr"] == 1e-3
        assert by_name["text_encoder_up"]["lr"] == pytest.approx(8e-3) and by_name["text_encoder"]["lr"] == 5e-4
        # the same parameters as without LoRA+ (not the same objects: a new attach), each in exactly one group
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(plain_ids)
        up_ids = {id(p) for g in groups if g["name"].endswith("_up") for p in g["params"]}
        named = {id(p): n for root in roots(parts).values() for n, p in root.named_parameters()}
        assert up_ids and all(".lora_B." in named[i] for i in up_ids)
        assert all(".lora_B." not in named[id(p)] for g in groups if not g["name"].endswith("_up")
                   for p in g["params"])
        opt = torch.optim.Adam(groups)
        inp = make_inputs(parts, 0)
        (forward(parts, inp) - inp["target"]).pow(2).mean().backward()
        opt.step()
        up = by_name["unet_up"]["params"]
        moved = max(p.detach().abs().max().item() for p in up)     # Adam's first step: about lr per element
        assert 8e-3 < moved <= 16e-3 * 1.01
        assert "loraplus_lr_ratio" in method.settings.network_args()
    finally:
        method.detach()
    assert_unchanged(parts, snap)


def test_loraplus_is_refused_where_there_is_no_up_matrix():
    for network_type in ("loha", "lokr"):
        with pytest.raises(UserError, match="loraplus_lr_ratio"):
            settings_for(network_type, loraplus_lr_ratio=16).validate()
    settings_for("loha", loraplus_lr_ratio=1.0).validate()        # 1 = off
    assert "loraplus_lr_ratio" not in settings_for("lora").network_args()


# ---- a distilled SDXL (SSD-1B / Segmind Vega kind) from a file without our metadata ---------------------------
def test_distilled_sdxl_file_trains_and_its_lora_lands_where_a1111_puts_it(tmp_path):
    """A UNet with uneven transformer depths and a middle block without attention, in a single file with no
    `lab.architecture` metadata (as SSD-1B ships): the layout is read from its keys, a LoCon run trains on it,
    every UNet name in the file is the one A1111 computes from its own module path (`lora_unet_` + the SGM path
    of a weight in the checkpoint), and A1111's merge of the file changes the UNet as the adapters do."""
    from conftest import make_dataset
    from safetensors.torch import save_file

    from lib_sdtrain.events import Events
    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.models import checkpoint as ckpt
    from lib_sdtrain.train.loop import train as run_training
    from lib_sdtrain.train.settings import TrainSettings

    tiny = build_tiny("sdxl", layout="distilled")
    sd = ckpt.ldm_state_dict(tiny.arch, tiny.unet, tiny.vae, tiny.text_encoders)
    assert "model.diffusion_model.middle_block.0.in_layers.2.weight" in sd
    assert not any(k.startswith("model.diffusion_model.middle_block.1.") for k in sd)
    path = tmp_path / "distilled.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))

    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")
    base = host.load(path)
    assert base.unet.config.transformer_layers_per_block == [1, [2, 1], 1]
    assert base.unet.config.reverse_transformer_layers_per_block == [[2, 1, 3], [1, 1, 2], [1, 1, 1]]
    assert base.unet.config.mid_block_type == "UNetMidBlock2D"
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in tiny.unet.state_dict().items())

    lora = {"network_type": "locon", "network_dim": 4, "network_alpha": 4, "conv_dim": 2, "conv_alpha": 2,
            "train_text_encoder": False, "save_dtype": "fp32"}
    cfg = TrainSettings.from_dict({
        "model": str(path), "data": str(make_dataset(tmp_path / "data", n=2, repeats=2)),
        "output": str(tmp_path / "out"), "name": "d", "resolution": 64, "min_bucket": 64, "max_bucket": 64,
        "batch_size": 2, "epochs": 1, "learning_rate": 1e-2, "tensorboard": False, "lora": lora})
    result = run_training(cfg, host, Events())
    assert result.stopped == "" and result.steps == 2
    tensors, _ = read_safetensors(result.final)

    # A1111 names: `lora_unet_` + the module's SGM path with '_' for '.', for every Linear/Conv2d weight in the file
    unet_prefix = "model.diffusion_model."
    a1111_key = {f"lora_unet_{k[len(unet_prefix):-len('.weight')].replace('.', '_')}": k
                 for k, v in sd.items() if k.startswith(unet_prefix) and k.endswith(".weight") and v.dim() >= 2}
    names = {k.split(".")[0] for k in tensors}
    assert names <= set(a1111_key), sorted(names - set(a1111_key))[:5]
    # every such layer of every transformer block the file has, and of the lone middle res block, is trained
    attn = {n for n, k in a1111_key.items() if re.search(r"_blocks\.\d+\.1\.(?!conv)", k)}
    assert attn <= names
    assert "lora_unet_output_blocks_2_1_transformer_blocks_2_attn2_to_k" in names     # a block deeper than stock
    assert "lora_unet_middle_block_0_in_layers_2" in names
    assert not any(n.startswith(("lora_unet_input_blocks_5_1_transformer_blocks_1", "lora_unet_middle_block_1"))
                   for n in names)

    # the file merged by A1111's arithmetic onto the checkpoint's own LDM weights vs. our adapters loaded back
    merged, unmatched = a1111.apply_network(sd, tensors, a1111_key, out_dtype=torch.float32)
    assert unmatched == []
    a1111_unet = ckpt.load_from_state_dict(merged, base.loaded.arch).unet
    method = LoraMethod(LoraSettings(**lora))
    method.attach(base)
    assert method.load_weights(result.final) == []
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 6, 64, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        ours = base.unet(x, torch.tensor([400]), encoder_hidden_states=ctx, added_cond_kwargs=cond).sample
        theirs = a1111_unet(x, torch.tensor([400]), encoder_hidden_states=ctx, added_cond_kwargs=cond).sample
        plain = tiny.unet(x, torch.tensor([400]), encoder_hidden_states=ctx, added_cond_kwargs=cond).sample
    method.detach()
    scale = plain.abs().max().item()
    effect = (theirs - plain).abs().max().item() / scale
    assert effect > 1e-3, "the LoRA did not change the output; the comparison would be empty"
    assert (ours - theirs).abs().max().item() / scale < 1e-5
