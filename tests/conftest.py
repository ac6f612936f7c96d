import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A1111 v1.10.1 reference data, kept in the repository (tests/data/golden/README.md says what each file is).
GOLDEN = ROOT / "tests" / "data" / "golden"


def tool_module(name: str):
    """A script of tools/ imported as a module (once per process: Python keeps it in sys.modules)."""
    import importlib

    tools = str(ROOT / "tools")
    sys.path.insert(0, tools)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(tools)


@pytest.fixture(scope="module", autouse=True)
def _torch_threads(request):
    """Every test module runs with a known number of torch threads, whatever the modules before it set: 1, or the
    module's `TORCH_THREADS`. Without this a module that set a count left it to the next ones, so a test's float
    rounding (and speed) depended on which modules ran before it, and a file run alone could behave unlike the
    same file in the suite. The count it found is put back afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(getattr(request.module, "TORCH_THREADS", 1)))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """(Now also what `_torch_threads` gives every module; kept so a module can say that it relies on it.)
    One torch thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models are
    all per-op overhead, and with other processes on the 2 CI cores OpenMP's second thread mostly spins and waits
    (measured 10-100x slower steps)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """{family: path} of tiny sd1 / sd2 / sdxl checkpoints built in code (one set per test module)."""
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("models")
    return {f: make_tiny_checkpoint(folder / f"tiny-{f}.safetensors", f) for f in ("sd1", "sd2", "sdxl")}


def load_tiny(tiny_checkpoints, family):
    """The model parts of one of `tiny_checkpoints`, on the CPU in fp32."""
    from lib_sdtrain.hosts.standalone import StandaloneHost

    return StandaloneHost(device="cpu", dtype="fp32").load(tiny_checkpoints[family])


def golden_rows(name):
    """Rows of a golden TSV file as dicts keyed by its header."""
    lines = (GOLDEN / name).read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"))) for line in lines[1:]]


def golden_shape(cell):
    """A golden `[a,b,c]` shape cell as a tuple (`[]` = 0-dim)."""
    return tuple(int(x) for x in cell.strip("[]").split(",") if x)


def toy_cli(argv):
    """`python -m lib_sdtrain toy ARGV` in-process, through the real CLI (UserError → exit code 2)."""
    from lib_sdtrain.cli import main

    return main(["toy", *argv])


def write_pictures(folder, n=4, *, captions=None, size=64, widen=False, seed=0, box=(16, 48, 16, 48),
                   colour=(255, 0, 0)):
    """n PNG pictures `0.png`... in `folder` (created): a flat random colour (numpy seed `seed`) with a `colour`
    rectangle at rows box[0]:box[1], columns box[2]:box[3]; size x size, every second one 16 px wider with
    `widen` (two aspect buckets). `captions`: None (no caption files), a text whose "{i}" becomes the picture's
    number, or a list used in turn. Returns `folder`."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = np.zeros((size, size + 16 * (i % 2) * widen, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        arr[box[0]:box[1], box[2]:box[3]] = colour
        Image.fromarray(arr).save(folder / f"{i}.png")
        if captions is not None:
            text = captions.replace("{i}", str(i)) if isinstance(captions, str) else captions[i % len(captions)]
            (folder / f"{i}.txt").write_text(text)
    return folder


def make_dataset(root, n=4, size=64, repeats=3, widen=False):
    """A kohya folder `<repeats>_zwx toy` of n flat-colour pictures with a red square and .txt captions.

    widen: every second picture is 16 px wider (two aspect buckets)."""
    write_pictures(root / f"{repeats}_zwx toy", n, size=size, widen=widen, captions="zwx toy, red square, picture {i}")
    return root


def fail_on_batch(monkeypatch, n=2, message="simulated failure"):
    """Make the training loop's n-th batch raise RuntimeError(message): a run that fails part-way. Returns the
    real `train_batch` (to put back with monkeypatch.setattr before the test trains again)."""
    from lib_sdtrain.train import loop

    real, calls = loop.train_batch, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError(message)
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_batch", failing)
    return real


def press_at_step(monkeypatch, n, button):
    """Press one of A1111's buttons mid-picture: A1111's console progress bar (`shared.total_tqdm`; the fake
    WebUI's too) ticks once per sampling step, and at the n-th tick `shared.state.<button>()` runs ("interrupt",
    "skip": what POST /sdapi/v1/interrupt and /sdapi/v1/skip do). Returns the list of ticks (its length counts
    the steps drawn; clear it to count again)."""
    from modules import shared

    ticks = []

    def tick():
        ticks.append(1)
        if len(ticks) == n:
            getattr(shared.state, button)()

    monkeypatch.setattr(shared.total_tqdm, "update", tick)
    return ticks
