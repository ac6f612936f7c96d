"""Numbers no run could want are refused before any work, with a message naming the setting: learning rates far
above what the optimizer can use (1e300 was accepted and ran until the divergence guard stopped it), and the rates
that are allowed but far from a method's usual ones are warned about by the preflight."""

import re

import pytest
from conftest import write_pictures

from lib_sdtrain.cli import main as cli_main
from lib_sdtrain.errors import UserError
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train import optim
from lib_sdtrain.train.preflight import FolderHost, preflight
from lib_sdtrain.train.settings import TrainSettings

RATES = ("learning_rate", "unet_lr", "text_encoder_lr")


@pytest.mark.parametrize("name", RATES)
@pytest.mark.parametrize("value", [1e300, 1e3, 1.5])
def test_a_rate_above_what_adam_can_use_is_refused(name, value):
    shown = re.escape(f"{value:g}")
    with pytest.raises(UserError, match=rf"^{name}: {shown} is above 1, the largest learning rate the adamw "):
        TrainSettings.from_dict({name: value})
    with pytest.raises(UserError, match=rf"^{name}: .* the adamw8bit optimizer"):
        TrainSettings.from_dict({name: value, "optimizer": "adamw8bit"})
    assert getattr(TrainSettings.from_dict({name: 1.0}), name) == 1.0          # the limit itself is allowed
    with pytest.raises(UserError, match=rf"^{name}: .* is above 1"):        # a change of settings is checked too
        TrainSettings().replace(**{name: value})


def test_every_optimizer_has_a_limit_and_its_conventional_rate_passes():
    assert set(optim.RATE_LIMITS) == set(optim.OPTIMIZERS)
    # Prodigy's convention is 1.0 (a multiplier on its own estimate); SGD's rate depends on the gradients' size
    for optimizer, fine, refused in [("prodigy", 1.0, 11.0), ("prodigy", 2.0, 1e300), ("sgd", 2.0, 101.0),
                                     ("adafactor", 1e-3, 2.0), ("lion8bit", 1e-4, 5.0)]:
        for name in RATES:
            assert getattr(TrainSettings.from_dict({"optimizer": optimizer, name: fine}), name) == fine
            with pytest.raises(UserError, match=f"^{name}: .* the {optimizer} optimizer takes"):
                TrainSettings.from_dict({"optimizer": optimizer, name: refused})
    with pytest.raises(UserError, match="^learning_rate: 20 is above 10, .* prodigy estimates") as e:
        TrainSettings.from_dict({"optimizer": "prodigy", "learning_rate": 1.0}).replace(learning_rate=20.0)
    assert "1.0 is the convention" in str(e.value)
    # a rate that fits one optimizer is refused when the optimizer changes to one it does not fit
    with pytest.raises(UserError, match="^learning_rate: 2 is above 1, .* the adamw optimizer"):
        TrainSettings.from_dict({"optimizer": "sgd", "learning_rate": 2.0}).replace(optimizer="adamw")


def test_loraplus_up_rate_counts():
    """LoRA+ trains the up matrices at rate × ratio: 1e-1 × 16 is a rate of 1.6 for AdamW."""
    with pytest.raises(UserError, match=r"^learning_rate × lora.loraplus_lr_ratio \(the up matrices' rate\): 1.6 "):
        TrainSettings.from_dict({"learning_rate": 0.1, "lora": {"loraplus_lr_ratio": 16}})
    with pytest.raises(UserError, match=r"^text_encoder_lr × lora.loraplus_lr_ratio .*: 3.2 is above 1"):
        TrainSettings.from_dict({"text_encoder_lr": 0.2, "lora": {"loraplus_lr_ratio": 16}})
    # the paper's ratio at usual rates; a part that is not trained has no up rate
    TrainSettings.from_dict({"learning_rate": 1e-3, "lora": {"loraplus_lr_ratio": 16}})
    TrainSettings.from_dict({"learning_rate": 1e-3, "text_encoder_lr": 0.2,
                             "lora": {"loraplus_lr_ratio": 16, "train_text_encoder": False}})
    # not a LoRA run: the ratio is not used
    TrainSettings.from_dict({"method": "hypernetwork", "learning_rate": 0.1, "lora": {"loraplus_lr_ratio": 16}})


def test_cli_refuses_an_absurd_rate_in_one_line(capsys, tmp_path):
    code = cli_main(["train", "--data", str(tmp_path), "--learning-rate", "1e300"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: learning_rate: 1e+300 is above 1") and err.count("\n") == 1, err


def test_rate_warnings_follow_the_method_and_optimizer():
    def warned(**over):
        return optim.rate_warnings(TrainSettings.from_dict(over))

    assert warned() == [] and warned(learning_rate=6e-3) == []        # the toy LoRA's measured rate
    (w,) = warned(learning_rate=0.05)
    assert w.startswith("learning_rate 0.05 is high for lora training (usually at most 0.01)")
    (w,) = warned(learning_rate=1e-4, unet_lr=0.5)                      # the part's own rate is named
    assert w.startswith("unet_lr 0.5 is high")
    assert warned(learning_rate=1e-4, unet_lr=0.5, lora={"train_unet": False}) == []   # not trained
    assert warned(method="embedding", name="zwx", learning_rate=5e-2) == []
    assert len(warned(method="embedding", name="zwx", learning_rate=0.5)) == 1
    assert warned(method="embedding", name="zwx", learning_rate=1e-4, unet_lr=0.9) == []   # not its rate
    assert len(warned(method="hypernetwork", learning_rate=1e-2)) == 1
    assert warned(optimizer="sgd", learning_rate=0.5) == []                                # no usual size
    assert warned(optimizer="prodigy", learning_rate=1.0) == []
    (w,) = warned(optimizer="prodigy", learning_rate=1e-4)              # an AdamW rate carried over to Prodigy
    assert w.startswith("learning_rate 0.0001 with prodigy") and "1.0 is the convention" in w
    assert len(warned(optimizer="prodigy", learning_rate=5.0)) == 1


def test_preflight_passes_the_rate_warning_on(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "tiny.safetensors", "sd1")
    data = write_pictures(tmp_path / "data" / "2_zwx", captions=["a red square"]).parent
    cfg = TrainSettings.from_dict({"model": str(model), "data": str(data), "output": str(tmp_path / "out"),
                                   "learning_rate": 0.2})
    checked = preflight(cfg, FolderHost(tmp_path / "host"))
    assert [w for w in checked.warnings if w.startswith("learning_rate 0.2 is high for lora")], checked.warnings
    assert not [w for w in preflight(cfg.replace(learning_rate=1e-4), FolderHost(tmp_path / "host")).warnings
                if "learning_rate" in w]


COUNTS = ("epochs", "max_steps", "grad_accum", "lr_warmup_steps", "save_every_n_steps", "save_every_n_epochs",
          "keep_last", "sample_every_n_steps", "validation_every_n_steps", "keep_tokens", "min_bucket")


@pytest.mark.parametrize("name", COUNTS)
def test_a_count_no_run_reaches_is_refused(name):
    """JSON's 1e300 is an integer to Python: 1e300 epochs ran with an ETA of 10^290 hours, and an integer too large
    for a float (400 digits, from JSON or TOML) was an OverflowError traceback instead of a message."""
    from lib_sdtrain.config import MAX_COUNT

    with pytest.raises(UserError, match=rf"^{name}: 1e\+300 is above the maximum {MAX_COUNT}$"):
        TrainSettings.from_dict({name: 1e300})
    with pytest.raises(UserError, match=rf"^{name}: a number of 401 digits is above the maximum"):
        TrainSettings.from_dict({name: 10**400})
    assert getattr(TrainSettings.from_dict({name: MAX_COUNT}), name) == MAX_COUNT
    with pytest.raises(UserError, match=rf"^{name}: 1000000001 is above the maximum"):
        TrainSettings.from_dict({name: MAX_COUNT + 1})


def test_a_whole_number_out_of_range_is_shown_as_the_whole_number_it_was(tmp_path, capsys):
    """JSON's 100000000000000000000 (an int to Python) and the CLI's digits read "1e+20 is above the maximum 1024",
    as if a float had been typed. A whole number is shown as one up to 30 digits, then by its length; a float keeps
    its %g form, and a UI number box's 2000.0 reads as the 2000 it is for a count."""
    cases = [(10**20, "100000000000000000000 is above"), (-10**20, "-100000000000000000000 is below"),
             (10**29 + 7, "100000000000000000000000000007 is above"), (10**30, "a number of 31 digits is above"),
             (-10**40, "a negative number of 41 digits is below"), (1e20, r"1e\+20 is above"),
             (2000.0, "2000 is above"), (2000, "2000 is above")]
    for value, message in cases:
        with pytest.raises(UserError, match=rf"^batch_size: {message} the (maximum 1024|minimum 1)$"):
            TrainSettings.from_dict({"batch_size": value})
    code = cli_main(["train", "--data", str(tmp_path), "--batch-size", "1" + "0" * 20])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: batch_size: 100000000000000000000 is above the maximum 1024\n", err


def test_an_integer_past_the_float_range_for_a_float_setting_is_a_message():
    """A JSON or TOML integer of 400 digits for a float setting was OverflowError's traceback."""
    with pytest.raises(UserError, match="^learning_rate: a number of 401 digits is not a finite number$"):
        TrainSettings.from_dict({"learning_rate": 10**400})
    with pytest.raises(UserError, match=r"^weight_decay: a negative number of 401 digits is not a finite number$"):
        TrainSettings.from_dict({"weight_decay": -10**400})


def test_the_cli_and_the_compare_settings_refuse_counts_alike(tmp_path, capsys):
    from lib_sdtrain.evaluate.compare import CompareSettings

    code = cli_main(["train", "--data", str(tmp_path), "--epochs", "1" + "0" * 400])   # was a traceback
    err = capsys.readouterr().err
    assert code == 2 and err == "error: epochs: a number of 401 digits is above the maximum 1000000000\n", err
    for epochs, message in [([2, 1e300], r"epochs\[1\]: 1e\+300 is above"), ([-1], r"epochs\[0\]: -1 is below")]:
        with pytest.raises(UserError, match="^" + message):
            CompareSettings.from_dict({"epochs": epochs})
    with pytest.raises(UserError, match=r"^seeds\[0\]: a number of 401 digits is above the maximum 4294967295"):
        CompareSettings.from_dict({"seeds": [10**400]})


@pytest.mark.parametrize("section, name, usual, top", [
    ("", "weight_decay", 0.01, 10.0), ("", "prior_loss_weight", 0.5, 100.0), ("", "huber_scale", 2.0, 100.0),
    ("", "lr_power", 2.0, 100.0), ("", "lr_cycles", 3.0, 1000.0),
    ("lora", "network_alpha", 16.0, 100000), ("lora", "conv_alpha", 1.0, 100000)])
def test_absurd_floats_are_refused_before_the_divergence_guard_has_to(section, name, usual, top):
    """weight_decay, network_alpha or prior_loss_weight 1e300 turned the first step's loss or weights NaN (only the
    divergence guard stopped the run); lr_power 1e300 made the rate 0 from the second step, in silence."""
    def make(value):
        return TrainSettings.from_dict({section: {name: value}} if section else {name: value})

    where = f"{section}.{name}" if section else name
    with pytest.raises(UserError, match=rf"^{re.escape(where)}: 1e\+300 is above the maximum {top:g}"):
        make(1e300)
    for value in (usual, top):
        assert getattr(getattr(make(value), section) if section else make(value), name) == value


def test_compare_weights_have_a_range():
    from lib_sdtrain.evaluate.compare import CompareSettings

    assert CompareSettings.from_dict({"weights": [-1, 0.5, 1.5]}).weights == [-1.0, 0.5, 1.5]   # negative: allowed
    for weight in (1e300, -1e300):
        with pytest.raises(UserError, match=r"^weights\[0\]: -?1e\+300 is (above|below)"):
            CompareSettings.from_dict({"weights": [weight]})
