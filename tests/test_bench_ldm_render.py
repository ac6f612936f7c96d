"""bench/ldm_render.py without an ldm checkout: it says what it needs and measures nothing."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ldm_render


def test_without_ldm_it_says_so_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert ldm_render.main(["--ldm", str(tmp_path), "--out", str(out), "--grid", ""]) == 0
    assert "no ldm/ found" in capsys.readouterr().out
    assert not out.exists()


def test_without_packages_it_names_them(tmp_path, capsys, monkeypatch):
    (tmp_path / "ldm" / "models" / "diffusion").mkdir(parents=True)
    (tmp_path / "ldm" / "models" / "diffusion" / "ddpm.py").write_text("")
    monkeypatch.setattr(ldm_render, "_missing_packages", lambda: ["omegaconf"])
    out = tmp_path / "r.json"
    assert ldm_render.main(["--ldm", str(tmp_path), "--out", str(out)]) == 0
    assert "missing packages omegaconf" in capsys.readouterr().out
    assert not out.exists()
