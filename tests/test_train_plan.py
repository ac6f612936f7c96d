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


def test_with_class_pictures_the_text_splits_instance_and_class_samples(tmp_path):
    """8 instance pictures × 2 repeats + 60 class pictures cycled to balance them: 16 + 16 samples, and the text
    no longer says "68 pictures × repeats = 32 samples"."""
    from conftest import write_pictures
    from lib_sdtrain.data.scan import scan_dataset
    from lib_sdtrain.train.plan import plan_data

    write_pictures(tmp_path / "data" / "2_zwx toy", 8, captions="zwx toy {i}")
    write_pictures(tmp_path / "class" / "1_toy", 60, captions="a toy")
    cfg = TrainSettings.from_dict({"data": str(tmp_path / "data"), "reg_data": str(tmp_path / "class"),
                                   "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 4})
    report = scan_dataset(cfg.data, reg_path=cfg.reg_data)
    _, _, info = plan_data(cfg, report.usable)
    assert info["samples_per_epoch"] == 32 and info["steps_per_epoch"] == 8
    assert info["text"].startswith("8 instance pictures × repeats = 16 samples + 16 class samples (of 60 class "
                                   "pictures) = 32 samples per epoch ÷ (batch 4 × accumulation 1) = 8 steps")
    assert "68 pictures" not in info["text"]
    # without class pictures the text stays as it was
    alone = step_plan(8, 16, 4, settings(max_steps=0, epochs=2, batch_size=4))
    assert alone["text"].startswith("8 pictures × repeats = 16 samples per epoch ÷ (batch 4")
