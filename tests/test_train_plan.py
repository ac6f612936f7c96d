"""The step arithmetic shown before a run: what max_steps and epochs mean together."""

from lib_sdtrain.train.plan import step_plan
from lib_sdtrain.train.settings import TrainSettings


def settings(**kw) -> TrainSettings:
    cfg = TrainSettings()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_max_steps_sets_the_length_longer_or_shorter_than_the_epochs():
    # 288 pictures with repeats = 384 samples, batch 4: 96 steps per epoch
    longer = step_plan(288, 384, 96, settings(max_steps=1200, epochs=10, batch_size=4))
    assert longer["total_steps"] == 1200 and longer["epochs"] == 13
    # the text said "× 10 epochs = 960 steps (capped at max_steps 1200)" though the run trains 1,200 steps
    assert "capped" not in longer["text"] and "960" not in longer["text"]
    assert "max_steps 1200 = 12.5 epochs" in longer["text"]
    shorter = step_plan(288, 384, 96, settings(max_steps=100, epochs=10, batch_size=4))
    assert shorter["total_steps"] == 100 and shorter["epochs"] == 2
    assert "max_steps 100 = 1.04 epochs" in shorter["text"]
    by_epochs = step_plan(288, 384, 96, settings(max_steps=0, epochs=10, batch_size=4))
    assert by_epochs["total_steps"] == 960 and "× 10 epochs = 960 steps" in by_epochs["text"]
