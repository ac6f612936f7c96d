import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOLDEN = ROOT.parent / "shared" / "golden"


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
