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


# ---- sampler names: ours and A1111's ---------------------------------------------------------------------------
def test_a1111_display_names_are_accepted_and_stored_as_ours():
    """A1111 shows our samplers as "Euler" and "DDIM": settings take those in any case and keep our names, so
    saved configs and grids stay as before."""
    from lib_sdtrain.sample_settings import A1111_NAMES, canonical_sampler, check_sampler

    assert set(A1111_NAMES) == set(SAMPLERS)
    for given, ours in (("Euler", "euler"), ("EULER", "euler"), (" euler ", "euler"), ("DDIM", "ddim"),
                        ("Ddim", "ddim"), ("ddim", "ddim")):
        assert canonical_sampler(given) == check_sampler(given) == ours
        for cls, name in DECLARED["sampler"]:
            cfg = cls.from_dict({name: given})
            assert getattr(cfg, name) == ours and cfg.to_dict()[name] == ours, (cls.__name__, given)
    # built directly and validated (replace() validates): the stored value is ours as well
    assert CompareSettings().replace(sampler="DDIM").sampler == "ddim"


def test_unsupported_sampler_names_are_refused_with_the_accepted_ones():
    import pytest

    from lib_sdtrain.errors import UserError
    from lib_sdtrain.sample_settings import check_sampler

    for name in ("DPM++ 2M Karras", "Euler a", "k_euler_a", "", "eulerx"):
        for cls in (CompareSettings, SampleSettings):
            with pytest.raises(UserError) as err:
                cls.from_dict({"sampler": name})
            text = str(err.value)
            assert text.startswith("sampler: unknown sampler") and repr(name) in text
            assert "euler or ddim" in text and "Euler" in text and "DDIM" in text, text
        with pytest.raises(UserError, match="euler or ddim .*A1111's Euler and DDIM"):
            check_sampler(name)


def test_control_pictures_take_any_webui_sampler_and_store_ours_for_our_samplers():
    """TrainSettings.sample_sampler is checked by the host when it draws (inside the WebUI any of its samplers):
    our samplers given by A1111's names are stored as ours; other names are kept as given."""
    assert TrainSettings.from_dict({"sample_sampler": "DDIM"}).sample_sampler == "ddim"
    assert TrainSettings.from_dict({"sample_sampler": "Euler"}).sample_sampler == "euler"
    assert TrainSettings.from_dict({"sample_sampler": "Euler a"}).sample_sampler == "Euler a"
    assert TrainSettings.from_dict({"sample_sampler": "DPM++ 2M Karras"}).sample_sampler == "DPM++ 2M Karras"


def test_class_picture_names_and_the_cli_follow_our_names():
    import argparse

    import pytest

    from lib_sdtrain.classgen import class_image_name
    from lib_sdtrain.commands import compare as compare_cmd

    assert class_image_name("a dog", 3, sampler="DDIM") == class_image_name("a dog", 3, sampler="ddim")
    assert class_image_name("a dog", 3, sampler="Euler a") != class_image_name("a dog", 3, sampler="euler")
    parser = argparse.ArgumentParser()
    compare_cmd.add_arguments(parser)
    assert compare_cmd.settings_from_args(parser.parse_args(["run", "--sampler", "DDIM"])).sampler == "ddim"
    from lib_sdtrain.errors import UserError

    with pytest.raises(UserError, match="euler or ddim"):
        compare_cmd.settings_from_args(parser.parse_args(["run", "--sampler", "Euler a"]))


def test_the_standalone_sampler_draws_a1111_names_as_ours(tmp_path):
    """sampling.render with "DDIM" draws what "ddim" draws (not Euler: it compared the raw name before)."""
    import numpy as np
    import pytest

    from lib_sdtrain.errors import UserError
    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.sampling import render
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    parts = StandaloneHost(device="cpu", dtype="fp32").load(make_tiny_checkpoint(tmp_path / "t.safetensors", "sd1"))
    pics = {name: render(parts, [SampleRequest("a toy", seed=1, steps=3, width=64, height=64, sampler=name)])[0]
            for name in ("ddim", "DDIM", "euler")}
    assert np.array_equal(np.asarray(pics["DDIM"]), np.asarray(pics["ddim"]))
    assert not np.array_equal(np.asarray(pics["ddim"]), np.asarray(pics["euler"]))
    with pytest.raises(UserError, match="'Euler a'; the samplers accepted here are euler or ddim"):
        render(parts, [SampleRequest("a toy", steps=1, width=64, height=64, sampler="Euler a")])
