"""One declaration per sampling setting and per choice list (sample_settings.py, the optimizer, schedule and
method registries): every config, flag and widget that offers them takes them from there."""

from __future__ import annotations

import re
from pathlib import Path

from lib_sdtrain.commands.sample import SampleSettings
from lib_sdtrain.evaluate.compare import CompareSettings
from lib_sdtrain.hosts import SampleRequest
from lib_sdtrain.sample_settings import SAMPLERS, SAMPLING
from lib_sdtrain.train.estimate import OPTIMIZER_STATE_BYTES
from lib_sdtrain.train.optim import OPTIMIZERS
from lib_sdtrain.train.schedules import SCHEDULES
from lib_sdtrain.train.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[1]

# (settings class, its field) for each sampling setting, wherever it is declared
DECLARED = {
    "steps": [(CompareSettings, "steps"), (SampleSettings, "steps"), (TrainSettings, "sample_steps")],
    "cfg_scale": [(CompareSettings, "cfg_scale"), (SampleSettings, "cfg_scale"), (TrainSettings, "sample_cfg")],
    "seed": [(SampleSettings, "seed"), (TrainSettings, "sample_seed")],
    "sampler": [(CompareSettings, "sampler"), (SampleSettings, "sampler"), (TrainSettings, "sample_sampler")],
}


def test_sampling_fields_share_one_declaration():
    for what, places in DECLARED.items():
        shared = SAMPLING[what]
        for cls, name in places:
            info = {s.name: s for s in cls.settings()}[name]
            assert (info.minimum, info.maximum) == (shared.minimum, shared.maximum), (cls.__name__, name)
            if what == "sampler" and cls is TrainSettings:   # checked by the host: A1111's names work there
                assert info.choices is None and all(s in info.help for s in SAMPLERS)
            elif what == "sampler":
                assert info.choices == list(SAMPLERS), (cls.__name__, name)
    req = SampleRequest("x")
    assert (req.steps, req.cfg_scale, req.sampler) == tuple(SAMPLING[k].default for k in ("steps", "cfg_scale",
                                                                                          "sampler"))


def test_choice_lists_come_from_their_registries():
    info = {s.name: s for s in TrainSettings.settings()}
    assert info["optimizer"].choices == list(OPTIMIZERS)
    assert info["lr_scheduler"].choices == list(SCHEDULES)
    assert set(OPTIMIZER_STATE_BYTES) == set(OPTIMIZERS)


def test_the_sampler_list_is_written_out_once():
    spelled = re.compile(r"""[\[(]\s*["']euler["']\s*,\s*["']ddim["']""")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "lib_sdtrain").rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if spelled.search(line)]
    assert len(hits) == 1 and hits[0].startswith("lib_sdtrain/sample_settings.py:"), hits
