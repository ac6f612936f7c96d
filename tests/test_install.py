"""install.py decisions: what is missing, the constraints that hold every host package, the pip commands.

Metadata and pip are faked: nothing is installed. (The no-op time is measured separately and reported, not
asserted here; `tools/check_install_pins.py` runs the real thing against A1111's pins.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inst():
    spec = importlib.util.spec_from_file_location("training_lab_install", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


A1111_ENV = {  # what a v1.10 WebUI venv holds (deps.md §1), normalized names
    "torch": "2.1.2+cu121", "torchvision": "0.16.2+cu121", "transformers": "4.30.2", "accelerate": "0.21.0",
    "safetensors": "0.4.2", "protobuf": "3.20.0", "numpy": "1.26.2", "pillow": "9.5.0",
    "huggingface-hub": "0.36.2", "open-clip-torch": "2.20.0", "ftfy": "6.1.1", "regex": "2023.10.3",
    "gradio": "3.41.2", "fastapi": "0.94.0",
}


def fake_versions(env):
    return lambda dist: env.get(dist.lower().replace("_", "-"))


class Pip:
    def __init__(self, rc=0):
        self.calls, self.rc = [], rc
        self.constraints = []

    def __call__(self, command):
        self.calls.append(command)
        path = command[command.index("-c") + 1]
        self.constraints.append(Path(path).read_text().splitlines())
        return self.rc


def test_nothing_missing_means_no_pip_and_no_output(inst):
    env = {**A1111_ENV, "peft": "0.13.2", "tensorboardx": "2.6.5", "tomli": "2.0.1"}
    pip, lines = Pip(), []
    rc = inst.main([], version_of=fake_versions(env), distributions=lambda: env, runner=pip, out=lines.append)
    assert rc == 0 and pip.calls == [] and lines == []


def test_a1111_env_installs_only_what_is_missing_pinned(inst, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 10, 6, "final", 0))
    pip, lines = Pip(), []
    rc = inst.main([], version_of=fake_versions(A1111_ENV), distributions=lambda: A1111_ENV, runner=pip,
                   out=lines.append)
    assert rc == 0
    assert len(pip.calls) == 1                     # open-clip-torch is present: no --no-deps call
    cmd = pip.calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert "-U" not in cmd and "--upgrade" not in cmd and "--force-reinstall" not in cmd
    assert cmd[-3:] == ["peft==0.13.2", "tensorboardX==2.6.5", "tomli==2.0.1"]
    assert len(lines) == 1 and lines[0].startswith("[Training Lab] installing peft==0.13.2")
    constraints = pip.constraints[0]
    for pinned in ("torch==2.1.2+cu121", "transformers==4.30.2", "accelerate==0.21.0", "safetensors==0.4.2",
                   "protobuf==3.20.0", "numpy==1.26.2", "pillow==9.5.0", "huggingface-hub==0.36.2",
                   "gradio==3.41.2"):
        assert pinned in constraints
    assert "huggingface_hub<1" not in constraints   # installed: held at its own version instead


def test_python_311_skips_tomli_and_missing_hub_is_capped(inst, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 11, 9, "final", 0))
    env = {k: v for k, v in A1111_ENV.items() if k != "huggingface-hub"}
    pip = Pip()
    inst.main([], version_of=fake_versions(env), distributions=lambda: env, runner=pip, out=lambda s: None)
    assert pip.calls[0][-2:] == ["peft==0.13.2", "tensorboardX==2.6.5"]
    assert "huggingface_hub<1" in pip.constraints[0]


def test_missing_vocab_package_goes_without_dependencies(inst, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 11, 0, "final", 0))
    env = {k: v for k, v in A1111_ENV.items() if k != "open-clip-torch"}
    env.update({"peft": "0.13.2", "tensorboardx": "2.6.5"})
    pip = Pip()
    inst.main([], version_of=fake_versions(env), distributions=lambda: env, runner=pip, out=lambda s: None)
    assert len(pip.calls) == 1
    assert pip.calls[0][-2:] == ["--no-deps", "open-clip-torch==2.20.0"]


def test_other_installed_version_is_left_alone_with_a_note(inst):
    env = {**A1111_ENV, "peft": "0.14.0", "tensorboardx": "2.6.2", "tomli": "2.0.1"}
    pip, lines = Pip(), []
    inst.main([], version_of=fake_versions(env), distributions=lambda: env, runner=pip, out=lines.append)
    assert pip.calls == []
    assert lines == ["[Training Lab] note: peft 0.14.0 is installed (tested with 0.13.2); left as it is"]


def test_pip_failure_is_reported_and_returns_nonzero(inst, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 11, 0, "final", 0))
    pip, lines = Pip(rc=1), []
    rc = inst.main([], version_of=fake_versions(A1111_ENV), distributions=lambda: A1111_ENV, runner=pip,
                   out=lines.append)
    assert rc == 1 and "could not install" in lines[-1] and "were not changed" in lines[-1]


def test_index_url_and_dry_run(inst, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 11, 0, "final", 0))
    monkeypatch.setenv("INDEX_URL", "https://mirror.example/simple")
    pip, lines = Pip(), []
    inst.main(["--dry-run"], version_of=fake_versions(A1111_ENV), distributions=lambda: A1111_ENV, runner=pip,
              out=lines.append)
    assert pip.calls == []                        # dry run prints the command instead
    assert "--index-url https://mirror.example/simple" in lines[-1] and "peft==0.13.2" in lines[-1]


def test_constraint_lines_and_normalize(inst):
    assert inst.normalize("Open_Clip.Torch") == "open-clip-torch"
    assert inst.normalize("huggingface__hub") == "huggingface-hub"
    lines = inst.constraint_lines({"torch": "2.1.2", "numpy": "1.26.2"})
    assert lines == ["numpy==1.26.2", "torch==2.1.2", "huggingface_hub<1"]


def test_real_metadata_reader_sees_this_environment(inst):
    dists = inst.installed_distributions()
    assert dists["torch"] == inst.installed_version("torch")
    assert inst.installed_version("surely-not-installed-package-xyz") is None
