"""The X/Y/Z plot axes: registered by scripts/training_lab_xyz.py into a fake xyz_grid module shaped like A1111's
(AxisOption(label, type, apply, format_value, confirm, cost, choices, prepare); a1111-host.md §6), and applied the
way xyz_grid's `cell()` applies them: to a copy of `p`, X first, then Y."""

import copy
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from lib_sdtrain.evaluate import xyz
from lib_sdtrain.formats.safetensors_io import write_safetensors

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "training_lab_xyz.py"


def format_value_add_label(p, opt, x):   # xyz_grid's default formatter
    return f"{opt.label}: {x}"


class AxisOption:                          # the reference's shape, v1.10.1
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0,
                 choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.choices, self.prepare = confirm, cost, choices, prepare


def _save(folder, stem, epoch=None, steps=None, suffix=".safetensors"):
    meta = {"ss_output_name": stem.split("-")[0]}
    if epoch is not None:
        meta["ss_epoch"] = str(epoch)
    if steps is not None:
        meta["ss_steps"] = str(steps)
    path = folder / f"{stem}{suffix}"
    if suffix == ".safetensors":
        write_safetensors(path, {"x": torch.zeros(2)}, meta)
    else:
        path.write_bytes(b"not a real pickle")
    return path


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """Fake `modules` (scripts, script_callbacks, shared, sd_models) with one xyz_grid.py entry."""
    dirs = {k: tmp_path / k for k in ("lora", "emb", "hn", "ckpt")}
    for d in dirs.values():
        d.mkdir()
    # a LoRA run: two epoch saves and the final file; plus an unrelated LoRA
    _save(dirs["lora"], "mylora-000001", 1, 60)
    _save(dirs["lora"], "mylora-000002", 2, 120)
    _save(dirs["lora"], "mylora", 3, 180)
    _save(dirs["lora"], "other")
    _save(dirs["emb"], "myemb-step00000500", None, 500)
    _save(dirs["emb"], "myemb", None, 1000)
    _save(dirs["hn"], "myhn-000001", suffix=".pt")
    _save(dirs["hn"], "myhn-000002", suffix=".pt")
    _save(dirs["ckpt"], "mydb-000001", 1, 40)
    _save(dirs["ckpt"], "mydb", 2, 80)

    callbacks = []
    xyz_module = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[AxisOption("Nothing", str, None)])
    entry = types.SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=xyz_module,
                                  path="scripts/xyz_grid.py", basedir=".")
    known = {"mydb-000001": "mydb-000001.safetensors [abc]", "mydb": "mydb.safetensors [def]"}

    def closest(name):
        return types.SimpleNamespace(name=known[name]) if name in known else None

    modules = types.ModuleType("modules")
    mods = {
        "modules": modules,
        "modules.scripts": types.SimpleNamespace(scripts_data=[entry]),
        "modules.script_callbacks": types.SimpleNamespace(on_before_ui=callbacks.append),
        "modules.shared": types.SimpleNamespace(cmd_opts=types.SimpleNamespace(
            lora_dir=str(dirs["lora"]), embeddings_dir=str(dirs["emb"]), hypernetwork_dir=str(dirs["hn"]),
            ckpt_dir=str(dirs["ckpt"]))),
        "modules.sd_models": types.SimpleNamespace(get_closet_checkpoint_match=closest, list_models=lambda: None,
                                                   model_path=str(dirs["ckpt"])),
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
        if "." in name:
            setattr(modules, name.split(".")[1], mod)
    return types.SimpleNamespace(xyz=xyz_module, entry=entry, callbacks=callbacks, scripts=mods["modules.scripts"],
                                 dirs=dirs)


def load_script():
    """Execute the script the way A1111's script_loading.load_module does (module name = file name)."""
    spec = importlib.util.spec_from_file_location("training_lab_xyz.py", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def axes_by_label(xyz_module):
    return {o.label: o for o in xyz_module.axis_options}


def make_p(prompt="a photo of zwx", negative=""):
    return types.SimpleNamespace(prompt=prompt, negative_prompt=negative, override_settings={}, seed=1)


def test_axes_registered_once_with_reference_shape(webui):
    load_script()
    assert len(webui.callbacks) == 1                         # on_before_ui registered at import
    webui.callbacks[0]()                                     # ... and running it again adds nothing
    labels = [o.label for o in webui.xyz.axis_options]
    assert labels == ["Nothing"] + list(xyz.AXIS_LABELS.values())
    opts = axes_by_label(webui.xyz)
    assert all(isinstance(o, AxisOption) for o in webui.xyz.axis_options)
    assert opts["Training Lab: LoRA weight"].type is float and opts["Training Lab: LoRA weight"].choices is None
    assert opts["Training Lab: checkpoint epoch"].cost == 1.0 and opts["Training Lab: LoRA epoch"].cost == 0.0
    # choices: every save of runs that saved epochs/steps, oldest first; lone files ("other") are not runs
    assert opts["Training Lab: LoRA epoch"].choices() == ["mylora-000001", "mylora-000002", "mylora"]
    assert opts["Training Lab: embedding step"].choices() == ["myemb-step00000500", "myemb"]
    assert opts["Training Lab: hypernetwork epoch"].choices() == ["myhn-000001", "myhn-000002"]
    assert opts["Training Lab: checkpoint epoch"].choices() == ["mydb-000001", "mydb"]


def test_missing_or_odd_xyz_does_not_break_loading(webui, capsys):
    webui.scripts.scripts_data.clear()
    load_script()                                            # no xyz_grid: silently nothing
    assert [o.label for o in webui.xyz.axis_options] == ["Nothing"]
    broken = types.SimpleNamespace(AxisOption=AxisOption)    # an xyz module without axis_options
    webui.scripts.scripts_data.append(types.SimpleNamespace(
        script_class=type("S", (), {"__module__": "xyz_grid.py"}), module=broken))
    load_script()
    assert "axes not added" in capsys.readouterr().err


def test_lora_epoch_and_weight_edit_the_prompt_in_either_order(webui):
    load_script()
    opts = axes_by_label(webui.xyz)
    epoch, weight = opts["Training Lab: LoRA epoch"], opts["Training Lab: LoRA weight"]
    base = make_p("a photo of zwx, <lora:other:0.7>")
    # X = epoch, Y = weight (xyz applies X first); values arrive as A1111 casts them with opt.type
    pc = copy.copy(base)
    epoch.apply(pc, epoch.type("mylora-000002"), [])
    weight.apply(pc, weight.type("0.5"), [])
    assert pc.prompt == "a photo of zwx, <lora:other:0.7> <lora:mylora-000002:0.5>"
    # X = weight, Y = epoch: the other LoRA keeps its weight, ours gets 0.5
    pc = copy.copy(base)
    weight.apply(pc, 0.5, [])
    epoch.apply(pc, "mylora", [])
    assert pc.prompt == "a photo of zwx, <lora:other:0.7> <lora:mylora:0.5>"
    assert base.prompt == "a photo of zwx, <lora:other:0.7>"     # the original p is untouched
    # a tag of the same run already in the prompt is replaced, keeping the user's weight and UNet multiplier
    pc = make_p("<lora:mylora:0.8:0.6> zwx")
    epoch.apply(pc, "mylora-000001", [])
    assert pc.prompt == "<lora:mylora-000001:0.8:0.6> zwx"
    weight.apply(pc, 1.25, [])
    assert pc.prompt == "<lora:mylora-000001:1.25:0.6> zwx"
    # weight axis alone: the prompt's Training Lab LoRA changes, an unrelated LoRA does not
    pc = make_p("<lora:other:0.7> <lora:mylora-000002:1> zwx")
    weight.apply(pc, 0.3, [])
    assert pc.prompt == "<lora:other:0.7> <lora:mylora-000002:0.3> zwx"


def test_labels_say_epoch_and_step(webui):
    load_script()
    opts = axes_by_label(webui.xyz)
    p = make_p()
    lora = opts["Training Lab: LoRA epoch"]
    assert lora.format_value(p, lora, "mylora-000002") == "mylora · epoch 2 · step 120"
    assert lora.format_value(p, lora, "mylora") == "mylora · final · epoch 3 · step 180"
    emb = opts["Training Lab: embedding step"]
    assert emb.format_value(p, emb, "myemb-step00000500") == "myemb · step 500"
    hn = opts["Training Lab: hypernetwork epoch"]
    assert hn.format_value(p, hn, "myhn-000002") == "myhn · epoch 2"
    w = opts["Training Lab: LoRA weight"]
    assert w.format_value(p, w, 0.75) == "weight 0.75"


def test_embedding_hypernetwork_and_checkpoint_axes(webui):
    load_script()
    opts = axes_by_label(webui.xyz)
    pc = make_p("a painting in myemb style", "ugly, myemb-step00000500")
    opts["Training Lab: embedding step"].apply(pc, "myemb-step00000500", [])
    assert pc.prompt == "a painting in myemb-step00000500 style"
    assert pc.negative_prompt == "ugly, myemb-step00000500"
    pc = make_p("a cat")
    opts["Training Lab: embedding step"].apply(pc, "myemb", [])
    assert pc.prompt == "a cat, myemb"

    pc = make_p("a cat <hypernet:myhn-000001:0.6>")
    opts["Training Lab: hypernetwork epoch"].apply(pc, "myhn-000002", [])
    assert pc.prompt == "a cat <hypernet:myhn-000002:0.6>"

    ck = opts["Training Lab: checkpoint epoch"]
    pc = make_p()
    ck.apply(pc, "mydb-000001", [])
    assert pc.override_settings == {"sd_model_checkpoint": "mydb-000001.safetensors [abc]"}
    ck.confirm(pc, ["mydb-000001", "mydb"])
    with pytest.raises(RuntimeError, match="Unknown checkpoint"):
        ck.confirm(pc, ["mydb", "missing"])
    with pytest.raises(RuntimeError, match="no lora file"):
        opts["Training Lab: LoRA epoch"].confirm(pc, ["mylora-000009"])


def test_prompt_helpers():
    assert xyz.set_network("", "a-000001") == "<lora:a-000001:1>"
    # appended with a space: with the tag taken out (as A1111 does) the text is the prompt, no stray comma token
    tagged = xyz.set_network("a red circle, on white", "a-000003")
    assert tagged == "a red circle, on white <lora:a-000003:1>"
    assert re.sub(r"<[^>]+>", "", tagged).split() == ["a", "red", "circle,", "on", "white"]
    assert xyz.set_network("x <lyco:a-000002:0.3>", "a-000001") == "x <lora:a-000001:0.3>"
    assert xyz.set_network("x <lora:ab:0.3>", "a-000001", 0.9) == "x <lora:ab:0.3> <lora:a-000001:0.9>"
    assert xyz.set_network_weight("<lora:a:1:unet=0.2> <lora:b:1>", 0.4, "a") == "<lora:a:0.4:unet=0.2> <lora:b:1>"
    assert xyz.set_embedding("emb-000001 and emb2", "emb-000003") == "emb-000003 and emb2"


def test_empty_and_not_a_number_values_are_refused_with_a_message(webui, monkeypatch):
    """xyz_grid keeps the empty value a trailing comma leaves ("mylora-000001, mylora,"): the epoch axes' confirm
    failed on it with a bare AssertionError, and A1111's closest checkpoint match takes "" for whichever
    checkpoint comes first. A weight 'nan' drew black pictures without a word. Without a LoRA folder (A1111's
    Lora extension off) the refusal said 'in None'."""
    load_script()
    opts = axes_by_label(webui.xyz)
    p = make_p()
    for label in ("LoRA epoch", "embedding step", "hypernetwork epoch", "checkpoint epoch"):
        with pytest.raises(RuntimeError, match="an empty .* value in the list \\(a comma too many\\?\\)"):
            opts["Training Lab: " + label].confirm(p, ["mylora-000001", ""])
    weight = opts["Training Lab: LoRA weight"]
    weight.confirm(p, [0.5, -1.0, 2.0])
    with pytest.raises(RuntimeError, match="LoRA weight nan is not a number"):
        weight.confirm(p, [weight.type("0.5"), weight.type("nan")])
    monkeypatch.setattr(sys.modules["modules.shared"].cmd_opts, "lora_dir", None)
    with pytest.raises(RuntimeError, match="no lora file named mylora-000001 \\(A1111 names no folder for them"):
        opts["Training Lab: LoRA epoch"].confirm(p, ["mylora-000001"])
