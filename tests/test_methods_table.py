"""Every registered method (methods.METHODS), through the same life: attach → 2 optimizer steps → save → detach
(bit-exact restore) → reload the file the way compare applies it (evaluate.apply.make_applier) → the applied model
gives the trained model's output → close (bit-exact restore again). A table over the registry, like peft's
TEST_CASES: a new method is covered by adding its registry line; `SETTINGS` only makes saves exact (fp32).
"""

from __future__ import annotations

import pytest
import torch

from lib_sdtrain.errors import UserError
from lib_sdtrain.evaluate.apply import make_applier
from lib_sdtrain.evaluate.runs import RunInfo, SavedFile
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.methods import KIND_SUFFIXES, METHOD_NAMES, METHODS, create_method
from lib_sdtrain.methods.base import MethodBase, TrainingMethod
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train.settings import TrainSettings

TOKEN = "zwxtable"
PROMPT = f"a photo of {TOKEN}, red square"
# per method: settings that make the saved file exact (fp32) or name the trained word; nothing else
SETTINGS = {
    "lora": {"lora": {"save_dtype": "fp32", "train_text_encoder": True, "dropout": 0.0}},
    "dreambooth": {"dreambooth": {"save_precision": "fp32", "train_text_encoder": True}},
    "finetune": {"finetune": {"save_precision": "fp32"}},
    "embedding": {"embedding": {"token": TOKEN, "init_text": "square", "vectors": 2}},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-sd1.safetensors", "sd1")


def snapshot(parts) -> dict:
    """Everything detach must give back: tensors (bit for bit), requires_grad, train/eval, the module tree."""
    out = {}
    for i, net in enumerate((parts.unet, *parts.text_encoders)):
        out[f"{i}.tensors"] = {k: v.detach().clone() for k, v in net.state_dict(keep_vars=True).items()}
        out[f"{i}.grad"] = {k: p.requires_grad for k, p in net.named_parameters()}
        out[f"{i}.modes"] = {k: m.training for k, m in net.named_modules()}
        out[f"{i}.tree"] = [(k, type(m).__name__) for k, m in net.named_modules()]
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".tensors"):
            assert a[key].keys() == b[key].keys(), key
            changed = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
            assert not changed, f"{key}: {changed[:5]}"
        else:
            assert a[key] == b[key], key


def output(parts) -> torch.Tensor:
    """The UNet's prediction for one fixed noisy latent and the prompt (what a trained file should change)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        cond = parts.encode_text([PROMPT])
        return parts.predict(x, torch.tensor([500.0]), cond, None).float()


def run_settings(name: str, model, tmp_path) -> TrainSettings:
    data = {"method": name, "model": str(model), "name": "table", "output": str(tmp_path), **SETTINGS.get(name, {})}
    return TrainSettings.from_dict(data)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_lifecycle(name, base_model, tmp_path):
    spec = METHODS[name]
    cfg = run_settings(name, base_model, tmp_path)
    method = create_method(cfg)
    assert isinstance(method, MethodBase) and isinstance(method, TrainingMethod)
    assert isinstance(method, spec.method_class()) and method.name == name
    assert method.output_kind == spec.output_kind and method.file_suffix in spec.suffixes
    assert isinstance(getattr(cfg, name), spec.settings_class())

    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "out")
    parts = host.load(str(base_model))
    for net in (parts.unet, *parts.text_encoders):
        net.eval()
    before, base_out = snapshot(parts), output(parts)

    # attach → 2 steps (the loop's calls, in its order) → save → detach
    torch.manual_seed(0)
    groups = method.attach(parts, unet_lr=1e-2, text_encoder_lr=1e-2)
    params = [p for g in groups for p in g["params"]]
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.SGD(params, lr=1e-1)
    gen = torch.Generator().manual_seed(1)
    for step in (1, 2):
        latents = torch.randn(2, 4, 8, 8, generator=gen)
        with torch.set_grad_enabled(method.trains_text_encoder()):
            cond = parts.encode_text([PROMPT, PROMPT])
        pred = parts.predict(latents, torch.tensor([300.0, 700.0]), cond, None)
        loss = torch.nn.functional.mse_loss(pred.float(), torch.randn(2, 4, 8, 8, generator=gen))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(step)
    for net in (parts.unet, *parts.text_encoders):
        net.eval()
    trained_out = output(parts)
    assert not torch.equal(trained_out, base_out), "2 steps changed nothing"
    path = method.save(tmp_path / f"table{method.file_suffix}", {"ss_output_name": "table", "ss_steps": "2"})
    assert path.is_file() and path.suffix in spec.suffixes
    method.detach()
    assert_same(before, snapshot(parts))

    # reload → apply as compare does → same output as trained → close: the model is the base again
    run = RunInfo(name="table", method=name, kind=spec.output_kind, config=cfg,
                  files=[SavedFile(path=path, name="table", step=2, final=True)])
    applier = make_applier(run, host, parts)
    applied = applier.apply(run.files[0], 1.0)
    torch.testing.assert_close(output(applied), trained_out, rtol=1e-4, atol=1e-5)
    try:   # strength 0: the base model's output (A1111's <lora:name:0>), or a clear refusal
        torch.testing.assert_close(output(applier.apply(run.files[0], 0.0)), base_out, rtol=1e-4, atol=1e-5)
    except UserError as e:
        assert "weight 1" in str(e) or "strength" in str(e)
    torch.testing.assert_close(output(applier.apply(run.files[0], 1.0)), trained_out, rtol=1e-4, atol=1e-5)
    applier.close()
    assert_same(before, snapshot(parts))
    # the weights are bit-identical; the output only up to float rounding, because a full-model method's restored
    # tensors may sit at other memory addresses (another SIMD alignment → other summation order in the kernels)
    torch.testing.assert_close(output(parts), base_out, rtol=1e-5, atol=1e-6)


def test_the_registry_is_the_one_list_of_methods():
    import re
    from pathlib import Path

    info = {s.name: s for s in TrainSettings.settings()}
    assert info["method"].choices == list(METHOD_NAMES) == list(METHODS)
    assert list(TrainSettings.sections()) == list(METHODS)
    for name, spec in METHODS.items():
        assert TrainSettings.sections()[name] is spec.settings_class()
        assert issubclass(spec.method_class(), MethodBase)
        assert spec.applied_as in ("adapter", "checkpoint")
        assert set(spec.suffixes) <= set(KIND_SUFFIXES[spec.output_kind])
    # no optional hook is reached by probing: every method has them all (MethodBase)
    src = Path(__file__).resolve().parents[1] / "lib_sdtrain"
    probing = [f"{p}:{i}" for p in src.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
               if re.search(r"(hasattr|getattr)\((self\.)?method\b", line)]
    assert not probing, probing


def test_a_new_method_is_one_module_and_one_registry_line():
    # In a fresh interpreter: a module (planted in sys.modules, as a new file would be) and one MethodSpec line;
    # nothing else changes, and the run settings, the CLI flags, the estimate and run discovery know the method.
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent('''
        import argparse, sys, types
        from dataclasses import dataclass
        import lib_sdtrain.methods as M
        from lib_sdtrain.config import ConfigBase, add_arguments, setting
        from lib_sdtrain.methods.base import MethodBase

        @dataclass
        class PlantedSettings(ConfigBase):
            KIND = "planted"
            planted_strength: float = setting(0.5, "how strong", minimum=0.0, maximum=1.0, group="planted")

        class PlantedMethod(MethodBase):
            name, output_kind = "planted", "lora"
            def __init__(self, settings=None):
                self.settings = settings or PlantedSettings()
            def trains_text_encoder(self):
                return False
            @classmethod
            def estimate_parameters(cls, settings, family, model_m):
                return 1e6 * settings.planted_strength

        module = types.ModuleType("lib_sdtrain.methods.planted")
        module.PlantedSettings, module.PlantedMethod = PlantedSettings, PlantedMethod
        sys.modules[module.__name__] = module                                     # "the new file"
        M.METHODS["planted"] = M.MethodSpec("planted", "planted", "PlantedMethod", "PlantedSettings", "lora",
                                            (".safetensors",), "adapter", "a planted method")   # "the line"

        from lib_sdtrain.evaluate.runs import _method_kind
        from lib_sdtrain.methods import create_method
        from lib_sdtrain.train.estimate import trained_parameters
        from lib_sdtrain.train.settings import TrainSettings

        cfg = TrainSettings.from_dict({"method": "planted", "planted": {"planted_strength": 0.25}})
        parser = argparse.ArgumentParser()
        add_arguments(parser, TrainSettings)
        assert isinstance(create_method(cfg), PlantedMethod)
        assert "--planted-strength" in parser.format_help()
        assert trained_parameters(cfg, "sd1") == 250000.0
        assert _method_kind("planted") == ("lora", (".safetensors",))
        print("ok")
    ''')
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stdout + out.stderr
