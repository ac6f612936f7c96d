"""Layer rules (style.md §3 "Boundaries"), checked on the source by resolving every import, relative ones too.

Every module of `lib_sdtrain` (and every file in `scripts/`) belongs to one *unit* (`UNITS`: the longest
matching module prefix wins). `ALLOWED[unit]` lists the units it may import; anything else is a violation.
The table itself must be acyclic, so dependencies point one way: scripts → ui → core ← hosts. Imports inside
functions and under `TYPE_CHECKING` count like top-level ones: they are dependencies all the same, and an
import cycle hidden inside a function is still a cycle (checked at module level by `find_cycles`).

External rules: only `hosts.webui` and `scripts/` import A1111 (`modules`, `launch`); only `ui` and `scripts/`
import `gradio`; nothing in `lib_sdtrain` imports the tests; `tomllib` only behind a version check.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "lib_sdtrain"

# unit -> module prefixes (dotted, relative to the repository root; "scripts" is the A1111 entry folder)
UNITS: dict[str, tuple[str, ...]] = {
    "errors": ("lib_sdtrain.errors",),
    "files": ("lib_sdtrain.formats.files", "lib_sdtrain.formats.hashes"),   # leaf helpers: atomic writes, hashes
    "events": ("lib_sdtrain.events",),
    "config": ("lib_sdtrain.config",),
    "sample_settings": ("lib_sdtrain.sample_settings",),
    "formats": ("lib_sdtrain.formats",),
    "tokenizer": ("lib_sdtrain.models.tokenizer", "lib_sdtrain.models.prompt"),
    "data": ("lib_sdtrain.data",),
    "hosts": ("lib_sdtrain.hosts",),              # the Host protocol and ModelParts (hosts/__init__.py)
    "models": ("lib_sdtrain.models",),
    "sampling": ("lib_sdtrain.sampling", "lib_sdtrain.classgen"),
    "methods": ("lib_sdtrain.methods",),
    "train": ("lib_sdtrain.train",),
    "convert": ("lib_sdtrain.convert",),
    "toy": ("lib_sdtrain.toy",),
    "evaluate": ("lib_sdtrain.evaluate",),
    "jobs": ("lib_sdtrain.jobs",),
    "standalone": ("lib_sdtrain.hosts.standalone",),
    "webui": ("lib_sdtrain.hosts.webui",),
    "testing": ("lib_sdtrain.testing",),
    "ui": ("lib_sdtrain.ui",),
    "commands": ("lib_sdtrain.commands", "lib_sdtrain.cli", "lib_sdtrain.__main__"),
    "package": ("lib_sdtrain",),                  # lib_sdtrain/__init__.py: __version__ only
    "scripts": ("scripts",),
}

LEAVES = {"package": set(), "errors": set(), "files": {"errors"}, "events": {"errors"},
          "config": {"errors", "files"}, "sample_settings": {"errors", "config"}}
CORE_BASE = set(LEAVES)
ALLOWED: dict[str, set[str]] = {
    **LEAVES,
    "formats": CORE_BASE,
    "tokenizer": {"errors"},
    "data": CORE_BASE | {"formats", "tokenizer"},                       # data knows no host
    "hosts": CORE_BASE | {"data"},
    "models": CORE_BASE | {"formats", "tokenizer", "hosts"},
    "sampling": CORE_BASE | {"formats", "hosts", "models"},
    "methods": CORE_BASE | {"formats", "tokenizer", "data", "hosts", "models", "sampling"},
    "train": CORE_BASE | {"formats", "tokenizer", "data", "hosts", "models", "sampling", "methods"},
    "convert": CORE_BASE | {"formats", "tokenizer", "hosts", "models"},
    "standalone": CORE_BASE | {"formats", "tokenizer", "hosts", "models", "sampling"},
    "toy": CORE_BASE | {"formats", "tokenizer", "data", "hosts", "models", "sampling", "methods", "train",
                        "standalone"},
    "evaluate": CORE_BASE | {"formats", "tokenizer", "data", "hosts", "models", "sampling", "methods", "train",
                             "convert", "toy"},
    "jobs": CORE_BASE | {"hosts", "methods", "train", "evaluate"},
    "testing": CORE_BASE | {"formats", "tokenizer", "data", "hosts", "models", "sampling", "methods", "train"},
    # the screen: core entry points and the job manager; it is handed a host, it never picks one
    "ui": CORE_BASE | {"formats", "tokenizer", "data", "hosts", "sampling", "methods", "train", "convert", "toy",
                       "evaluate", "jobs"},
    # the command line: everything but A1111's host and the test helpers; it picks the standalone host
    "commands": CORE_BASE | {"formats", "tokenizer", "data", "hosts", "models", "sampling", "methods", "train",
                             "convert", "toy", "evaluate", "jobs", "standalone", "ui"},
    "webui": CORE_BASE | {"formats", "tokenizer", "data", "hosts", "models", "sampling", "methods", "train",
                          "evaluate", "jobs"},
    # A1111's entry: wiring only (style.md: ui, hosts.webui, config, evaluate, jobs)
    "scripts": CORE_BASE | {"ui", "webui", "jobs", "evaluate"},
}

A1111 = {"modules", "launch"}
A1111_OK = {"webui", "scripts"}
GRADIO_OK = {"ui", "scripts"}
TEST_PACKAGES = {"tests", "conftest"}


@dataclass(frozen=True)
class Import:
    source: str       # importing module, dotted
    target: str       # imported module, dotted (relative imports resolved)
    line: int
    path: str         # file, relative to the root


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files(root: Path) -> list[Path]:
    files = sorted((root / PKG).rglob("*.py"))
    if (root / "scripts").is_dir():
        files += sorted((root / "scripts").glob("*.py"))
    return files


def imports_of(path: Path, root: Path, known: set[str]) -> list[Import]:
    """Every import in `path` (also inside functions, under TYPE_CHECKING and `importlib.import_module("...")`),
    with relative imports resolved against the module's package. `from pkg import name` imports the submodule
    `pkg.name` when one exists, else `pkg`."""
    rel = path.relative_to(root).as_posix()
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(name, a.name, node.lineno, rel) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                if node.level - 1 > len(package):
                    raise AssertionError(f"{rel}:{node.lineno}: relative import beyond the top package")
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append(Import(name, sub if sub in known else mod, node.lineno, rel))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            out.append(Import(name, str(node.args[0].value), node.lineno, rel))
    return out


def unit_of(module: str) -> str | None:
    best, size = None, -1
    for unit, prefixes in UNITS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > size:
                best, size = unit, len(p)
    return best


def collect(root: Path) -> tuple[set[str], list[Import]]:
    files = source_files(root)
    known = {module_name(p, root) for p in files}
    return known, [imp for p in files for imp in imports_of(p, root, known)]


def violations(root: Path) -> list[str]:
    """Every import that breaks a rule, as 'file:line: unit imports target (why)'."""
    known, imports = collect(root)
    bad = []
    for imp in imports:
        src = unit_of(imp.source)
        top = imp.target.split(".")[0]
        where = f"{imp.path}:{imp.line}: {imp.source} imports {imp.target}"
        if src is None:
            bad.append(f"{where} (module belongs to no unit: add it to UNITS)")
            continue
        if top in A1111 and src not in A1111_OK:
            bad.append(f"{where} (only hosts/webui.py and scripts/ may import A1111)")
        elif top == "gradio" and src not in GRADIO_OK:
            bad.append(f"{where} (only ui/ and scripts/ may import gradio)")
        elif top in TEST_PACKAGES:
            bad.append(f"{where} (production code never imports the tests)")
        elif top == "tomllib" and "sys.version_info" not in (root / imp.path).read_text(encoding="utf-8"):
            bad.append(f"{where} (tomllib is 3.11+; A1111 runs 3.10: guard it)")
        elif top == PKG or imp.target in known:
            dst = unit_of(imp.target)
            if dst is None:
                bad.append(f"{where} (target belongs to no unit)")
            elif dst != src and dst not in ALLOWED[src]:
                bad.append(f"{where} ({src} may not import {dst})")
    return sorted(set(bad))


def find_cycles(root: Path) -> list[list[str]]:
    """Strongly connected groups of modules (Tarjan) with more than one member, or a module importing itself."""
    known, imports = collect(root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for imp in imports:
        target = imp.target
        while target and target not in known:          # `import a.b.c` of a name inside a module
            target = target.rpartition(".")[0]
        if target and target != imp.source and not _is_parent(target, imp.source):
            graph[imp.source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:   # recursive Tarjan: the graph has a few hundred nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _is_parent(package: str, module: str) -> bool:
    # a submodule importing its own package's __init__ (`from . import X`) is how packages re-export;
    # the package importing its submodules is the other half. Neither is a layering cycle worth flagging.
    return module.startswith(package + ".")


def _table_cycle() -> list[str] | None:
    seen: dict[str, int] = {}

    def dfs(u: str, path: list[str]) -> list[str] | None:
        seen[u] = 1
        for v in sorted(ALLOWED[u]):
            if seen.get(v) == 1:
                return path + [v]
            if v not in seen and (found := dfs(v, path + [v])):
                return found
        seen[u] = 2
        return None

    for u in ALLOWED:
        if u not in seen and (found := dfs(u, [u])):
            return found
    return None


# ---- the rules, on this repository ---------------------------------------------------------------------
def test_layer_table_points_one_way():
    assert set(ALLOWED) == set(UNITS)
    assert all(dst in UNITS for deps in ALLOWED.values() for dst in deps)
    assert _table_cycle() is None, f"ALLOWED has a cycle: {' -> '.join(_table_cycle())}"
    for core in ("config", "events", "data", "methods", "train", "formats", "convert", "evaluate", "models",
                 "toy", "sampling", "hosts", "jobs"):
        assert not ALLOWED[core] & {"ui", "webui", "scripts", "commands", "testing"}, core
    for unit in ALLOWED:
        assert "testing" not in ALLOWED[unit], f"{unit}: production code never imports the test helpers"
        assert "webui" not in ALLOWED[unit] or unit == "scripts", unit
    assert all(ALLOWED[leaf] <= set(LEAVES) for leaf in LEAVES)
    assert "hosts" not in ALLOWED["data"] and "standalone" not in ALLOWED["ui"]


def test_every_import_follows_the_layers():
    bad = violations(ROOT)
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    cycles = find_cycles(ROOT)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_every_internal_import_is_seen():
    # the checker resolves relative imports: it must see (nearly) all of the package's internal imports
    known, imports = collect(ROOT)
    internal = {(i.source, i.target) for i in imports if i.target.split(".")[0] == PKG}
    assert len(internal) > 300
    # `from ..methods import create_method` (two dots, inside a function) and `from . import X` (a submodule)
    assert ("lib_sdtrain.train.loop", "lib_sdtrain.methods") in internal
    assert ("lib_sdtrain.models.checkpoint", "lib_sdtrain.models.ldm_unet") in internal


def test_package_import_is_light():
    code = "import sys, lib_sdtrain, lib_sdtrain.cli, lib_sdtrain.config, lib_sdtrain.events, lib_sdtrain.hosts; " \
           "print(sorted(m for m in ('torch', 'gradio', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---- the checker can fail: planted source trees ----------------------------------------------------------
def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    for d in {p.parent for p in tmp_path.rglob("*.py")}:
        if d.name != "scripts" and d != tmp_path and not (d / "__init__.py").exists():
            (d / "__init__.py").write_text("", encoding="utf-8")
    return tmp_path


def test_planted_webui_import_in_the_core_fails(tmp_path):
    root = _plant(tmp_path, {
        "lib_sdtrain/hosts/webui.py": "from modules import shared\nclass WebUIHost: ...\n",
        "lib_sdtrain/train/loop.py": "def run():\n    from ..hosts.webui import WebUIHost\n    return WebUIHost\n",
    })
    bad = violations(root)
    assert len(bad) == 1 and "lib_sdtrain/train/loop.py:2" in bad[0] and "train may not import webui" in bad[0]


def test_planted_violations_of_each_rule_fail(tmp_path):
    root = _plant(tmp_path, {
        "lib_sdtrain/errors.py": "",
        "lib_sdtrain/config.py": "from .errors import UserError\nfrom .data import scan\n",   # leaf imports up
        "lib_sdtrain/data/scan.py": "from ..hosts import ModelParts\n",                   # data knows no host
        "lib_sdtrain/hosts/standalone.py": "",
        "lib_sdtrain/ui/tabs.py": "import gradio\nfrom ..hosts.standalone import X\n",     # ui picks the host
        "lib_sdtrain/toy/pretrain.py": "from lib_sdtrain.testing.tiny import TEXT\n",       # test helpers
        "lib_sdtrain/methods/lora.py": "import gradio\nimport modules.shared\nimport tests.conftest\n",
        "lib_sdtrain/testing/tiny.py": "",
    })
    text = "\n".join(violations(root))
    for needle in ("config.py:2", "data/scan.py:1", "ui/tabs.py:2", "toy/pretrain.py:1", "methods/lora.py:1",
                   "methods/lora.py:2", "methods/lora.py:3"):
        assert needle in text, (needle, text)
    assert "ui/tabs.py:1" not in text           # gradio is fine in ui/
    assert "config.py:1" not in text            # and errors in a leaf


def test_planted_cycle_inside_functions_is_found(tmp_path):
    root = _plant(tmp_path, {
        "lib_sdtrain/data/scan.py": "def f():\n    from .dedupe import g\n",
        "lib_sdtrain/data/dedupe.py": "def g():\n    from . import features\n",
        "lib_sdtrain/data/features.py": "from .scan import f\n",
        "lib_sdtrain/data/captions.py": "from .scan import f\n",
    })
    assert find_cycles(root) == [["lib_sdtrain.data.dedupe", "lib_sdtrain.data.features", "lib_sdtrain.data.scan"]]
