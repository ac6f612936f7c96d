import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A1111 v1.10.1 reference data, kept in the repository (tests/data/golden/README.md says what each file is).
GOLDEN = ROOT / "tests" / "data" / "golden"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models are
    all per-op overhead, and with other processes on the 2 CI cores OpenMP's second thread mostly spins and waits
    (measured 10-100x slower steps)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def make_dataset(root, n=4, size=64, repeats=3, widen=False):
    """A kohya folder `<repeats>_zwx toy` of n flat-colour pictures with a red square and .txt captions.

    widen: every second picture is 16 px wider (two aspect buckets)."""
    import numpy as np
    from PIL import Image

    folder = root / f"{repeats}_zwx toy"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = np.zeros((size, size + 16 * (i % 2) * widen, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        arr[16:48, 16:48] = [255, 0, 0]
        Image.fromarray(arr).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zwx toy, red square, picture {i}")
    return root
