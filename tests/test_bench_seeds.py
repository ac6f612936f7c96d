"""bench/seeds.py: ours vs. reference over training seeds (t intervals over seeds, paired differences)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import seeds


def result(path, seed, ours, ref, ref_seed=None):
    def row(values, s):
        return {"settings": {"seed": s}, **{f: {"value": v, "lo": v - 0.1, "hi": v + 0.1} for f, v in
                                            zip(seeds.FIGURES, values)}}

    path.write_text(json.dumps({"rows": {"lora": row(ours, seed), "reference": row(ref, seed if ref_seed is None
                                                                                  else ref_seed)}}))
    return path


def test_seed_level_means_intervals_and_target(tmp_path):
    files = [result(tmp_path / "a.json", 0, (0.5, 0.40, 0.1, 0.8), (0.7, 0.55, 0.1, 0.8)),
             result(tmp_path / "b.json", 1, (0.7, 0.60, 0.2, 0.8), (0.5, 0.35, 0.1, 0.8)),
             result(tmp_path / "c.json", 2, (0.6, 0.50, 0.1, 0.9), (0.6, 0.45, 0.1, 0.8))]
    table = seeds.summarise(seeds.collect(files))
    b = table["figures"]["binding"]
    assert b["ours"]["value"] == pytest.approx(0.5) and b["reference"]["value"] == pytest.approx(0.45)
    # t(2) = 4.303, sd 0.1, n 3 -> half width 0.248
    assert b["ours"]["hi"] - b["ours"]["value"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5, abs=1e-3)
    assert b["ours_minus_reference"]["value"] == pytest.approx(0.05) and b["ours"]["n"] == 3
    assert all(t["met"] for t in table["targets"]) and len(table["targets"]) == 2
    # a loop far behind on every seed misses the target
    worse = [result(tmp_path / f"w{i}.json", i, (0.2 + i / 100, 0.1, 0.1, 0.8), (0.8 - i / 100, 0.6, 0.1, 0.8))
             for i in range(3)]
    assert not seeds.summarise(seeds.collect(worse))["targets"][0]["met"]


def test_bad_inputs_are_refused_clearly(tmp_path):
    a = result(tmp_path / "a.json", 0, (0.5,) * 4, (0.5,) * 4)
    with pytest.raises(SystemExit, match="two training seeds"):
        seeds.collect([a])
    with pytest.raises(SystemExit, match="twice"):
        seeds.collect([a, result(tmp_path / "b.json", 0, (0.5,) * 4, (0.5,) * 4)])
    with pytest.raises(SystemExit, match="different seeds"):
        seeds.collect([result(tmp_path / "c.json", 0, (0.5,) * 4, (0.5,) * 4, ref_seed=3)])
    (tmp_path / "d.json").write_text(json.dumps({"rows": {"lora": {}}}))
    with pytest.raises(SystemExit, match="no reference row"):
        seeds.collect([tmp_path / "d.json"])


def test_one_row_over_seeds_and_two_settings_paired_by_seed(tmp_path):
    new = [result(tmp_path / f"n{i}.json", i, (0.6 + i / 10, 0.5, 0.0, 0.9), (0.0,) * 4) for i in range(3)]
    old = [result(tmp_path / f"o{i}.json", i, (0.5 + i / 10, 0.4, 0.1, 0.8), (0.0,) * 4) for i in range(3)]
    one = seeds.over_seeds(seeds.collect_row(new, "lora"))
    assert one["seeds"] == [0, 1, 2] and one["figures"]["fidelity"]["value"] == pytest.approx(0.7)
    assert one["figures"]["fidelity"]["hi"] - 0.7 == pytest.approx(4.303 * 0.1 / 3 ** 0.5, abs=1e-3)
    pair = seeds.compare(seeds.collect_row(new, "lora"), seeds.collect_row(old, "lora"), ("new", "old"))
    d = pair["figures"]["fidelity"]["new_minus_old"]
    assert d["value"] == pytest.approx(0.1) and d["hi"] - d["lo"] == pytest.approx(0.0, abs=1e-9)   # same gap
    assert pair["per_seed"]["1"]["old"]["bleeding"] == pytest.approx(0.1)
    # the command: a row summary must name its output (the default file is the ours-vs-reference summary)
    with pytest.raises(SystemExit, match="needs --out"):
        seeds.main(["--row", "lora", *map(str, new)])
    out = tmp_path / "pair.json"
    assert seeds.main(["--row", "lora", *map(str, new), "--against", *map(str, old), "--names", "new,old",
                       "--out", str(out)]) == 0
    assert json.loads(out.read_text())["figures"]["binding"]["new_minus_old"]["value"] == pytest.approx(0.1)
    with pytest.raises(SystemExit, match="share 1 training seed"):
        seeds.compare(seeds.collect_row(new, "lora"), {0: {}, 9: {}}, ("a", "b"))
    with pytest.raises(SystemExit, match="no style row"):
        seeds.collect_row(new, "style")
    with pytest.raises(SystemExit, match="needs --row"):
        seeds.main([*map(str, new), "--against", *map(str, old)])
