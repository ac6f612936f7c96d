"""Quality measurement on a toy concept (lib_sdtrain/toy/quality.py, bench/quality.py), on a tiny SD1 model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lib_sdtrain.errors import UserError
from lib_sdtrain.toy import world
from lib_sdtrain.toy.quality import QualitySettings, prompt_sets, run_quality, train_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny-sd1.safetensors", "sd1")


def test_prompt_sets_pair_token_and_class_prompts():
    s = prompt_sets("subject", 6, 5, seed=3)
    assert len(s.token_prompts) == len(s.class_prompts) == len(s.concept_seeds) == 6
    for tok, cls in zip(s.token_prompts, s.class_prompts):
        assert world.SUBJECT_TOKEN in tok.split() and world.SUBJECT_TOKEN not in cls.split()
        assert tok.replace(f"{world.SUBJECT_TOKEN} ", "") == cls       # the same scene, only the token differs
    assert len(set(s.world_seeds) | set(s.concept_seeds)) == 11         # no seed reused across sets
    assert all(not sc.is_subject for sc in s.world_scenes)
    st = prompt_sets("style", 4, 2, seed=3)
    assert all(p.endswith(f"in {world.STYLE_TOKEN} style") for p in st.token_prompts)
    assert all(world.STYLE_TOKEN not in p for p in st.class_prompts)
    assert prompt_sets("subject", 6, 5, seed=3) == s                  # deterministic


def test_settings_are_checked(tmp_path):
    with pytest.raises(UserError, match="unknown method"):
        QualitySettings(method="nope").validate()
    with pytest.raises(UserError, match="concept"):
        QualitySettings(concept="colour").validate()
    with pytest.raises(UserError, match="positive"):
        QualitySettings(concept_samples=0).validate()
    with pytest.raises(UserError, match="no field"):
        train_settings(QualitySettings(overrides={"nonsense": 1}), tmp_path, None, tmp_path / "m", tmp_path)
    cfg = train_settings(QualitySettings(steps=7, overrides={"lora.network_dim": 4}), tmp_path / "img", None,
                         tmp_path / "m.safetensors", tmp_path / "out")
    assert (cfg.max_steps, cfg.lora.network_dim, cfg.resolution, cfg.method) == (7, 4, 64, "lora")


def test_run_quality_trains_lora_and_reports(tmp_path, tiny):
    settings = QualitySettings(method="lora", model=str(tiny), steps=3, images=4, repeats=2, concept_samples=3,
                               world_samples=3, sample_steps=2, device="cpu")
    grid = tmp_path / "grid.png"
    row = run_quality(settings, tmp_path / "work", grid=grid)
    assert row["method"] == "lora" and row["steps"] == 3
    for key in ("fidelity", "fidelity_before"):
        assert 0.0 <= row[key] <= 1.0
    assert -1.0 <= row["bleeding"] <= 1.0
    assert row["bleeding"] == pytest.approx(row["class_concept_share"]["after"] - row["class_concept_share"]["before"],
                                            abs=1e-3)
    wa = row["world_accuracy"]
    if wa["before"]:
        assert row["retention"] == pytest.approx(wa["after"] / wa["before"], rel=1e-3)
    assert Path(row["trained_file"]).is_file()
    from PIL import Image

    with Image.open(grid) as im:                 # 4 rows (base/trained × token/class) of 3 samples, labelled
        assert im.height >= 4 * 64 and im.width >= 3 * 64
    json.dumps(row)                              # the bench writes it as JSON
    with pytest.raises(UserError, match="not empty"):
        run_quality(settings, tmp_path / "work")


def test_bench_skips_unregistered_methods(tmp_path, tiny, capsys):
    sys.path.insert(0, str(ROOT))
    try:
        import bench.quality as bq
    finally:
        sys.path.remove(str(ROOT))
    out = tmp_path / "q.json"
    assert bq.main(["--methods", "no-such-method", "--model", str(tiny), "--out", str(out),
                    "--grids", str(tmp_path / "grids")]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == [] and "no-such-method: skipped" in data["notes"][0]
