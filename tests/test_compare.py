"""Epoch comparison: grid drawing, run discovery, advice rules, applying saved LoRA files, and the compare CLI."""

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_sdtrain.config import save_config
from lib_sdtrain.errors import UserError
from lib_sdtrain.evaluate import advice as A
from lib_sdtrain.evaluate.compare import Column, CompareSettings, Comparison, Row, plan, resolve_settings
from lib_sdtrain.evaluate.grid import draw_grid
from lib_sdtrain.evaluate.runs import (LossCurve, RunInfo, SavedFile, describe_file, discover_run, parse_save_name,
                                       read_loss_csv, saved_files)
from lib_sdtrain.formats.safetensors_io import write_safetensors
from lib_sdtrain.train.settings import TrainSettings
from conftest import make_dataset

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def solid(rgb, size=32):
    return Image.new("RGB", (size, size), rgb)


# ---- grid --------------------------------------------------------------------------------------------
def test_grid_cells_and_labels():
    images = [[solid(COLOURS[r * 3 + c]) for c in range(3)] for r in range(2)]
    rows, cols = ["base model", "epoch 2 · step 120"], ["a zwx shape", "a red zwx shape", "a red shape\n(no trigger)"]
    notes = [[f"subject {0.1 * (r * 3 + c):.2f}" for c in range(3)] for r in range(2)]
    grid, layout = draw_grid(images, rows, cols, notes=notes, title="run t")
    assert (layout.rows, layout.cols) == (2, 3)
    assert sum(len(r) for r in layout.cell_boxes) == 6
    assert layout.row_labels == rows and layout.col_labels == cols and grid.size == layout.size
    arr = np.asarray(grid)
    for r in range(2):
        for c in range(3):
            x0, y0, x1, y1 = layout.cell_boxes[r][c]
            assert x1 - x0 == 128 and y1 - y0 == 128           # 32-px pictures enlarged to the minimum cell
            assert tuple(arr[(y0 + y1) // 2, (x0 + x1) // 2]) == COLOURS[r * 3 + c]
    # labels are drawn: ink above the first row (column labels) and left of the first column (row labels)
    x0, y0 = layout.cell_boxes[0][0][:2]
    assert (arr[:y0, x0:] < 128).any() and (arr[y0:, :x0] < 128).any()
    # notes are drawn under the cells
    x0, _, x1, y1 = layout.cell_boxes[0][0]
    assert (arr[y1 + 1:y1 + 15, x0:x1] != 255).any()


def test_grid_rejects_mismatched_labels():
    images = [[solid(COLOURS[0])] * 2]
    with pytest.raises(UserError, match="row labels"):
        draw_grid(images, ["a", "b"], ["x", "y"])
    with pytest.raises(UserError, match="same number"):
        draw_grid([[solid(COLOURS[0])], [solid(COLOURS[0])] * 2], ["a", "b"], ["x"])


# ---- run discovery -----------------------------------------------------------------------------------
def _save(folder, stem, **meta):
    folder.mkdir(parents=True, exist_ok=True)
    return write_safetensors(folder / f"{stem}.safetensors", {"x": torch.zeros(1)}, {k: str(v) for k, v in meta.items()})


def test_parse_save_names():
    assert parse_save_name("my-lora-000004") == ("my-lora", 4, None)
    assert parse_save_name("my-lora-step00000120") == ("my-lora", None, 120)
    assert parse_save_name("my-lora") == ("my-lora", None, None)
    assert parse_save_name("my-lora-000004", "my-lora") == ("my-lora", 4, None)
    assert parse_save_name("my-lora2-000004", "my-lora") is None
    assert parse_save_name("my-lora-4", "my-lora") is None


def test_discovery_from_run_folder_and_from_a_file(tmp_path):
    root = tmp_path / "outputs"
    lora = root / "Lora"
    _save(lora, "t-000001", ss_epoch=1, ss_steps=6)
    _save(lora, "t-step00000009", ss_epoch=1, ss_steps=9)    # kohya's step saves: the 0-based epoch
    _save(lora, "t-000002", ss_epoch=2, ss_steps=12)
    _save(lora, "t", ss_epoch=3, ss_steps=18)           # the final file: epoch and step only in metadata
    _save(lora, "t2-000001", ss_epoch=1)                # another run with a prefix-like name
    run_dir = root / "runs" / "t"
    run_dir.mkdir(parents=True)
    save_config(TrainSettings.from_dict({"name": "t", "sample_prompts": ["a zwx shape"], "resolution": 64}),
                run_dir / "config.toml")
    (run_dir / "loss.csv").write_text("step,epoch,loss,loss_ema,lr,time\n1,1,0.5,0.5,1e-4,0\n2,1,0.4,0.49,1e-4,0\n"
                                      "2,1,0.3,0.48,1e-4,0\n")
    run = discover_run(run_dir)
    assert run.name == "t" and run.method == "lora" and run.kind == "lora" and run.files_dir == lora
    assert [(f.stem, f.epoch, f.step, f.final) for f in run.files] == [
        ("t-000001", 1, 6, False), ("t-step00000009", 2, 9, False), ("t-000002", 2, 12, False), ("t", 3, 18, True)]
    assert [f.label for f in run.files][-1] == "final · epoch 3 · step 18"
    loss = run.loss
    assert loss.steps == [1, 2] and loss.losses == [0.5, 0.3]   # a resumed run's repeated step keeps its last row
    # one file of the run finds its siblings
    other = discover_run(lora / "t-000002.safetensors")
    assert [f.stem for f in other.files] == ["t-000001", "t-step00000009", "t-000002", "t"]
    # a config naming its own output folder wins
    elsewhere = tmp_path / "elsewhere"
    _save(elsewhere, "u-000001", ss_epoch=1)
    run_u = root / "runs" / "u"
    run_u.mkdir()
    save_config(TrainSettings.from_dict({"name": "u", "output": str(elsewhere)}), run_u / "config.toml")
    assert [f.stem for f in discover_run(run_u).files] == ["u-000001"]


def test_a_renamed_save_given_as_the_run_is_the_one_compared(tiny_run, tmp_path):
    """A save copied under a name of its own beside the run's files (its metadata still names the run) was
    replaced by the run's files: the comparison drew those and never the file the user gave."""
    import shutil

    folder = tmp_path / "Lora"
    shutil.copytree(tiny_run.result.run_dir.parent.parent / "Lora", folder)
    mine = folder / "my style v2.safetensors"
    shutil.copyfile(folder / "t-000001.safetensors", mine)
    run = discover_run(mine, tiny_run.host)
    assert [f.path for f in run.files] == [mine] and run.name == "my style v2" and run.method == "lora"
    assert [f.path.name for f in discover_run(folder / "t-000001.safetensors", tiny_run.host).files] == [
        "t-000001.safetensors", "t.safetensors"]

def test_discovery_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        discover_run(tmp_path / "nope")
    with pytest.raises(UserError, match="config.toml"):
        discover_run(tmp_path)
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    save_config(TrainSettings.from_dict({"name": "x"}), run_dir / "config.toml")
    with pytest.raises(UserError, match="no saved files"):
        discover_run(run_dir)
    assert read_loss_csv(tmp_path / "missing.csv") is None


def test_plan_rows_columns_and_epoch_filter(tmp_path):
    files = [SavedFile(_save(tmp_path, f"t-00000{e}"), "t", e, 6 * e) for e in (1, 2, 3)]
    run = RunInfo("t", "lora", "lora", files, config=TrainSettings.from_dict({"name": "t", "resolution": 64,
                                                                           "sample_prompts": ["a zwx shape"],
                                                                           "control_prompts": ["a shape"]}))
    s = resolve_settings(run, CompareSettings(seeds=[1, 2], weights=[0.5, 1.0]))
    assert s.prompts == ["a zwx shape"] and s.control_prompts == ["a shape"] and s.size == 64
    rows, cols = plan(run, s)
    assert len(rows) == 4 and rows[0].file is None and len(cols) == 2 * 2 * 2
    rows, _ = plan(run, s.replace(epochs=[2], include_base=False))
    assert [r.file.epoch for r in rows] == [2]
    with pytest.raises(UserError, match="saved epochs: \\[1, 2, 3\\]"):
        plan(run, s.replace(epochs=[7]))
    # 4 rows × 8 pictures of 1,768 px = 100 MP is drawn; of 2,504 px = 200.6 MP is over A1111's 200 MP
    plan(run, s.replace(size=1768))
    with pytest.raises(UserError, match="201 megapixels \\(at most 200\\)"):
        plan(run, s.replace(size=2504))
    bare = RunInfo("t", "lora", "lora", files)
    with pytest.raises(UserError, match="no prompts"):
        resolve_settings(bare, CompareSettings())
    # a save cut short or damaged is named before any rendering (it stopped the comparison when its row came up)
    data = files[1].path.read_bytes()
    files[1].path.write_bytes(data[:-2])
    files[2].path.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="2 saved file\\(s\\) cannot be read: t-000002.safetensors .*t-000003"
                                        ".*--epochs"):
        plan(run, s)
    assert [r.file.epoch for r in plan(run, s.replace(epochs=[1]))[0][1:]] == [1]



def test_epochs_weights_and_seeds_the_run_cannot_give_are_refused_before_drawing(tmp_path):
    """An epoch asked for beside saved ones was left out silently (the grid lacked its row); a weight other than 1
    for embeddings or checkpoints (no strength) was refused only when the first save's row came up, after the base
    model's pictures were drawn; the same seed or weight twice drew the same column twice."""
    files = [SavedFile(_save(tmp_path, f"t-00000{e}"), "t", e, 6 * e) for e in (1, 2, 3)]
    cfg = TrainSettings.from_dict({"name": "t", "resolution": 64, "sample_prompts": ["a zwx shape"]})
    run = RunInfo("t", "lora", "lora", files, config=cfg)
    s = resolve_settings(run, CompareSettings(seeds=[3, 1, 3], weights=[1.0, 0.5, 1.0, 0.5]))
    assert s.seeds == [3, 1] and s.weights == [1.0, 0.5]
    assert len(plan(run, s)[1]) == 4
    with pytest.raises(UserError, match=r"no file for epochs 5, 9 \(saved epochs: \[1, 2, 3\]\): leave them out"):
        plan(run, s.replace(epochs=[2, 9, 5, 2]))
    with pytest.raises(UserError, match=r"no file for epoch 0 .*leave it out"):
        plan(run, s.replace(epochs=[0, 1]))
    for method in ("embedding", "dreambooth", "finetune"):
        other = RunInfo("t", method, "x", files, config=cfg)
        with pytest.raises(UserError, match=f"{method} files have no strength setting.*weights given: 1, 0.5"):
            resolve_settings(other, CompareSettings(weights=[1.0, 0.5]))
        assert resolve_settings(other, CompareSettings(weights=[1.0])).weights == [1.0]
    assert resolve_settings(RunInfo("t", "hypernetwork", "x", files, config=cfg),
                            CompareSettings(weights=[0.5])).weights == [0.5]


def test_a_prompt_that_names_the_runs_own_file_is_refused(tmp_path):
    """`<lora:t-000002:0.8>` in a comparison prompt: the comparison puts each save on the model itself, so inside
    A1111 the tag added the file to every row, the base row included, and elsewhere it was dropped in silence
    (session 23's comparison audit). Refused with the tag named; another network's tag is left to the host."""
    files = [SavedFile(_save(tmp_path, f"t-00000{e}"), "t", e, 6 * e) for e in (1, 2)]
    cfg = TrainSettings.from_dict({"name": "t", "resolution": 64, "sample_prompts": ["a zwx shape"]})
    run = RunInfo("t", "lora", "lora", files, config=cfg)
    for prompt in ("a zwx shape <lora:t-000002:0.8>", "<LoRA:T:1> a zwx shape", "<hypernet:t-000001:1> x"):
        with pytest.raises(UserError, match=r"names this run's own file .*remove the tag"):
            resolve_settings(run, CompareSettings(prompts=[prompt]))
    with pytest.raises(UserError, match="own file"):
        resolve_settings(run, CompareSettings(prompts=["x"], control_prompts=["y <lora:t:1>"]))
    ok = resolve_settings(run, CompareSettings(prompts=["a zwx shape <lora:other_style:0.5>"]))
    assert ok.prompts == ["a zwx shape <lora:other_style:0.5>"]


def test_an_embedding_comparison_whose_prompts_lack_its_word_warns(tmp_path):
    """An embedding changes only the prompts that use its word: compared on prompts without it, every row equals the
    base model's and nothing said why (session 23's comparison audit). A warning names the word, before the model
    loads; prompts that say it, and other methods, get none."""
    from lib_sdtrain.evaluate.compare import embedding_word, render_comparison
    from lib_sdtrain.events import Events

    files = [SavedFile(_save(tmp_path, f"t-00000{e}"), "t", e, 6 * e) for e in (1, 2)]
    cfg = TrainSettings.from_dict({"name": "t", "method": "embedding", "resolution": 64,
                                   "embedding": {"token": "zwxtok"}})

    class Loaded(Exception):
        pass

    class Host:
        def load(self, model):
            raise Loaded

    def warned(run, prompts):
        seen = []
        events = Events()
        events.subscribe(lambda e: seen.append(e.data.get("text", "")) if e.kind == "warning" else None)
        with pytest.raises(Loaded):
            render_comparison(run, CompareSettings(prompts=prompts, size=64), Host(), events=events)
        return seen

    run = RunInfo("t", "embedding", "embedding", files, config=cfg)
    assert embedding_word(run) == "zwxtok"
    got = warned(run, ["a red square", "a zwx square"])
    assert any("no prompt says the embedding's word 'zwxtok'" in w for w in got), got
    assert not warned(run, ["a zwxtok, red square"])
    assert embedding_word(RunInfo("t", "lora", "lora", files, config=cfg)) == ""


# ---- advice rules --------------------------------------------------------------------------------------
def comparison(images, scores=None, cols=None, concept="subject", steps_per_epoch=10):
    """A hand-made Comparison: row 0 = base model, rows 1.. = epochs 1.."""
    n_rows = len(images)
    cols = cols or [Column("a zwx shape", False, 1.0, 1), Column("a shape", True, 1.0, 1)]
    k = steps_per_epoch
    rows = [Row("base model (no lora)", None)] + [
        Row(f"epoch {e} · step {k * e}", SavedFile(Path(f"t-00000{e}.safetensors"), "t", e, k * e))
        for e in range(1, n_rows)]
    run = RunInfo("t", "lora", "lora", [r.file for r in rows[1:]])
    return Comparison(run, CompareSettings(prompts=["a zwx shape"]), rows, cols, images, scores, concept)


def grey(level, size=32):
    return solid((level, level, level), size)


def test_bleeding_from_scores():
    imgs = [[grey(100), grey(100)]] * 3
    comp = comparison(imgs, scores=[[0.05, 0.02], [0.7, 0.1], [0.95, 0.6]])
    kinds = {a.kind: a for a in A.advise(comp)}
    assert kinds["bleeding"].epochs == [2]
    assert "0.02 → 0.60" in kinds["bleeding"].message and "regularization" in kinds["bleeding"].message
    # the choice skips the bleeding epoch even though its trigger score is higher
    assert kinds["choice"].epochs == [1]


def test_no_save_beating_the_base_model_is_said_plainly():
    imgs = [[grey(100), grey(100)]] * 3
    out = {a.kind: a for a in A.advise(comparison(imgs, scores=[[0.044, 0.0], [0.01, 0.0], [0.03, 0.0]]))}
    assert "choice" not in out and out["no_gain"].evidence["best_row"] == "epoch 2 · step 20"
    assert out["no_gain"].message.startswith("No save beats the base model") and "0.04" in out["no_gain"].message
    # one trigger picture a row: said in the singular, and said to be a rough reading
    assert "mean of 1 picture per row" in out["no_gain"].message and "rough reading" in out["no_gain"].message
    five = [Column("a zwx shape", False, 1.0, seed) for seed in range(5)]
    many = comparison([[grey(100)] * 5] * 3, scores=[[0.044] * 5, [0.01] * 5, [0.03] * 5], cols=five)
    many_msg = {a.kind: a for a in A.advise(many)}["no_gain"].message
    assert "mean of 5 pictures per row" in many_msg and "rough reading" not in many_msg
    close = {a.kind: a for a in A.advise(comparison(imgs, scores=[[0.40, 0.0], [0.42, 0.0], [0.3, 0.0]]))}
    assert close["no_gain"].message.startswith("No save clearly beats")
    learned = {a.kind for a in A.advise(comparison(imgs, scores=[[0.04, 0.0], [0.5, 0.0], [0.6, 0.0]]))}
    assert "no_gain" not in learned and "choice" in learned


def test_scores_that_are_not_numbers_leave_cells_unscored(tiny_run):
    """A NaN score (a scorer that cannot read a picture) made the advice fail with StopIteration (the choice rule
    found no row at the best score, NaN comparing false) and the JSON carry NaN, which strict parsers (the API's
    clients, JavaScript) refuse. Such cells are unscored now, with a warning; equal scores still read 'no gain'."""
    from lib_sdtrain.evaluate.compare import render_comparison

    nan = float("nan")
    imgs = [[grey(100), grey(100)]] * 3
    for scores in ([[nan, nan]] * 3, [[0.2, 0.1], [nan, nan], [nan, 0.1]], [[nan, nan], [0.9, 0.1], [0.8, 0.1]]):
        comp = comparison(imgs, scores)
        comp.advice = A.advise(comp)
        json.loads(json.dumps(comp.to_dict(), allow_nan=False))
    assert [a.kind for a in comp.advice] == ["choice"] and comp.advice[0].epochs == [1]
    assert [a.kind for a in A.advise(comparison(imgs, [[0.5, 0.5]] * 3))] == ["no_gain"]
    run = discover_run(tiny_run.result.run_dir, tiny_run.host)
    settings = CompareSettings(prompts=["zwx toy"], control_prompts=[], seeds=[5], epochs=[2], steps=2)
    comp = render_comparison(run, settings, tiny_run.host, scorer=lambda p: [nan, 0.25][:len(p)])
    assert comp.scores == [[None], [0.25]] and comp.mean_score(0, False) is None
    assert comp.warnings == [("1 of 2 pictures could not be scored (the score was not a number); their cells have "
                              "no score")]

def test_bleeding_from_picture_change_without_scores():
    base = [grey(100), grey(100)]
    calm = [grey(180), grey(104)]          # trigger pictures changed, control pictures hardly
    leaky = [grey(180), grey(170)]         # control pictures changed almost as much
    comp = comparison([base, calm, leaky])
    out = {a.kind: a for a in A.advise(comp)}
    assert out["bleeding"].epochs == [2] and "ratio 0.88" in out["bleeding"].message
    assert "bleeding" not in {a.kind for a in A.advise(comparison([base, calm]))}


def test_burned_pictures_and_loss_collapse_point_to_an_earlier_epoch():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(60, 190, (32, 32, 3), dtype=np.uint8))
    burned = Image.fromarray(np.where(rng.random((32, 32, 3)) < 0.5, 0, 255).astype(np.uint8))
    comp = comparison([[noisy, noisy], [noisy, noisy], [burned, burned]], scores=[[0.0, 0.0], [0.8, 0.0], [0.9, 0.0]])
    dup = types.SimpleNamespace(paths=[Path("a.png"), Path("a copy.png")])
    out = {a.kind: a for a in A.advise(comp, duplicates=[dup])}
    assert out["overtraining"].epochs == [2]
    msg = out["overtraining"].message
    assert "burned" in msg and "epoch 1 · step 10 or earlier" in msg and "a.png" in msg and "1 group" in msg
    assert out["choice"].epochs == [1]
    # a loss log whose smoothed loss collapses flags the epochs after the collapse (the monitor looks from step 400
    # on, at windows of an eighth of the steps so far; see test_train_monitor.py)
    steps = list(range(1, 1001))
    losses = [0.5] * 500 + [0.01 + 0.49 * (1 - ((i - 500) / 500) ** 2) for i in range(500, 1000)]   # falls ever faster
    curve = LossCurve(steps, [1 + (s - 1) // 500 for s in steps], losses, losses)
    clean = comparison([[noisy, noisy]] * 3, scores=[[0.0, 0.0], [0.8, 0.0], [0.9, 0.0]], steps_per_epoch=500)
    out = {a.kind: a for a in A.advise(clean, loss=curve)}
    assert "collapsed" in out["overtraining"].message
    collapse = A.loss_collapse(curve)
    assert collapse["epoch"] == 2 and 500 < collapse["step"] < 1000 and collapse["ema"] < 0.3 * collapse["early_ema"]
    assert out["choice"].epochs == [1]        # the epoch-2 save (step 1000) comes after the collapse
    flat = LossCurve(steps, [1] * 1000, [0.5] * 1000, [0.5] * 1000)
    assert A.loss_collapse(flat) is None
    # a loss that falls fast at the start and then stays level is no collapse
    settling = [0.04 + 0.5 * 0.97 ** i for i in range(1000)]
    assert A.loss_collapse(LossCurve(steps, [1] * 1000, settling, settling)) is None


def test_copy_like_pictures_found_with_the_dataset_fingerprints():
    from lib_sdtrain.data.dedupe import picture_fingerprint

    def picture(seed):
        arr = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        return Image.fromarray(arr).resize((64, 64), Image.BICUBIC)

    training = [picture(s) for s in range(5)]
    cols = [Column("a zwx shape", False, 1.0, 1), Column("a red zwx shape", False, 1.0, 1)]
    comp = comparison([[picture(10), picture(11)], [picture(12), picture(13)], [training[3], training[3]]], cols=cols)
    prints = [picture_fingerprint(im) for im in training]
    rows = A.measure_rows(comp, prints)
    assert rows[2]["copy_share"] == 1.0 and rows[2]["copy_repeated"] == 1.0 and rows[1]["copy_share"] == 0.0
    out = {a.kind: a for a in A.advise(comp, training_prints=prints)}
    assert out["overtraining"].epochs == [2] and "copy-like" in out["overtraining"].message


def test_recurring_feature_advice_when_it_shows_in_the_pictures():
    from lib_sdtrain.data.features import RecurringFeature

    white = RecurringFeature("zwx shape", "background", "white background (#f8f8f8)", 9, 10, "Add other backgrounds.",
                             ["1.png", "4.png"])
    tag = RecurringFeature("zwx shape", "tag", "red scarf", 8, 10, "Tag it or vary it.", ["2.png"])
    def on(level):
        im = grey(level, 64)
        im.paste((200, 0, 0), (20, 20, 44, 44))
        return im
    learned = comparison([[on(120), on(120)], [on(248), on(120)]])
    out = [a for a in A.advise(learned, features=[white, tag]) if a.kind == "feature"]
    assert len(out) == 2
    assert "100% of the pictures of epoch 1" in out[0].message and "1.png, 4.png" in out[0].message
    assert "red scarf" in out[1].message and "2.png" in out[1].message   # a tag: from the dataset report
    not_learned = comparison([[on(120), on(120)], [on(120), on(120)]])
    assert [a.evidence["feature"]["label"] for a in A.advise(not_learned, features=[white]) if a.kind == "feature"] == []


# ---- a real run: apply saved LoRA files, and the CLI ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint
    from lib_sdtrain.train.loop import train

    root = tmp_path_factory.mktemp("run")
    model = make_tiny_checkpoint(root / "tiny.safetensors", "sd1")
    make_dataset(root / "data", 4, 64, repeats=3)
    cfg = TrainSettings.from_dict({
        "model": str(model), "data": str(root / "data"), "name": "t", "resolution": 64, "min_bucket": 64,
        "max_bucket": 128, "batch_size": 2, "epochs": 2, "learning_rate": 1e-3, "save_every_n_epochs": 1,
        "tensorboard": False, "sample_prompts": ["zwx toy, red square"], "control_prompts": ["red square"],
        "sample_every_n_epochs": 0, "lora": {"network_dim": 4, "network_alpha": 4}})
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=root / "outputs")
    result = train(cfg, host)
    return types.SimpleNamespace(root=root, model=model, result=result, host=host)


def test_applying_saved_files_scales_and_restores(tiny_run):
    from lib_sdtrain.evaluate.apply import AdapterApplier

    run = discover_run(tiny_run.result.run_dir, tiny_run.host)
    assert [(f.epoch, f.step, f.final) for f in run.files] == [(1, 6, False), (2, 12, True)]
    parts = tiny_run.host.load(str(tiny_run.model))
    before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    applier = AdapterApplier(run, parts)
    applier.apply(run.files[1], 1.0)
    full = applier.method.delta_weights()
    assert max(float(d.abs().max()) for d in full.values()) > 0      # the trained update is really there
    applier.apply(run.files[1], 0.5)
    half = applier.method.delta_weights()
    for k in full:
        torch.testing.assert_close(half[k], 0.5 * full[k])
    applier.apply(run.files[0], 1.0)
    first = applier.method.delta_weights()
    assert any(not torch.equal(first[k], full[k]) for k in full)     # another epoch, other weights
    applier.close()
    after = parts.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_compare_cli_on_a_tiny_two_epoch_run(tiny_run, capsys):
    from lib_sdtrain.cli import main

    out = tiny_run.root / "grid.png"
    code = main(["compare", str(tiny_run.result.run_dir), "--seeds", "1", "2", "--weights", "0.5,1", "--steps", "3",
                 "--device", "cpu", "--dtype", "fp32", "--score", "subject", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "final · epoch 2 · step 12" in printed
    meta = json.loads(Image.open(out).info["lab.compare"])
    side = json.loads(out.with_suffix(".json").read_text())
    assert meta["rows"] == side["rows"] == ["base model (no lora)", "epoch 1 · step 6", "final · epoch 2 · step 12"]
    # columns: (1 prompt + 1 control prompt) × 2 weights × 2 seeds, labelled with what varies
    assert len(meta["columns"]) == 8
    assert meta["columns"][0] == "zwx toy, red square\nweight 0.5 · seed 1"
    assert meta["columns"][-1] == "red square\n(no trigger)\nweight 1 · seed 2"
    assert meta["layout"]["rows"] * meta["layout"]["cols"] == 24
    assert meta["settings"]["prompts"] == ["zwx toy, red square"] and meta["settings"]["seeds"] == [1, 2]
    assert len(meta["scores"]) == 3 and all(len(r) == 8 and all(0 <= s <= 1 for s in r) for r in meta["scores"])
    assert any(a["kind"] == "feature" and "red square" in a["message"] for a in meta["advice"])
    # the verdict follows the scores: a save is chosen only when one beats the base model's concept score
    trigger = [r["score_trigger"] for r in side["summary"]]
    kinds = {a["kind"] for a in meta["advice"]}
    expect = "choice" if max(trigger[1:]) - trigger[0] >= A.NEAR_BEST else "no_gain"
    assert expect in kinds and f"[{expect}]" in printed and ({"choice", "no_gain"} - {expect}).isdisjoint(kinds)
    # the same output is never replaced without --overwrite
    assert main(["compare", str(tiny_run.result.run_dir), "--device", "cpu", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    # --overwrite names the grid: a JSON of the user's beside it, which the grid's JSON would replace, is kept;
    # a name the grid cannot have is refused before any rendering (it was refused after)
    (tiny_run.root / "notes.json").write_text('{"mine": 1}')
    assert main(["compare", str(tiny_run.result.run_dir), "--device", "cpu", "--overwrite",
                 "--out", str(tiny_run.root / "notes.png")]) == 2
    assert "not a comparison's JSON" in capsys.readouterr().err
    assert (tiny_run.root / "notes.json").read_text() == '{"mine": 1}' and not (tiny_run.root / "notes.png").exists()
    assert main(["compare", str(tiny_run.result.run_dir), "--device", "cpu", "--out", str(tiny_run.root / "g.jpg")]) == 2
    assert "rendering" not in capsys.readouterr().out
    # a folder that cannot hold the grid (under a file; read-only alike) is refused before rendering, as by the
    # tab: the CLI drew the whole grid first, then failed to save it
    assert main(["compare", str(tiny_run.result.run_dir), "--device", "cpu",
                 "--out", str(tiny_run.root / "grid.json" / "g.png")]) == 2
    captured = capsys.readouterr()
    assert "grid.json is a file, not a folder" in captured.err and "rendering" not in captured.out


def test_compare_tab_handlers_without_gradio(tiny_run, tmp_path):
    from lib_sdtrain.ui import compare_tab as tab

    assert tab.parse_lines("a, b\n\n c ") == ["a, b", "c"] and tab.parse_numbers("1, 2 3", int) == [1, 2, 3]
    with pytest.raises(UserError, match="not a whole number"):
        tab.parse_numbers("1 x", int)
    ctx = types.SimpleNamespace(host=lambda: tiny_run.host, extras={})
    run_dir = str(tiny_run.result.run_dir)
    assert tab.run_choices(ctx) == [run_dir]
    form = tab.form_defaults(ctx, run_dir)
    assert form["prompts"] == "zwx toy, red square" and form["size"] == 64 and "final · epoch 2" in form["info"]
    settings = tab.settings_from_form(form["prompts"], form["control_prompts"], "", "5", "1", "2", 2, 7, "euler", 0,
                                      False, "none")
    res = tab.run_compare(ctx, run_dir, settings, out=tmp_path / "tab.png")
    assert [r[0] for r in res["rows"]] == ["final · epoch 2 · step 12"]    # --epochs 2, no base row
    assert res["image"].size == Image.open(res["path"]).size and "Which epoch" in res["advice"]
    saved = tab.load_saved(res["path"])
    assert saved["settings"]["epochs"] == [2] and saved["settings"]["seeds"] == [5]
    assert tab.stop_compare() == "nothing is running"


def test_a_grid_path_it_cannot_save_to_is_refused_before_anything_is_drawn(tiny_run, tmp_path):
    """run_compare (the tab's job, the API's /compare) checked its `out` only when saving: an existing file, a
    .jpg or a path under a file was refused after the whole grid was drawn (minutes on a real model)."""
    from lib_sdtrain.ui import compare_tab as tab

    asked = []
    ctx = types.SimpleNamespace(host=lambda: asked.append(1) or tiny_run.host, extras={})
    settings = CompareSettings.from_dict({"prompts": ["zwx toy"], "seeds": [5], "steps": 2, "score": "none"})
    (tmp_path / "mine.png").write_bytes(b"the user's picture")
    (tmp_path / "a-file").write_text("x")
    for out, message in [(tmp_path / "mine.png", "mine.png exists"), (tmp_path / "g.jpg", "saved as .png"),
                         (tmp_path / "a-file" / "g.png", "a-file is a file, not a folder")]:
        with pytest.raises(UserError, match=message):
            tab.run_compare(ctx, str(tiny_run.result.run_dir), settings, advice=False, out=out)
        assert asked == [], f"{out.name}: the host was asked for the model before the refusal"
    assert (tmp_path / "mine.png").read_bytes() == b"the user's picture"


def test_the_compare_status_line_follows_the_job(tiny_run, tmp_path):
    """The Compare tab's status line: the waiting text while the host keeps the job waiting, "comparing, picture
    k/n" with what is drawn, then done (or stopped, or stopped before it started); compare_updates streams it
    while the comparison runs on its own thread and ends with run_compare's result."""
    from lib_sdtrain.events import Events
    from lib_sdtrain.ui import compare_tab as tab

    watch = tab.CompareProgress()
    events = Events(watch)
    events.status("waiting for A1111's queue (another job is running)")
    assert watch.text() == "waiting for A1111's queue (another job is running)"
    events.progress(0, 4, phase="compare")
    events.status("loading the base model")
    assert watch.text() == "comparing, picture 0/4 - loading the base model"
    events.status("epoch 2: weight 1")
    events.progress(2, 4, phase="compare", row="epoch 2")
    assert watch.text() == "comparing, picture 2/4 - epoch 2: weight 1"
    watch.finish(None)
    assert watch.text() == "stopped while waiting for its turn: nothing drawn, no grid"

    ctx = types.SimpleNamespace(host=lambda: tiny_run.host, extras={})
    settings = tab.settings_from_form("zwx toy, red square", "", "", "5", "1", "", 2, 7, "euler", 0, True, "none")
    updates = list(tab.compare_updates(ctx, str(tiny_run.result.run_dir), settings, every=0.01, advice=False,
                                       out=tmp_path / "status.png"))
    assert all(res is None for res, _ in updates[:-1])
    assert any(line.startswith("comparing, picture ") for _, line in updates[:-1])
    res, line = updates[-1]
    assert res["stopped"] is False and Path(res["path"]).is_file()
    assert line == "done: 3 of 3 pictures, grid saved"

    partial = types.SimpleNamespace(images=[[object(), None]])
    watch = tab.CompareProgress()
    watch(types.SimpleNamespace(kind="progress", data={"phase": "compare", "step": 1, "total": 2}))
    watch.finish({"comparison": partial, "stopped": True})
    assert watch.text() == "stopped: 1 of 2 pictures drawn, the partial grid is saved"
    with pytest.raises(UserError, match="choose a run to compare"):
        list(tab.compare_updates(ctx, "", settings, every=0.01))


def test_the_compare_job_runs_inside_the_hosts_job_context(tiny_run, tmp_path, monkeypatch):
    """run_compare reaches the host's lock, progress display and stop control only through Host.job_context (a
    HostJob of kind "compare" whose stop token is the tab's): the host stopping it mid-grid gives a partial grid,
    saved as stopped. The standalone host's own job_context changes nothing."""
    import contextlib

    from lib_sdtrain.events import Events, StopToken
    from lib_sdtrain.hosts import HostJob
    from lib_sdtrain.ui import compare_tab as tab

    host = tiny_run.host
    job = HostJob("compare-x", Events(), StopToken(), kind="compare")
    with host.job_context(job):
        pass
    assert not job.stop.requested

    real, entered, seen = host.job_context, [], []

    @contextlib.contextmanager
    def spy(job):
        with real(job):
            entered.append(job)
            assert tab._STOP["token"] is job.stop                    # the tab's Stop and the host's are one

            def host_display(event):
                if event.kind == "progress":
                    seen.append((event.data["step"], event.data["total"]))
                    if event.data["step"] > 0:
                        job.stop.request("interrupted by the host")   # e.g. A1111's Interrupt
            job.events.subscribe(host_display)
            yield

    monkeypatch.setattr(host, "job_context", spy)
    ctx = types.SimpleNamespace(host=lambda: host, extras={})
    settings = tab.settings_from_form("zwx toy, red square", "", "", "5", "1", "", 2, 7, "DDIM", 0, True, "none")
    res = tab.run_compare(ctx, str(tiny_run.result.run_dir), settings, advice=False, out=tmp_path / "stop.png")
    assert len(entered) == 1 and entered[0].kind == "compare" and entered[0].id.startswith("compare-")
    assert seen == [(0, 3), (1, 3)]                    # the size of the job first, then one row drawn
    comp = res["comparison"]
    assert comp.stopped and [r.count(None) for r in comp.images] == [0, 1, 1]
    assert comp.settings.sampler == "ddim" and tab.stop_compare() == "nothing is running"


def test_the_hosts_grid_limit_refuses_a_grid_before_the_model_loads(tiny_run, monkeypatch):
    """Inside A1111 the limit is the user's own "Maximum image size, in megapixels" (the host reports it)."""
    from lib_sdtrain.evaluate.compare import render_comparison

    host = tiny_run.host
    monkeypatch.setattr(host, "max_grid_megapixels", 0.01, raising=False)
    monkeypatch.setattr(host, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    run = discover_run(tiny_run.result.run_dir, host)
    settings = CompareSettings(prompts=["zwx toy"], control_prompts=[], seeds=[5, 6], steps=2)
    with pytest.raises(UserError, match="at most 0.01\\)"):
        render_comparison(run, settings, host, scorer=None)


def test_a_picture_the_host_left_out_is_an_empty_unscored_cell(tiny_run, tmp_path, monkeypatch):
    """None from host.sample (A1111's Skip cut that picture short; only given a stop token): that cell stays empty
    and unscored, every other cell is drawn and scored, the comparison is not stopped, and it is saved."""
    from lib_sdtrain.evaluate.compare import render_comparison, save_comparison

    host = tiny_run.host
    real, calls = host.sample, []

    def skip_second(parts, requests, stop=None):
        assert stop is not None
        calls.append(len(requests))
        pictures = real(parts, requests, stop)
        return [None if len(calls) == 1 and i == 1 else im for i, im in enumerate(pictures)]

    monkeypatch.setattr(host, "sample", skip_second)
    run = discover_run(tiny_run.result.run_dir, host)
    settings = CompareSettings(prompts=["zwx toy"], control_prompts=[], seeds=[5, 6], epochs=[2], steps=2)
    comp = render_comparison(run, settings, host, scorer=lambda pictures: [0.5] * len(pictures))
    assert not comp.stopped and calls == [2, 2]
    assert [[im is None for im in row] for row in comp.images] == [[False, True], [False, False]]
    assert comp.scores == [[0.5, None], [0.5, 0.5]] and comp.summary()[0]["score_trigger"] == 0.5
    png, js = save_comparison(comp, tmp_path / "skip.png")
    saved = json.loads(js.read_text())
    assert saved["stopped"] is False and saved["scores"] == [[0.5, None], [0.5, 0.5]] and png.is_file()


def test_a_zero_terminal_snr_run_is_compared_on_its_schedule(tiny_run, monkeypatch):
    """A run trained with zero_terminal_snr (its config says so) is drawn on that schedule in every cell, with a
    status line, when the model predicts v; on a noise-predicting model (a file of another trainer may say so)
    a warning says it cannot, and the model's own schedule is used; any other run on the stored one."""
    import dataclasses

    from lib_sdtrain.evaluate.compare import render_comparison
    from lib_sdtrain.events import EventLog, Events

    host = tiny_run.host
    real, asked = host.sample, []

    def spy(parts, requests, stop=None):
        asked.extend(r.zero_terminal_snr for r in requests)
        return real(parts, requests, stop)

    monkeypatch.setattr(host, "sample", spy)
    run = discover_run(tiny_run.result.run_dir, host)
    settings = CompareSettings(prompts=["zwx toy"], control_prompts=[], seeds=[5], epochs=[2], steps=2)
    render_comparison(run, settings, host, scorer=None)
    assert asked == [False, False]
    asked.clear()
    run.config = dataclasses.replace(run.config, zero_terminal_snr=True)
    # the tiny model predicts the noise, which cannot draw on that schedule: said, and drawn on its own
    log = EventLog()
    render_comparison(run, settings, host, scorer=None, events=Events(log))
    assert asked == [False, False]
    assert any("predicts the noise" in e.data.get("text", "") for e in log.since(0)[1] if e.kind == "warning")
    asked.clear()
    real_load = host.load

    def as_v(*a, **k):   # the same weights taken as a v-prediction model: the schedule is the run's
        parts = real_load(*a, **k)
        parts.prediction = "v"
        return parts

    monkeypatch.setattr(host, "load", as_v)
    log = EventLog()
    render_comparison(run, settings, host, scorer=None, events=Events(log))
    assert asked == [True, True]
    assert any("drawn on that schedule" in e.data.get("text", "") for e in log.since(0)[1] if e.kind == "status")
    from lib_sdtrain.evaluate.compare import trained_on_zero_terminal_snr

    kohya = [SavedFile(Path("k.safetensors"), "k", metadata={"ss_zero_terminal_snr": flag}) for flag in ("True", "False")]
    assert trained_on_zero_terminal_snr(RunInfo("k", "lora", "lora", kohya[:1]))        # another trainer's file says
    assert not trained_on_zero_terminal_snr(RunInfo("k", "lora", "lora", kohya[1:]))


def test_a_save_with_nan_weights_gets_a_blank_row_and_a_warning_while_the_others_are_drawn(tiny_run, tmp_path):
    """A run that diverged saves files of NaN: such a save is named in a warning and its row is left blank; the
    base model and the other saves are still drawn and scored, and the model is given back unchanged."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lib_sdtrain.evaluate.compare import render_comparison
    from lib_sdtrain.events import EventLog, Events

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.result.run_dir, run_dir)
    host = tiny_run.host
    run = discover_run(run_dir, host)
    first = run.files[0].path
    tensors = load_file(first)
    key = min(tensors)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    with safe_open(str(first), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(first), metadata=meta)
    run = discover_run(run_dir, host)
    log = EventLog()
    settings = CompareSettings(prompts=["zwx toy"], control_prompts=[], seeds=[5], epochs=[1, 2], steps=2)
    comp = render_comparison(run, settings, host, events=Events(log), scorer=lambda p: [0.5] * len(p))
    labels = [r.label for r in comp.rows]
    assert len(labels) == 3 and not comp.stopped
    assert [[im is None for im in row] for row in comp.images] == [[False], [True], [False]]
    assert comp.scores == [[0.5], [None], [0.5]]
    warned = [e.data["text"] for e in log.since(0)[1] if e.kind == "warning"]
    assert any(first.name in w and "not finite" in w and "blank" in w for w in warned), warned


def test_a_save_that_cannot_be_put_on_gets_a_blank_row_and_the_others_are_drawn(tiny_run, tmp_path):
    """A save replaced by a file of another method or model (or cut short, or deleted after the run was read)
    failed the whole comparison when its row came up, after the rows above it were drawn (minutes on a real
    model), and the grid was lost. Its row is now blank with a warning naming it and what to do, as a save of
    NaN's; only when no save at all can be put on is the comparison refused. The model is given back unchanged."""
    import shutil

    from lib_sdtrain.evaluate.compare import render_comparison
    from lib_sdtrain.events import EventLog, Events

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.result.run_dir, run_dir)
    host = tiny_run.host
    run = discover_run(run_dir, host)
    first, final = run.files[0].path, run.files[1].path
    first.unlink()
    write_safetensors(first, {"emb_params": torch.zeros(1, 32)}, {"ss_epoch": "1"})   # an embedding's file
    parts = host.load(str(tiny_run.model))
    before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    host.release(parts)
    log = EventLog()
    settings = CompareSettings(prompts=["zwx toy"], control_prompts=[], seeds=[5], steps=2, score="none")
    comp = render_comparison(run, settings, host, events=Events(log))
    assert [[im is None for im in row] for row in comp.images] == [[False], [True], [False]]
    warned = [e.data["text"] for e in log.since(0)[1] if e.kind == "warning"]
    assert any(w.startswith("epoch 1 · step 6 cannot be put on the model") and first.name in w and "--epochs" in w
               for w in warned), warned
    assert comp.warnings == warned
    shutil.copyfile(first, final)                         # the other save too: nothing of the run to show
    with pytest.raises(UserError, match="none of the saves of run 't' could be put on the model"):
        render_comparison(run, settings, host)
    after = host.load(str(tiny_run.model)).unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
