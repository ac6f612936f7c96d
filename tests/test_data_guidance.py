"""data/guidance.py: size ranges from the training guide, and the steps/epochs arithmetic."""

from pathlib import Path

import pytest

from lib_sdtrain.data import guidance as G
from lib_sdtrain.data.scan import ImageRecord
from lib_sdtrain.errors import UserError


def _levels(advice):
    return [a.level for a in advice]


@pytest.mark.parametrize("kind, n, level", [
    ("subject", 3, "warning"), ("subject", 5, "ok"), ("subject", 20, "ok"), ("subject", 40, "warning"),
    ("style", 30, "warning"), ("style", 120, "ok"), ("style", 500, "warning"),
    ("finetune", 300, "warning"), ("finetune", 5000, "ok"),
])
def test_instance_ranges(kind, n, level):
    advice = G.size_advice(n, kind=kind)
    assert advice[0].level == level
    assert str(n) in advice[0].text


def test_fine_tune_concepts_need_20_each():
    advice = G.size_advice(3000, kind="finetune", per_concept={"cats": 2980, "my dog": 12})
    assert _levels(advice) == ["ok", "warning"] and "my dog" in advice[1].text


@pytest.mark.parametrize("reg, level", [(0, "warning"), (100, "warning"), (200, "ok"), (1000, "ok"), (1500, "warning")])
def test_class_set_is_20_to_100_times_the_instance_set(reg, level):
    advice = G.size_advice(10, reg, kind="subject", uses_regularization=True)
    assert advice[-1].level == level
    assert "bleed" in advice[-1].text or level == "ok" or reg > 1000


def test_no_regularization_advice_when_not_used():
    assert len(G.size_advice(10, 0, kind="subject")) == 1
    with pytest.raises(UserError):
        G.size_advice(10, kind="portrait")


def test_step_arithmetic():
    p = G.plan_steps(12 * 10, batch_size=4, accumulation=2, epochs=5)
    assert (p.samples_per_epoch, p.batches_per_epoch, p.steps_per_epoch, p.total_steps) == (120, 30, 15, 75)
    assert p.hints == []
    reg = G.plan_steps(120, batch_size=4, accumulation=2, epochs=5, regularization=True)
    assert (reg.samples_per_epoch, reg.steps_per_epoch, reg.total_steps, reg.regularization_factor) == (240, 30, 150, 2)


def test_hint_when_batch_times_accumulation_does_not_divide():
    p = G.plan_steps(13 * 10, batch_size=4, accumulation=1, epochs=1, pictures=13, repeats=10)
    assert p.batches_per_epoch == 33 and p.steps_per_epoch == 33
    assert len(p.hints) == 1 and "130" in p.hints[0] and "2 of" not in p.hints[0]
    assert "repeats" in p.hints[0] or "samples per step" in p.hints[0]


def test_bucketed_epochs_round_up_per_bucket():
    p = G.plan_steps(10, batch_size=4, bucket_counts=[5, 5])
    assert p.batches_per_epoch == 4 and any("partial" in h for h in p.hints)
    with pytest.raises(UserError):
        G.plan_steps(10, batch_size=0)


def test_dataset_guidance_from_records():
    def rec(name, reg=False, repeats=10, concept="sks dog"):
        return ImageRecord(Path(name), 512, 512, "", "folder", repeats, concept, Path("x"), reg)

    recs = [rec(f"{i}.png") for i in range(8)] + [rec(f"r{i}.png", reg=True, repeats=1) for i in range(200)]
    out = G.dataset_guidance(recs, kind="subject", batch_size=2, accumulation=1, epochs=4)
    assert out["instance"] == 8 and out["regularization"] == 200
    assert [a["level"] for a in out["advice"]] == ["ok", "ok"]
    assert out["steps"]["samples_per_epoch"] == 160 and out["steps"]["total_steps"] == 320


def _nearby_divisible_by_walking(samples, per_step, repeats, pictures, factor):
    """The hint as first written: a walk over every repeat count within per_step, and over every smaller batch."""
    ideas = []
    if pictures > 0 and repeats > 0:
        near = sorted(range(max(1, repeats - per_step), repeats + per_step + 1), key=lambda r: (abs(r - repeats), r))
        ideas += [f"{r} repeats" for r in near if r != repeats and (pictures * r * factor) % per_step == 0][:1]
    ideas += [f"batch × accumulation = {b}" for b in range(per_step - 1, 1, -1) if samples % b == 0][:1]
    return ideas


def test_the_divisible_hint_is_computed_not_searched():
    """`dataset guidance --batch 1000000000` sorted 2·10^9 repeat counts and walked 10^9 batch sizes (3.8 s at 10^7, so
    minutes and tens of GB); 10^24 was an
    OverflowError traceback. The hint is the same as the walk's wherever the walk finishes."""
    import random
    import time

    rng = random.Random(0)
    for _ in range(3000):
        pictures, repeats, factor = rng.randint(0, 40), rng.randint(0, 30), rng.choice((1, 2))
        per_step, samples = rng.randint(2, 64), max(1, pictures * repeats * factor + rng.randint(0, 20))
        args = (samples, per_step, repeats, pictures, factor)
        assert G._nearby_divisible(*args) == _nearby_divisible_by_walking(*args), args
    t0 = time.monotonic()
    for batch in (10**9, 10**24):
        p = G.plan_steps(13 * 10, batch_size=batch, accumulation=3, epochs=2, pictures=13, repeats=10)
        # every picture in one step: 130 divides evenly; no repeat count up to scan's 10,000 does
        assert p.steps_per_epoch == 1 and p.hints[0].endswith("for example batch × accumulation = 130."), p.hints
    assert time.monotonic() - t0 < 1.0
