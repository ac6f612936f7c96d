"""Import rules (style.md §3 Boundaries), checked on the source: the core never imports A1111 or gradio."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lib_sdtrain"

HOST_ONLY = {"modules", "launch", "scripts"}   # A1111's top-level packages
UI_ONLY = {"gradio"}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            out.append((node.lineno, str(node.args[0].value)))
    return out


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_core_never_imports_a1111_or_gradio():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = _rel(path)
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top in HOST_ONLY and rel != "lib_sdtrain/hosts/webui.py":
                bad.append(f"{rel}:{line} imports {name}")
            if top in UI_ONLY and not rel.startswith("lib_sdtrain/ui/"):
                bad.append(f"{rel}:{line} imports {name}")
            if name.startswith("lib_sdtrain.hosts.webui") and not rel.startswith("lib_sdtrain/hosts/"):
                bad.append(f"{rel}:{line} imports the WebUI adapter")
            if name.split(".")[0] == "tomllib":
                bad.append(f"{rel}:{line} imports tomllib unguarded") if "sys.version_info" not in path.read_text() else None
    assert not bad, "\n".join(bad)


def test_ui_never_imports_a1111():
    for path in sorted((PKG / "ui").rglob("*.py")):
        for line, name in _imports(path):
            assert name.split(".")[0] not in HOST_ONLY, f"{_rel(path)}:{line} imports {name}"


def test_the_checker_sees_violations(tmp_path):
    # The rule above must be able to fail: feed it a file that breaks it.
    f = tmp_path / "x.py"
    f.write_text("import modules.shared\nfrom gradio import Blocks\nimportlib.import_module('launch')\n")
    names = {n for _, n in _imports(f)}
    assert {"modules.shared", "gradio", "launch"} <= names


def test_package_import_is_light():
    code = "import sys, lib_sdtrain, lib_sdtrain.cli, lib_sdtrain.config, lib_sdtrain.events, lib_sdtrain.hosts; " \
           "print(sorted(m for m in ('torch', 'gradio', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
