"""bench/tuning_table.py: the tuning table from bench/quality.py files and from `toy quality --json` files."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import tuning_table


def fig(v):
    return {"value": v, "lo": v - 0.1, "hi": v + 0.1}


def row(method="lora", concept="subject"):
    return {"method": method, "concept": concept, "label": "lora / class pictures", "best_step": 200,
            "samples": {"concept": 96, "world": 96}, "seconds": {"train": 12.3},
            "curve": [{"step": 0, "fidelity": fig(0.0)},
                      *({"step": s, "fidelity": fig(f), "binding": fig(b), "bleeding": fig(0.01),
                         "retention": fig(0.95)} for s, f, b in ((100, 0.3, 0.2), (200, 0.6, 0.5)))]}


def test_both_file_kinds_give_one_line_per_save(tmp_path, capsys):
    bench = tmp_path / "bench-variant.json"
    bench.write_text(json.dumps({"label": "wider", "rows": {"lora-style": row(concept="style")}}))
    single = tmp_path / "subject-2400-seed0.json"
    single.write_text(json.dumps(row()))
    assert tuning_table.main([str(bench), str(single)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "variant" not in ln]
    assert len(lines) == 4
    assert lines[0].startswith("| wider | lora-style | 100 | 0.30 [0.20, 0.40] | +0.20")
    assert lines[1].startswith("| wider | lora-style | 200 * | 0.60")
    # a single-row file is named by its file (its own label names the method, not the variant)
    assert lines[2].startswith("| subject-2400-seed0 | lora | 100 |") and lines[3].endswith("| 96/96 | 12 |")


def test_no_files_prints_the_usage():
    assert tuning_table.main([]) == 2
