"""Quality measurement on a toy concept (lib_sdtrain/toy/quality.py, stats.py, reference.py, bench/quality.py),
on a tiny SD1 model with a few steps: the machinery, the intervals and the bench's verdicts, not the
learning itself (bench/quality.py measures that)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lib_sdtrain.errors import UserError
from lib_sdtrain.toy import stats, world
from lib_sdtrain.toy.quality import (QualitySettings, figures, prompt_sets, rescore, run_quality, run_quality_full,
                                     train_settings)
from lib_sdtrain.toy.quality import Measure

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny-sd1.safetensors", "sd1")


def _bench():
    sys.path.insert(0, str(ROOT))
    try:
        import bench.quality as bq
    finally:
        sys.path.remove(str(ROOT))
    return bq


# ---- intervals -----------------------------------------------------------------------------------------
def test_wilson_matches_textbook_values():
    # Newcombe (1998a) example: 81/263 -> 0.2553 to 0.3662; 0/10 -> 0 to 0.2775; 10/10 -> 0.7225 to 1
    i = stats.wilson(81, 263)
    assert (round(i.lo, 4), round(i.hi, 4)) == (0.2553, 0.3662)
    assert (stats.wilson(0, 10).lo, round(stats.wilson(0, 10).hi, 4)) == (0.0, 0.2775)
    assert (round(stats.wilson(10, 10).lo, 4), stats.wilson(10, 10).hi) == (0.7225, 1.0)
    # 96 samples at 25 %: about +-9 points, not the +-17 of 24 samples
    assert stats.wilson(24, 96).hi - stats.wilson(24, 96).lo < 0.19 < stats.wilson(6, 24).hi - stats.wilson(6, 24).lo
    with pytest.raises(UserError):
        stats.wilson(3, 2)


def test_mean_t_of_replicates():
    # 4 replicates 1, 2, 3, 4: mean 2.5, sd 1.291, t(3) = 3.182 -> 2.5 +- 2.054
    i = stats.mean_t([1, 2, 3, 4])
    assert i.value == 2.5 and (round(i.lo, 3), round(i.hi, 3)) == (0.446, 4.554) and i.n == 4
    # more replicates with the same spread give a narrower interval (t falls, sqrt(n) grows)
    assert stats.mean_t([1, 2, 3, 4] * 3).hi - stats.mean_t([1, 2, 3, 4] * 3).lo < i.hi - i.lo
    assert stats.mean_t([0.4, 0.4]).lo == stats.mean_t([0.4, 0.4]).hi == pytest.approx(0.4)
    with pytest.raises(UserError):
        stats.mean_t([0.5])


def test_paired_difference_newcombe():
    # the paired 2x2 table (14, 5 / 0, 22): the same numbers as an independent implementation of method 10
    a = [1] * 19 + [0] * 22
    b = [1] * 14 + [0] * 5 + [0] * 22
    d = stats.paired_difference(a, b)
    assert round(d.value, 4) == 0.122 and (round(d.lo, 4), round(d.hi, 4)) == (0.0115, 0.2265)
    same = stats.paired_difference([True, False] * 48, [True, False] * 48)
    assert same.value == 0 and same.lo < 0 < same.hi and not same.excludes_zero()
    sep = stats.paired_difference([True] * 96, [False] * 96)
    assert sep.value == 1 and sep.lo > 0.9 and sep.excludes_zero()
    neg = stats.paired_difference([False] * 96, [True] * 96)
    assert neg.hi < -0.9
    with pytest.raises(UserError):
        stats.paired_difference([True], [True, False])


def test_bootstrap_ratio():
    after = [1.0] * 80 + [0.5] * 10 + [0.0] * 6
    before = [1.0] * 90 + [0.5] * 6
    r = stats.bootstrap_ratio(after, before, paired=True)
    assert r.value == pytest.approx((85 / 96) / (93 / 96), abs=1e-4) and r.lo < r.value < r.hi < 1.0
    assert stats.bootstrap_ratio(after, before, paired=True) == r          # fixed seed: reproducible
    assert stats.bootstrap_ratio(before, before, paired=True).lo == 1.0    # paired identical lists: exactly 1
    with pytest.raises(UserError):
        stats.bootstrap_ratio([1.0], [0.0], paired=True)


def test_figures_from_measures():
    before = Measure([False] * 96, [False] * 96, [1.0] * 96)
    learned = Measure([True] * 80 + [False] * 16, [False] * 94 + [True] * 2, [1.0] * 90 + [0.0] * 6)
    f = figures(before, learned, [True] * 90 + [False] * 6)
    assert f["fidelity"]["value"] == pytest.approx(80 / 96, abs=1e-4) and f["fidelity"]["n"] == 96
    assert f["binding"]["value"] == pytest.approx(78 / 96, abs=1e-4) and f["binding"]["lo"] > 0.6
    assert f["bleeding"]["value"] == pytest.approx(2 / 96, abs=1e-4) and f["bleeding"]["lo"] < 0 < f["bleeding"]["hi"]
    assert f["effect"]["lo"] > 0.7
    assert f["retention"]["value"] == pytest.approx(90 / 96, abs=1e-4)
    assert f["fidelity_of_ceiling"]["value"] == pytest.approx((80 / 96) / (90 / 96), abs=1e-3)
    assert "fidelity_strict" not in f                     # no strict reading given: none reported
    learned.token_strict = [True] * 30 + [False] * 66
    assert figures(before, learned, None)["fidelity_strict"]["value"] == pytest.approx(30 / 96, abs=1e-4)
    # nothing learned: the effect's interval holds zero
    assert figures(before, before, None)["effect"]["lo"] <= 0 <= figures(before, before, None)["effect"]["hi"]


# ---- prompts and settings --------------------------------------------------------------------------------
def test_prompt_sets_pair_token_and_class_prompts():
    s = prompt_sets("subject", 12, 5, seed=3, seeds_per_prompt=2)
    assert len(s.token_prompts) == len(s.class_prompts) == len(s.concept_seeds) == len(s.scenes) == 12
    assert s.token_prompts[0] == s.token_prompts[1] and s.concept_seeds[0] != s.concept_seeds[1]   # 6 x 2 seeds
    for tok, cls in zip(s.token_prompts, s.class_prompts):
        assert world.SUBJECT_TOKEN not in cls.replace(",", " ").split()
        assert tok == f"{world.SUBJECT_TOKEN}, {cls}"           # the same scene, only the token in front differs
    assert len(set(s.world_seeds) | set(s.concept_seeds)) == 17         # no seed reused across sets
    assert all(not sc.is_subject for sc in s.world_scenes) and all(sc.is_subject for sc in s.scenes)
    st = prompt_sets("style", 4, 2, seed=3)
    assert all(p.startswith(f"{world.STYLE_TOKEN} style, a ") for p in st.token_prompts)
    assert [f"{world.STYLE_TOKEN} style, " + p for p in st.class_prompts] == st.token_prompts
    assert prompt_sets("subject", 12, 5, seed=3, seeds_per_prompt=2) == s      # deterministic
    with pytest.raises(UserError):
        prompt_sets("subject", 5, 5, seed=3, seeds_per_prompt=2)


def test_settings_are_checked(tmp_path):
    with pytest.raises(UserError, match="unknown method"):
        QualitySettings(method="nope").validate()
    with pytest.raises(UserError, match="concept"):
        QualitySettings(concept="colour").validate()
    with pytest.raises(UserError, match="positive"):
        QualitySettings(concept_samples=0).validate()
    with pytest.raises(UserError, match="multiple"):
        QualitySettings(concept_samples=95, seeds_per_prompt=2).validate()
    with pytest.raises(UserError, match="reference"):
        QualitySettings(method="embedding", loop="reference").validate()
    with pytest.raises(UserError, match="no field"):
        train_settings(QualitySettings(overrides={"nonsense": 1}), tmp_path, None, tmp_path / "m", tmp_path)
    cfg = train_settings(QualitySettings(steps=30, curve=3, overrides={"lora.network_dim": 4}), tmp_path / "img",
                         None, tmp_path / "m.safetensors", tmp_path / "out")
    assert (cfg.max_steps, cfg.lora.network_dim, cfg.resolution, cfg.method, cfg.save_every_n_steps) == \
        (30, 4, 64, "lora", 10)
    asked = QualitySettings(steps=30, learning_rate=1e-3, overrides={"batch_size": 2, "learning_rate": 5e-4})
    cfg = train_settings(asked, tmp_path / "img", None, tmp_path / "m.safetensors", tmp_path / "out")
    values = asked.train_values()                  # what a bench row records: the overrides win, as in training
    assert (values["max_steps"], values["learning_rate"], values["batch_size"]) == \
        (cfg.max_steps, cfg.learning_rate, cfg.batch_size) == (30, 5e-4, 2)
    for bad in (0, 96, 100, True, "128"):
        with pytest.raises(UserError, match="multiple of 64"):
            QualitySettings(size=bad).validate()
    cfg = train_settings(QualitySettings(size=128), tmp_path / "img", None, tmp_path / "m.safetensors", tmp_path / "o")
    assert (cfg.resolution, cfg.min_bucket, cfg.max_bucket) == (128, 128, 128)
    for bad in (0, -1, 31, float("nan"), float("inf"), True, "7"):
        with pytest.raises(UserError, match="cfg_scale"):
            QualitySettings(cfg_scale=bad).validate()
    QualitySettings(cfg_scale=3).validate()
    for bad in (-1, 2, True):
        with pytest.raises(UserError, match="background_weight"):
            QualitySettings(background_weight=bad).validate()
    with pytest.raises(UserError, match="reference loop"):
        QualitySettings(background_weight=0.2, loop="reference").validate()
    weighted = QualitySettings(background_weight=0.2)
    weighted.validate()
    assert train_settings(weighted, tmp_path / "img", None, tmp_path / "m.safetensors", tmp_path / "w").masked_loss
    assert not train_settings(QualitySettings(), tmp_path / "img", None, tmp_path / "m.safetensors",
                              tmp_path / "p").masked_loss


def test_size_128_trains_samples_and_scores_64_px_copies(tmp_path, tiny):
    """A run at 128 px: the pictures it trains on are 128 px, the detector reads 64-px copies of the samples and of
    the round trips (what is kept), and the round trip of a 128-px picture is what the VAE makes of it at 128."""
    import numpy as np
    from PIL import Image

    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.toy.detector import at_input_size
    from lib_sdtrain.toy.quality import make_dataset, roundtrip_ceiling

    settings = QualitySettings(method="lora", concept="style", model=str(tiny), steps=2, images=2, repeats=1,
                               concept_samples=2, world_samples=2, sample_steps=2, curve=1, device="cpu", size=128,
                               keep_samples=str(tmp_path / "keep"))
    data, reg = make_dataset(tmp_path / "data", settings)
    pictures = sorted(p for p in Path(data).rglob("*.png"))
    assert pictures and all(Image.open(p).size == (128, 128) for p in pictures)
    assert reg is not None and all(Image.open(p).size == (128, 128) for p in Path(reg).rglob("*.png"))
    big = Image.fromarray(np.tile(np.array([[0, 255]], dtype=np.uint8).repeat(64, 1)[:, :, None], (128, 1, 3)))
    small = at_input_size([big])[0]
    assert small.size == (64, 64) and abs(np.asarray(small).astype(int)[0, 0, 0] - 0) <= 1
    scenes = world.sample_scenes(2, 5, style="striped")
    parts = StandaloneHost(device="cpu", dtype="fp32").load(tiny)
    _, hits, rts = roundtrip_ceiling(parts, scenes, "style", seed=3, size=128)
    assert len(hits) == 2 and all(im.size == (64, 64) for im in rts)
    row, _ = run_quality_full(settings, tmp_path / "work")
    assert row["settings"]["size"] == 128 and [p["step"] for p in row["curve"]] == [0, 2]
    with np.load(row["sample_files"]["2"]) as z:
        assert z["token"].shape == (2, 64, 64, 3)


def test_lora_subject_defaults_are_the_measured_ones(tmp_path):
    """The LoRA subject row (bench `lora` and `reference`) trains on 96 heart pictures for 900 steps of
    batch 8 at 6e-3 (cosine decay, min-SNR 5) with mixed class-picture captions (bench/README.md tuning table); the
    style LoRA trains 96 pictures for 1800 steps with a cosine decay at 4e-3, min-SNR 5, UNet only; other methods keep
    their own defaults."""
    from lib_sdtrain.toy.quality import make_dataset

    s = QualitySettings(method="lora", concept="subject")
    assert s.dataset() == (96, 2) and s.class_set() == "world"
    cfg = train_settings(s, tmp_path / "img", None, tmp_path / "m.safetensors", tmp_path / "out")
    assert (cfg.max_steps, cfg.batch_size, cfg.learning_rate, cfg.lora.network_dim, cfg.lora.train_text_encoder) == \
        (900, 8, 6e-3, 8, False)
    assert (cfg.lr_scheduler, cfg.min_snr_gamma) == ("cosine", 5.0)
    assert not hasattr(cfg, "images")
    data, reg = make_dataset(tmp_path / "data", s)
    assert len(list(data.rglob("*.png"))) == 96 and len(list(reg.rglob("*.png"))) == 192
    # class pictures: half with the class word ("a red shape ..."), half with their own shape words (mixed)
    texts = [p.read_text(encoding="utf-8").strip() for p in reg.rglob("*.txt")]
    assert sum(" shape " in t for t in texts) == 96 and not hasattr(cfg, "class_captions")
    assert QualitySettings(method="lora", concept="subject", images=12, repeats=10).dataset() == (12, 10)
    assert QualitySettings(method="lora", concept="subject", loop="reference").dataset() == (96, 2)
    assert QualitySettings(method="lora", concept="style").dataset() == (96, 2)
    assert QualitySettings(method="embedding", concept="style").dataset() == (24, 5)
    # the other subject methods: the same 96 pictures x 2 (Dreambooth 600 steps: it binds; the embedding 300 steps
    # with 4 vectors; hypernetwork, fine-tune 300 steps: more of the base world kept than at 600);
    # Dreambooth's 192 class pictures, and the no-class row trains the same concept pictures without them
    for method, steps in (("embedding", 300), ("dreambooth", 600), ("hypernetwork", 300), ("finetune", 300)):
        sm = QualitySettings(method=method, concept="subject")
        assert sm.dataset() == (96, 2) and sm.defaults()["max_steps"] == steps
    assert QualitySettings(method="finetune", concept="subject").class_set() == "none"
    assert QualitySettings(method="dreambooth", concept="subject").class_set() == "world"
    noclass = QualitySettings(**{**_bench().ROWS["dreambooth-noclass"]})
    assert noclass.dataset() == (96, 2) and noclass.class_set() == "none"
    db = QualitySettings(method="dreambooth", concept="subject")
    data, reg = make_dataset(tmp_path / "db-subject", db)
    assert len(list(data.rglob("*.png"))) == 96 and len(list(reg.rglob("*.png"))) == 192
    db_cfg = train_settings(db, tmp_path / "img", None, tmp_path / "m.safetensors", tmp_path / "out3")
    assert (db_cfg.max_steps, db_cfg.learning_rate) == (600, 2e-4)
    emb_cfg = train_settings(QualitySettings(method="embedding", concept="subject"), tmp_path / "img", None,
                             tmp_path / "m.safetensors", tmp_path / "out4")
    assert (emb_cfg.max_steps, emb_cfg.embedding.vectors, emb_cfg.embedding.token) == (300, 4, "zwx")
    emb_style = train_settings(QualitySettings(method="embedding", concept="style"), tmp_path / "img", None,
                               tmp_path / "m.safetensors", tmp_path / "out5")
    assert emb_style.embedding.vectors == 1      # the style's embedding was not measured with more vectors
    assert QualitySettings(method="dreambooth", concept="style").dataset() == (24, 5)   # the style keeps its own
    style = train_settings(QualitySettings(method="lora", concept="style"), tmp_path / "img", None,
                           tmp_path / "m.safetensors", tmp_path / "out2")
    assert (style.max_steps, style.learning_rate, style.lora.train_text_encoder, style.lr_scheduler) == \
        (1800, 4e-3, False, "cosine")
    assert (style.min_snr_gamma, style.prior_loss_weight) == (5.0, 1.0)
    assert (cfg.learning_rate, style.batch_size) == (6e-3, 4)   # the style keeps its own rate and batch
    assert cfg.lora.train_text_encoder is False          # the subject stays UNet-only
    # the bench's rows build their settings from these defaults (no images/steps given)
    bq = _bench()
    for row in ("lora", "reference"):
        assert QualitySettings(**bq.ROWS[row]).dataset() == (96, 2)
    # caption form and class-picture count, the other tuning levers (bench: --set captions=token)
    small = QualitySettings(images=4, repeats=1, class_images=5, captions="token")
    small.validate()
    data, reg = make_dataset(tmp_path / "small", small)
    texts = {p.read_text(encoding="utf-8").strip() for p in data.rglob("*.txt")}
    assert texts == {f"{world.SUBJECT_TOKEN} shape"} and len(list(reg.rglob("*.png"))) == 5
    with pytest.raises(UserError, match="captions"):
        QualitySettings(captions="long").validate()
    with pytest.raises(UserError, match="class_images"):
        QualitySettings(class_images=-1).validate()
    # class-picture captions: the method's default for the concept (Dreambooth subject: the class word), or as asked
    _, reg = make_dataset(tmp_path / "db", QualitySettings(method="dreambooth", images=4, repeats=1, class_images=6))
    assert all(" shape " in p.read_text(encoding="utf-8") for p in reg.rglob("*.txt"))
    mixed = QualitySettings(images=4, repeats=1, class_images=6, class_captions="mixed")
    mixed.validate()
    _, reg = make_dataset(tmp_path / "mixed", mixed)
    texts = [p.read_text(encoding="utf-8").strip() for p in sorted(reg.rglob("*.txt"))]
    assert sum(" shape " in t for t in texts) == 3 and len(texts) == 6
    with pytest.raises(UserError, match="class_captions"):
        QualitySettings(class_captions="poetic").validate()
    # paired class pictures: each style picture's own scene and jitter, plain (only the bands differ)
    import numpy as np
    from PIL import Image

    paired = QualitySettings(concept="style", images=4, repeats=1, class_images=9, class_paired=True, seed=3)
    data, reg = make_dataset(tmp_path / "paired", paired)
    inst, plain = sorted(data.rglob("*.png")), sorted(reg.rglob("*.png"))
    assert len(inst) == len(plain) == 4                  # the count follows the concept set, not class_images
    for a, b in zip(inst, plain):
        assert a.with_suffix(".txt").read_text(encoding="utf-8").strip() == \
            world.STYLE_TOKEN + " style, " + b.with_suffix(".txt").read_text(encoding="utf-8").strip()
        x, y = (np.asarray(Image.open(p), dtype=int) for p in (a, b))
        changed = np.abs(x - y).sum(-1) > 0
        assert 0.01 < changed.mean() < 0.4              # the bands, inside the shape; the rest is identical
    with pytest.raises(UserError, match="train_threads"):
        QualitySettings(train_threads=-1).validate()


# ---- runs on the tiny model --------------------------------------------------------------------------------
def test_run_quality_curve_grid_and_reference(tmp_path, tiny):
    settings = QualitySettings(method="lora", model=str(tiny), steps=4, images=4, repeats=2, concept_samples=4,
                               seeds_per_prompt=2, world_samples=3, sample_steps=2, curve=2, device="cpu",
                               keep_samples=str(tmp_path / "keep"))
    grid = tmp_path / "grid.png"
    row, base = run_quality_full(settings, tmp_path / "work", grid=grid)
    assert row["method"] == "lora" and row["steps"] == 4 and row["loop"] == "ours"
    assert [p["step"] for p in row["curve"]] == [0, 2, 4]                # base + two saves
    for key in ("fidelity", "binding", "bleeding", "effect", "class_share"):
        d = row[key]
        assert d["lo"] <= d["value"] <= d["hi"] and d["n"] == 4, key
    assert row["samples"] == {"concept": 4, "prompts": 2, "seeds_per_prompt": 2, "world": 3}
    # the row's record of the training values is what trained, also where --steps / --lr replaced the defaults
    assert row["settings"]["train"]["max_steps"] == 4 == row["settings"]["max_steps"]
    # the subject also as the strict reader reads it (shipped detector), at every save
    assert row["fidelity_strict"]["n"] == 4 and all("fidelity_strict" in p for p in row["curve"][1:])
    assert row["ceiling"]["n"] == 4 and 0 <= row["ceiling"]["value"] <= 1
    assert row["best_step"] in (2, 4)
    assert Path(row["trained_file"]).is_file()
    from PIL import Image

    with Image.open(grid) as im:     # 6 rows (round trip, base, 2 saves, base class, final class) of 96 px cells
        assert im.height >= 6 * 96 and im.width >= 4 * 96
    json.dumps(row)                  # the bench writes it as JSON
    # the kept pictures, scored again with the same detector, give the same figures without sampling
    again = rescore(row)
    assert again["curve"] == row["curve"] and again["ceiling"] == row["ceiling"] and "rescored" in again
    with pytest.raises(UserError, match="kept no pictures"):
        rescore({k: v for k, v in row.items() if k != "sample_files"})
    with pytest.raises(UserError, match="not empty"):
        run_quality(settings, tmp_path / "work")

    # the reference loop on the same task reuses the base measurement (same prompts, seeds and model)
    ref = QualitySettings(**{**settings.__dict__, "loop": "reference"})
    row2, base2 = run_quality_full(ref, tmp_path / "ref", base=base)
    assert base2 is base and row2["loop"] == "reference" and row2["label"] == "lora / reference loop / class pictures"
    assert [p["step"] for p in row2["curve"]] == [0, 2, 4] and row2["curve"][0] == row["curve"][0]


def test_reference_loop_trains_and_restores(tmp_path, tiny):
    import torch

    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.toy.quality import make_dataset
    from lib_sdtrain.toy.reference import train_reference_lora

    s = QualitySettings(model=str(tiny), steps=3, images=3, repeats=1, curve=1, class_pictures="world")
    data, reg = make_dataset(tmp_path / "d", s)
    cfg = train_settings(s, data, reg, tiny, tmp_path / "o")
    cfg.lr_scheduler, cfg.min_snr_gamma = "constant", 0.0        # plain first; both are checked below
    parts = StandaloneHost(device="cpu", dtype="fp32").load(tiny)
    before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    run = train_reference_lora(cfg, parts, save_steps=[3])
    assert run.steps == 3 and len(run.losses) == 3 and run.save_steps == [3]
    assert any(v.abs().sum() > 0 for k, v in run.snapshots[3].items() if "lora_B" in k)   # B moved off zero
    original = parts.unet
    run.apply(3)
    assert parts.unet is not original
    run.remove()
    assert parts.unet is original and all(torch.equal(before[k], v) for k, v in parts.unet.state_dict().items())
    assert run.lrs == [cfg.learning_rate] * 3                                      # constant
    cfg.lr_scheduler = "cosine"          # diffusers' get_scheduler: one half-wave from the rate to 0
    run = train_reference_lora(cfg, parts, save_steps=[3])
    lr = cfg.learning_rate
    assert run.lrs == pytest.approx([lr, lr * 0.75, lr * 0.25])
    # min-SNR as diffusers' example weighs epsilon: min(SNR, gamma) / SNR <= 1; a tiny gamma weighs every
    # picture below 1, so the first step's loss (same seed, same weights) is smaller
    plain = run.losses[0]
    cfg.min_snr_gamma = 1e-3
    run = train_reference_lora(cfg, parts, save_steps=[3])
    assert 0 < run.losses[0] < plain
    cfg.lr_scheduler = "cosine_with_restarts"
    with pytest.raises(UserError, match="cosine"):
        train_reference_lora(cfg, parts, save_steps=[3])


# ---- the bench -----------------------------------------------------------------------------------------------
def test_bench_targets_judge_intervals():
    bq = _bench()

    def iv(v, lo, hi):
        return {"value": v, "lo": lo, "hi": hi, "n": 96}

    good = {"fidelity": iv(0.9, 0.82, 0.95), "fidelity_of_ceiling": iv(0.95, 0.88, 0.99), "ceiling": iv(0.9, 0.8, 0.95),
            "binding": iv(0.7, 0.6, 0.8), "bleeding": iv(0.0, -0.04, 0.04), "retention": iv(0.98, 0.96, 1.0),
            "seconds": {"train": 120}, "settings": {"max_steps": 300}, "effect": iv(0.7, 0.6, 0.8),
            "fidelity_before": iv(0, 0, 0.04), "class_share": iv(0.05, 0.02, 0.1)}
    checks = {c["target"]: c["met"] for c in bq.targets({"lora": good, "reference": good, "embedding": good})}
    assert all(checks.values()) and len(checks) == 8
    weak = {**good, "binding": iv(0.1, -0.02, 0.22), "effect": iv(0.02, -0.03, 0.08)}
    db_a = {**good, "bleeding": iv(0.02, -0.01, 0.06)}
    db_b = {**good, "bleeding": iv(0.04, 0.0, 0.1)}                # overlapping: not separated
    checks = {c["target"]: c["met"] for c in bq.targets({"lora": weak, "embedding": weak, "dreambooth": db_a,
                                                         "dreambooth-noclass": db_b})}
    assert checks["LoRA subject: binding >= 0.6"] is False
    assert checks["embedding: learning effect interval excludes zero"] is False
    assert checks["Dreambooth: class pictures lower bleeding than without, intervals separated"] is False
    # a value on the right side whose interval straddles the target is undecided, not met
    near = {**good, "retention": iv(0.97, 0.93, 1.0), "bleeding": iv(0.03, -0.01, 0.08),
            "class_share": iv(0.08, 0.04, 0.16)}
    checks = {c["target"]: c["met"] for c in bq.targets({"lora": near, "lora-style": near})}
    assert checks["LoRA subject: retention >= 0.95"] is None and checks["LoRA subject: bleeding <= 0.05"] is None
    assert checks["LoRA style: without <= 0.1"] is None and checks["LoRA subject: binding >= 0.6"] is True


def test_bench_skips_unknown_rows(tmp_path, tiny):
    bq = _bench()
    out = tmp_path / "q.json"
    assert bq.main(["--rows", "no-such-row", "--model", str(tiny), "--out", str(out),
                    "--grids", str(tmp_path / "grids")]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == {} and "no-such-row: skipped" in data["notes"][0]


def test_cli_quality_prints_intervals_and_tensorboard(tmp_path, tiny, capsys):
    from conftest import toy_cli

    assert toy_cli(["quality", "--model", str(tiny), "--work", str(tmp_path / "w"), "--steps", "2",
                    "--samples", "2", "--world-samples", "2", "--device", "cpu", "--tensorboard",
                    "--json", str(tmp_path / "q.json")]) == 0
    out = capsys.readouterr().out
    assert "95 % intervals; 2 samples per figure" in out and "binding" in out and "bleeding" in out
    assert "as a strict person reads the hearts" in out
    row = json.loads((tmp_path / "q.json").read_text())
    assert row["samples"]["concept"] == 2 and Path(row["grid"]).is_file()
    if row["tensorboard"]:           # written when tensorboardX or tensorboard is installed
        assert "TensorBoard log:" in out and any(Path(row["tensorboard"]).iterdir())
    else:
        assert "no TensorBoard log" in out


def test_cli_quality_refuses_a_bad_cfg_before_making_any_folder(tmp_path, tiny, capsys):
    from conftest import toy_cli

    work = tmp_path / "w"
    assert toy_cli(["quality", "--model", str(tiny), "--work", str(work), "--cfg", "-2"]) == 2
    assert "cfg_scale must be a number above 0" in capsys.readouterr().err
    assert not work.exists()


def test_cfg_readings_summary_pairs_the_cfgs_by_training_seed(tmp_path):
    """bench/cfg_readings.py summary: each figure over the seeds with a t interval, and the difference against the
    first CFG paired by seed; files that do not pair up are refused."""
    sys.path.insert(0, str(ROOT))
    try:
        import bench.cfg_readings as cr
    finally:
        sys.path.remove(str(ROOT))

    def reading(fid, strict=None):
        d = {"fidelity": {"value": fid}, "class_share": {"value": 0.0}, "retention": 0.99}
        if strict is not None:
            d["strict"] = {"value": strict}
        return d

    files = []
    for seed, (a, b) in enumerate([(0.6, 0.8), (0.7, 0.8), (0.5, 0.8)]):
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"concept": "subject", "training_seed": seed, "cfgs": ["7", "3"],
                                    "readings": {"7": reading(a, a - 0.2), "3": reading(b, b - 0.1)}}))
        files.append(path)
    out = cr.summary(files)
    fid = out["per_cfg"]["3"]["fidelity"]
    assert fid["per_seed"] == [0.8, 0.8, 0.8] and fid["value"] == pytest.approx(0.8)
    diff = out["minus_first"]["3"]["fidelity"]
    assert diff["per_seed"] == [0.2, 0.1, 0.3] and diff["value"] == pytest.approx(0.2)
    assert diff["lo"] < 0.2 < diff["hi"] and diff["n"] == 3 and diff["method"] == "t-replicates"
    assert out["minus_first"]["3"]["strict"]["value"] == pytest.approx(0.3)
    assert out["minus_first"]["3"]["retention"]["value"] == pytest.approx(0.0)
    with pytest.raises(UserError, match="one file per training seed"):
        cr.summary([files[0], files[0]])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"concept": "style", "training_seed": 9, "cfgs": ["7", "3"], "readings": {}}))
    with pytest.raises(UserError, match="different concepts"):
        cr.summary([files[0], other])
    assert cr.main(["summary", str(files[0]), "--out", str(tmp_path / "x.json")]) == 2   # one seed is not enough


def test_base_measured_beside_one_thread_training_changes_nothing(tmp_path, tiny, monkeypatch):
    """With training held to one thread in a process given two, the base model is measured in a second thread
    while the loop trains: the trained file and every figure are those of the same run done one after the other
    (nothing is shared between the two: models, generators, thread counts), and a training that does not
    finish stops the measuring thread too."""
    import threading

    import torch

    from lib_sdtrain.events import Events, StopToken
    from lib_sdtrain.formats.safetensors_io import read_safetensors

    kw = {"method": "lora", "model": str(tiny), "steps": 4, "images": 4, "repeats": 2, "concept_samples": 4,
          "seeds_per_prompt": 2, "world_samples": 3, "sample_steps": 2, "curve": 1, "device": "cpu", "train_threads": 1}
    threads = torch.get_num_threads()
    rows, said = {}, {}
    try:
        for name, n in (("after", 1), ("beside", 2)):
            torch.set_num_threads(n)
            events = Events()
            said[name] = []
            events.subscribe(lambda e, out=said[name]: out.append(str(e.data.get("text", ""))))
            rows[name], _ = run_quality_full(QualitySettings(**kw), tmp_path / name, events=events)
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    assert any("beside the training" in m for m in said["beside"])
    assert not any("beside the training" in m for m in said["after"])
    assert rows["beside"]["curve"] == rows["after"]["curve"]
    a, b = (read_safetensors(rows[k]["trained_file"])[0] for k in ("after", "beside"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a stopped training: the run ends with an error and leaves no measuring thread behind
    stop = StopToken()
    events = Events()
    events.subscribe(lambda e: stop.request() if e.kind == "progress" and e.data.get("phase") != "cache" else None)
    torch.set_num_threads(2)
    try:
        with pytest.raises(UserError, match="did not finish"):
            run_quality_full(QualitySettings(**{**kw, "steps": 50}), tmp_path / "stopped", events=events, stop=stop)
    finally:
        torch.set_num_threads(threads)
    assert not any(t.name == "quality-base" for t in threading.enumerate())


def test_sampling_stops_between_steps_not_only_between_batches(tiny):
    """A stop during a batch ends the sampling at the next step (a measuring thread must not hold a stopped run for
    a whole batch of 96 pictures): the batches already done are returned, the one under way is dropped."""
    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.toy.evaluate import sample_batch

    class StopAfter:
        def __init__(self, n):
            self.n, self.reads = n, 0

        @property
        def requested(self):
            self.reads += 1
            return self.reads > self.n

    parts = StandaloneHost(device="cpu", dtype="fp32").load(tiny)
    prompts, seeds = ["a red shape"] * 4, [1, 2, 3, 4]
    assert len(sample_batch(parts, prompts, seeds, steps=5, batch_size=2, stop=StopAfter(10 ** 6))) == 4
    # reads: before batch 1, its 5 steps, before batch 2, then 2 steps of batch 2 pass and the third read stops it
    stop = StopAfter(1 + 5 + 1 + 2)
    done = sample_batch(parts, prompts, seeds, steps=5, batch_size=2, stop=stop)
    assert len(done) == 2 and stop.reads == 10
