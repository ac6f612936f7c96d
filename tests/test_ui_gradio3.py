"""The Training Lab page under gradio 3.41.2, the version A1111 WebUI 1.10 pins, in a second environment.

`tools/setup_gradio3.sh` builds `.venv-gradio3` (gradio 3.41.2, numpy<2, pydantic 1). The test runs this same
file as a script in that interpreter (`python tests/test_ui_gradio3.py --check`): it builds the whole page with
the standalone host on a tiny model, then drives the Dataset tab's events through gradio's own
`Blocks.process_api` (inputs preprocessed and outputs postprocessed exactly as for a browser), and checks what
they did on disk. The same script also runs under the main .venv's gradio (4/5), so both code paths are covered.

The script part imports nothing but the project, gradio and the standard library (no pytest in .venv-gradio3).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRADIO3_PYTHON = ROOT / ".venv-gradio3" / "bin" / "python"


# ---- the script (runs inside the interpreter under test) ---------------------------------------------------
def _make_dataset(root: Path) -> Path:
    from PIL import Image, ImageDraw

    rng = random.Random(3)
    folder = root / "data" / "5_sks cat"
    folder.mkdir(parents=True)
    for i in range(4):
        im = Image.new("RGB", (320, 256), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.randrange(300), rng.randrange(230)
            d.rectangle([x, y, x + rng.randint(20, 120), y + rng.randint(20, 100)],
                        fill=tuple(rng.randrange(256) for _ in range(3)))
        im.save(folder / f"c{i}.png")
        (folder / f"c{i}.txt").write_text(["sks cat, sofa", "sks cat, garden, sunny", "cat, sofa, night",
                                           "sks cat, window"][i] + "\n")
    with Image.open(folder / "c0.png") as im:
        im.resize((280, 224)).save(folder / "c0_small.png")
    return root / "data"


def _pictures(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


class Driver:
    """Calls a component's event through `Blocks.process_api`, in gradio 3 and in gradio 4/5."""

    def __init__(self, demo):
        import gradio as gr

        self.demo = demo
        self.gradio3 = int(gr.__version__.split(".")[0]) < 4
        if self.gradio3:
            self.state: object = {}
        else:
            from gradio.state_holder import SessionState

            self.state = SessionState(demo)

    def fn_index(self, component, event: str) -> int:
        if self.gradio3:
            for i, dep in enumerate(self.demo.dependencies):
                targets = [tuple(t) if isinstance(t, (list, tuple)) else (t, dep.get("trigger")) for t in dep["targets"]]
                if (component._id, event) in targets:
                    return i
        else:
            for i, fn in self.demo.fns.items():
                if any(t[0] == component._id and t[1] == event for t in fn.targets):
                    return i
        raise AssertionError(f"no {event} event on {component}")

    def inputs_of(self, i: int) -> list:
        ids = self.demo.dependencies[i]["inputs"] if self.gradio3 else [b._id for b in self.demo.fns[i].inputs]
        return [self.demo.blocks[x] for x in ids]

    def call(self, component, event: str, values: dict, event_data=None) -> list:
        """Run the event with `values` {component: frontend value} (others: the component's current value).
        Returns the postprocessed outputs (a generator's last one)."""
        i = self.fn_index(component, event)
        inputs = []
        for block in self.inputs_of(i):
            if block in values:
                inputs.append(values[block])
            else:
                inputs.append(getattr(block, "value", None))
        return asyncio.run(self._run(i, inputs, event_data))

    async def _run(self, i: int, inputs: list, event_data) -> list:
        kw = {"event_data": event_data}
        out = await self.demo.process_api(i, inputs, self.state, **kw)
        while out.get("is_generating"):
            last = out
            it = {"iterators": {i: out["iterator"]}} if self.gradio3 else {"iterator": out["iterator"]}
            out = await self.demo.process_api(i, inputs, self.state, **it, **kw)
            if not out.get("is_generating") and all(v is None for v in out.get("data") or [None]):
                out = last     # the generator ended: its last yield is what the page shows
                break
        return out["data"]


def _text(value) -> str:
    """A Markdown output as text, whatever the version hands back (3.x: HTML string; 4+: the Markdown)."""
    if isinstance(value, dict):
        value = value.get("value", "")
    return str(value or "")


def run_check(work: Path) -> dict:
    import gradio as gr

    from lib_sdtrain.commands.app import standalone_context
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint
    from lib_sdtrain.ui import tabs

    model = make_tiny_checkpoint(work / "tiny.safetensors", "sd1")
    data = _make_dataset(work)
    ctx = standalone_context(model=str(model), output_root=str(work / "out"), device="cpu", dtype="fp32")
    demo = tabs.build(ctx)
    compat_queue = __import__("lib_sdtrain.ui.compat", fromlist=["queue"]).queue
    compat_queue(demo)
    built = [m for _, _, m in tabs.TABS if tabs.load_tab(m) is not None]
    C = ctx.components
    folder, reg, ext = C["dataset.folder"], C["dataset.reg"], C["dataset.caption_ext"]
    d = Driver(demo)
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values() if getattr(b, "elem_id", None)}

    def comp(elem_id):
        return blocks[elem_id]

    base = {folder: str(data), reg: "", ext: ".txt"}
    pics_before = _pictures(data)

    # The Monitor polls without a server loop: no event repeats on the server (`every`), which under gradio 3 kept
    # A1111's Reload UI waiting for good (session 21); gradio 3 polls through a hidden button the page clicks, its
    # event outside the queue, gradio 4+ through a Timer the browser ticks
    deps = demo.config["dependencies"]
    assert not [dep for dep in deps if dep.get("every")], "an event repeats on the server (every=)"
    if int(gr.__version__.split(".")[0]) < 4:
        tick = comp("training_lab_monitor_tick")
        clicks = [dep for dep in deps if any((t[0] if isinstance(t, (list, tuple)) else t) == tick._id
                                             for t in dep["targets"])]
        assert len(clicks) == 1 and clicks[0]["queue"] is False, clicks
        assert any("training_lab_monitor_tick" in (dep.get("js") or "") for dep in deps), "nothing clicks the tick"
    result: dict = {"gradio": gr.__version__, "tabs_built": built}

    # Every widget has its own key in A1111's ui-config.json (a repeated label gets its sub-tab in the key)
    from a1111_ui_config import repeated_keys, ui_config_keys

    assert not repeated_keys(demo), repeated_keys(demo)
    assert "customscript/training_lab/Compare/training_lab/Steps/value" in {k for k, _, _ in ui_config_keys(demo)}

    # Scan: the report, the tag table, the gallery and the picture picker
    out = d.call(comp("training_lab_ds_scan"), "click", base)
    status, report, tags, tokens, gallery, picker, _names = out
    assert "Scanned 5 usable pictures" in _text(status), status
    assert "5 pictures" in _text(report) and "5_sks cat" in _text(report), report
    table = tags["data"] if isinstance(tags, dict) else tags
    counts = {row[0]: row[1] for row in table}
    assert counts["sks cat"] == 4 and counts["sofa"] == 2 and counts["cat"] == 1, counts
    assert len(gallery) == 5, gallery
    choices = picker["choices"]
    choices = [c[0] if isinstance(c, (list, tuple)) else c for c in choices]
    assert choices[0] == "5_sks cat/c0.png" and len(choices) == 5, choices
    result["scan"] = {"tags": counts, "gallery": len(gallery)}

    # Gallery click → picker value; picker change → caption and preview
    from gradio.events import SelectData

    gal = comp("training_lab_ds_gallery")
    sel = d.call(gal, "select", {}, event_data=SelectData(gal, {"index": 3, "value": None, "selected": True}))
    picked = sel[0]["value"] if isinstance(sel[0], dict) else sel[0]
    assert picked == "5_sks cat/c2.png", sel
    picker_c = comp("training_lab_ds_picture")
    preview, caption, where, err, _loaded = d.call(picker_c, "change", {**base, picker_c: picked})
    assert caption == "cat, sofa, night" and "c2.txt" in _text(where) and preview is not None, (caption, where, err)

    # Save the caption: only the .txt changes
    save = comp("training_lab_ds_save")
    msg, tags1, _, _loaded = d.call(save, "click", {**base, picker_c: picked,
                                           comp("training_lab_ds_caption"): "sks cat, sofa, night"})
    assert "saved c2.txt" in _text(msg), msg
    assert (data / "5_sks cat" / "c2.txt").read_text() == "sks cat, sofa, night\n"
    # the tag table counts the saved caption (it stayed at the scan's before session 21)
    table = tags1["data"] if isinstance(tags1, dict) else tags1
    # 5: c0, c1, c3 and now c2, plus c0_small's caption from its folder name (4 at the scan)
    assert {r[0]: int(r[1]) for r in table}["sks cat"] == 5, table
    # a caption another program rewrote in place since the editor loaded it is not replaced by a later Save
    c2 = data / "5_sks cat" / "c2.txt"
    with open(c2, "r+", encoding="utf-8") as fh:
        fh.write("sks cat, sofa, rain \n")
    msg, *_ = d.call(save, "click", {**base, picker_c: picked, comp("training_lab_ds_caption"): "sks cat"})
    assert "changed on disk" in _text(msg) and c2.read_text() == "sks cat, sofa, rain \n", msg
    with open(c2, "r+", encoding="utf-8") as fh:
        fh.write("sks cat, sofa, night\n")
    # the refusal left the editor's memory of the loaded caption as it was (a State given an update dict would
    # make every later Save a refusal): the file reads what was loaded again, so Save goes through
    msg, *_ = d.call(save, "click", {**base, picker_c: picked, comp("training_lab_ds_caption"): "sks cat, sofa, night"})
    assert "saved c2.txt" in _text(msg), msg

    # Bulk: preview writes nothing, write changes every caption
    bulk = {**base, comp("training_lab_ds_trigger"): "sks cat", comp("training_lab_ds_add"): "photo",
            comp("training_lab_ds_remove"): "sunny"}
    before = {p.name: p.read_text() for p in (data / "5_sks cat").glob("*.txt")}
    md, _, _, err = d.call(comp("training_lab_ds_bulk_preview"), "click", bulk)
    assert "would change" in _text(md) and not _text(err), (md, err)
    assert {p.name: p.read_text() for p in (data / "5_sks cat").glob("*.txt")} == before
    md, tags2, _, err = d.call(comp("training_lab_ds_bulk_write"), "click", bulk)
    assert "5 captions written" in _text(md), md
    assert (data / "5_sks cat" / "c1.txt").read_text() == "sks cat, garden, photo\n"
    assert (data / "5_sks cat" / "c0_small.txt").read_text() == "sks cat, photo\n"
    table = tags2["data"] if isinstance(tags2, dict) else tags2
    assert {r[0]: r[1] for r in table}["photo"] == 5

    # Buckets and guidance
    md, rows, err = d.call(comp("training_lab_ds_bucket_btn"), "click", base)
    rows = rows["data"] if isinstance(rows, dict) else rows
    assert sum(int(r[3]) for r in rows) == 25 and "batches of 1 per epoch" in _text(md), (md, rows, err)
    md, err = d.call(comp("training_lab_ds_guide"), "click", base)
    assert "steps per epoch" in _text(md) and not _text(err), (md, err)

    # Near-duplicates: found, shown side by side, moved only when confirmed
    md, groups, group, side, err = d.call(comp("training_lab_ds_dupe_btn"), "click", base)
    assert "1 groups of near-duplicates" in _text(md), (md, err)
    assert len(side) == 2, side
    move = comp("training_lab_ds_move")
    out = d.call(move, "click", {**base, comp("training_lab_ds_confirm"): False})
    assert "tick the confirmation" in _text(out[-1]) and (data / "5_sks cat" / "c0_small.png").is_file()
    out = d.call(move, "click", {**base, comp("training_lab_ds_confirm"): True})
    assert "Moved 2 files" in _text(out[0]), out          # the picture and its caption
    assert (data / "_removed" / "5_sks cat" / "c0_small.png").is_file()
    assert not (data / "5_sks cat" / "c0_small.png").exists()
    moved = _pictures(data)
    assert moved.pop("_removed/5_sks cat/c0_small.png") == pics_before.pop("5_sks cat/c0_small.png")
    assert moved == pics_before                          # no picture's bytes changed

    # Class pictures with the standalone host's sampler on the tiny model (the generator streams progress)
    reg_dir = work / "reg" / "1_cat"
    cg = {comp("training_lab_ds_cg_out"): str(reg_dir), comp("training_lab_ds_cg_prompt"): "a photo of a cat",
          comp("training_lab_ds_cg_model"): str(model)}
    for label, value in (("Pictures", 2), ("Width", 64), ("Height", 64), ("Steps", 2)):
        block = next(b for b in d.inputs_of(d.fn_index(comp("training_lab_ds_cg_start"), "click"))
                     if (getattr(b, "label", None) or "").split(" (")[0] == label)
        cg[block] = value
    (md,) = d.call(comp("training_lab_ds_cg_start"), "click", cg)
    assert "2 / 2 class pictures" in _text(md) and "done: 2 rendered" in _text(md), md
    assert len(list(reg_dir.glob("class-*.png"))) == 2
    result["classgen"] = sorted(p.name for p in reg_dir.glob("class-*.png"))

    # The picker shows a file name's control characters escaped and still opens, and saves, that very file: gradio 3
    # has no (label, value) choices, so there its labels are the choices and the tab maps them back. A picture
    # whose real name is the escaped text ("a\\nb.png", a backslash and an n) keeps its own, distinct label.
    odd = work / "odd" / "1_x"
    odd.mkdir(parents=True)
    for name, cap in (("a\nb.png", "newline name"), ("a\\nb.png", "backslash name")):
        (odd / name).write_bytes((data / "5_sks cat" / "c1.png").read_bytes())
        (odd / name).with_suffix(".txt").write_text(cap + "\n")
    obase = {folder: str(work / "odd"), reg: "", ext: ".txt"}
    out = d.call(comp("training_lab_ds_scan"), "click", obase)
    choices = out[5]["choices"]
    labels = [c[0] if isinstance(c, (list, tuple)) else c for c in choices]
    assert labels == ["1_x/a\\nb.png", "1_x/a\\nb.png (2)"], labels          # "\n" sorts before "\\"
    if not d.gradio3:                                  # from gradio 4 the values are the exact names
        assert [c[1] for c in choices] == ["1_x/a\nb.png", "1_x/a\\nb.png"], choices
    for index, (name, cap) in enumerate((("a\nb.png", "newline name"), ("a\\nb.png", "backslash name"))):
        sel = d.call(gal, "select", {}, event_data=SelectData(gal, {"index": index, "value": None, "selected": True}))
        picked = sel[0]["value"] if isinstance(sel[0], dict) else sel[0]
        preview, caption, where, err, _loaded = d.call(picker_c, "change", {**obase, picker_c: picked})
        assert caption == cap, (index, picked, caption, err)
        msg, *_ = d.call(save, "click", {**obase, picker_c: picked, comp("training_lab_ds_caption"): f"saved {index}"})
        assert (odd / name).with_suffix(".txt").read_text() == f"saved {index}\n", (index, msg)
    result["odd_labels"] = labels

    # The Train tab: choosing a method reads the start_from list again, with that method's files as they are now
    host = ctx.host()
    for kind, name in (("lora", "style.safetensors"), ("embedding", "tok.pt")):
        (host.output_dir(kind) / name).parent.mkdir(parents=True, exist_ok=True)
        (host.output_dir(kind) / name).write_bytes(b"x")
    method = comp("training_lab_train_method")

    def offered(update) -> list:
        return [c[-1] if isinstance(c, (list, tuple)) else c for c in update["choices"]]

    for chosen, want in (("embedding", ["", str(host.output_dir("embedding") / "tok.pt")]),
                         ("lora", ["", str(host.output_dir("lora") / "style.safetensors")]), ("dreambooth", [""])):
        out = d.call(method, "change", {method: chosen})
        assert offered(out[-1]) == want, out[-1]

    # The Convert tab's file picker and the Compare tab's run picker show control characters escaped too (they
    # showed them raw), and still convert / open that very file and run
    import torch

    from lib_sdtrain.config import save_config
    from lib_sdtrain.formats.safetensors_io import write_safetensors
    from lib_sdtrain.train.settings import TrainSettings

    host = ctx.host()
    ckpts = Path(host.output_dir("checkpoint"))
    ckpts.mkdir(parents=True, exist_ok=True)
    odd_pickle = ckpts / "odd\nname.ckpt"
    torch.save({"state_dict": {"w": torch.ones(4)}}, odd_pickle)
    conv_folder, conv_files = comp("training_lab_convert_folder"), comp("training_lab_convert_files")
    files_up, _ = d.call(conv_folder, "change", {conv_folder: str(ckpts)})
    conv_labels = [c[0] if isinstance(c, (list, tuple)) else c for c in files_up["choices"]]
    escaped = str(odd_pickle).replace("\n", "\\n")
    assert escaped in conv_labels and not [c for c in conv_labels if "\n" in c], conv_labels
    pick = escaped if d.gradio3 else str(odd_pickle)     # what the page sends back: 3.x the label, 4+ the value
    summary, _ = d.call(comp("training_lab_convert_go"), "click", {conv_files: [pick]})
    assert (ckpts / "odd\nname.safetensors").is_file(), summary
    assert "odd\\nname.ckpt" in _text(summary) and "odd\nname" not in _text(summary), summary

    lora_dir = Path(host.output_dir("lora"))
    lora_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(lora_dir / "oddrun-000001.safetensors", {"x": torch.zeros(1)}, {"ss_epoch": "1", "ss_steps": "3"})
    odd_run = Path(host.output_dir("runs")) / "odd\nrun"
    odd_run.mkdir(parents=True)
    save_config(TrainSettings.from_dict({"name": "oddrun"}), odd_run / "config.toml")
    run_up = d.call(comp("training_lab_compare_refresh"), "click", {})[0]
    run_labels = [c[0] if isinstance(c, (list, tuple)) else c for c in run_up["choices"]]
    escaped = str(odd_run).replace("\n", "\\n")
    assert escaped in run_labels and not [c for c in run_labels if "\n" in c], run_labels
    run_picker = comp("training_lab_compare_run")
    info, *_ = d.call(run_picker, "change", {run_picker: escaped if d.gradio3 else str(odd_run)})
    assert "oddrun-000001.safetensors" in _text(info), info       # the exact folder was opened
    handed = ctx.open_compare(str(odd_run))                       # from the Monitor tab: the same label and pairs
    outputs = ctx.components["compare.open_outputs"]
    picker_up, pairs = handed[outputs.index(run_picker)], handed[-1]
    assert picker_up["value"] == (escaped if d.gradio3 else str(odd_run)), picker_up
    assert (escaped, str(odd_run)) in [tuple(p) for p in pairs]
    result["odd_pickers"] = True
    result["ok"] = True
    return result


# ---- pytest side -----------------------------------------------------------------------------------------
def _run_script(python: Path | str, tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--check", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dataset_tab_under_gradio_3_41_2(tmp_path):
    import pytest

    if not GRADIO3_PYTHON.is_file():
        pytest.skip(".venv-gradio3 is missing: run tools/setup_gradio3.sh to test under gradio 3.41.2 (A1111's pin)")
    if not (ROOT / ".venv-gradio3" / ".training-lab-requirements").is_file():
        pytest.skip(".venv-gradio3 is incomplete (its last tools/setup_gradio3.sh run did not finish)")
    result = _run_script(GRADIO3_PYTHON, tmp_path)
    assert result["gradio"] == "3.41.2" and result["ok"] and result["odd_pickers"]
    assert "dataset_tab" in result["tabs_built"] and len(result["classgen"]) == 2


def test_dataset_tab_under_the_main_gradio(tmp_path):
    import pytest

    gradio = pytest.importorskip("gradio", reason="gradio is not installed in this environment")
    result = _run_script(sys.executable, tmp_path)
    assert result["gradio"] == gradio.__version__ and result["ok"] and result["odd_pickers"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.path.insert(0, str(ROOT))
        work = Path(sys.argv[2])
        work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run_check(work)))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_check(Path(tmp)), indent=2))
