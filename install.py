"""A1111 start-up hook: install the few packages Training Lab needs that the WebUI does not ship.

A1111 runs this file in a subprocess on every launch (a1111-host.md §1), so the common case, nothing missing,
must cost nothing: it only reads installed-package metadata (`importlib.metadata`), never calls pip, and
prints nothing. When something is missing it installs exactly the pinned versions below (deps.md §1) with a
constraints file that pins every package already installed to its installed version, plus
`huggingface_hub<1` (transformers 4.30.2 needs it): pip can then only ADD packages, never upgrade, downgrade
or replace one of the host's (A1111 would push an upgraded pin back at the next start, or break).
Packages already present in another version are left alone (one note is printed).

Run by hand: `python install.py` (inside the WebUI's venv), `python install.py --dry-run` to see the pip
command without running it.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Iterable, Optional, Sequence


@dataclass(frozen=True)
class Requirement:
    dist: str                           # distribution name as pip knows it
    version: str                        # the exact version installed when missing
    why: str
    no_deps: bool = False               # install without dependencies (only a data file of it is used)
    exact: bool = False                 # another installed version deserves a note (it may not work)
    when: Callable[[], bool] = lambda: True   # environment condition (a marker)

    @property
    def spec(self) -> str:
        return f"{self.dist}=={self.version}"


# deps.md §1: the newest versions that run with A1111 v1.10's transformers 4.30.2 / accelerate 0.21 / hub 0.36.
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("peft", "0.13.2", "LoRA/LoHa/LoKr layers (0.14+ does not import with transformers 4.30.2)",
                exact=True),
    Requirement("tensorboardX", "2.6.5", "loss curves for TensorBoard (works with protobuf 3.20)"),
    Requirement("tomli", "2.0.1", "reading TOML training configs on Python 3.10",
                when=lambda: sys.version_info < (3, 11)),
    Requirement("ftfy", "6.1.1", "CLIP tokenizer text clean-up (normally present through open-clip-torch)"),
    Requirement("regex", "2023.10.3", "CLIP tokenizer pre-tokenisation (normally present through open-clip-torch)"),
    # Only its bundled BPE vocabulary file is read; A1111 ships it (open_clip is pinned to 2.20.0 there).
    Requirement("open-clip-torch", "2.20.0", "the CLIP BPE vocabulary file", no_deps=True),
)

# Always in the constraints, installed or not.
EXTRA_CONSTRAINTS = ("huggingface_hub<1",)
# The host packages the brief names explicitly; every installed distribution is pinned anyway.
HOST_PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "protobuf", "numpy", "Pillow")


def normalize(name: str) -> str:
    """PEP 503 name normalisation ("Open_Clip.Torch" → "open-clip-torch")."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def installed_distributions() -> dict[str, str]:
    """{normalized name: version} of everything installed in this environment."""
    out: dict[str, str] = {}
    for d in metadata.distributions():
        name = d.metadata["Name"] if d.metadata else None
        if name and d.version:
            out.setdefault(normalize(name), d.version)
    return out


def plan(requirements: Iterable[Requirement], version_of: Callable[[str], Optional[str]]
         ) -> tuple[list[Requirement], list[tuple[Requirement, str]]]:
    """(missing requirements, [(exact requirement, the other version installed)]) for this environment."""
    missing, different = [], []
    for req in requirements:
        if not req.when():
            continue
        have = version_of(req.dist)
        if have is None:
            missing.append(req)
        elif req.exact and have != req.version:
            different.append((req, have))
    return missing, different


def constraint_lines(installed: dict[str, str]) -> list[str]:
    """Every installed distribution pinned to its version, plus the extra caps (sorted, one per line)."""
    lines = [f"{name}=={version}" for name, version in sorted(installed.items())]
    pinned = set(installed)
    for extra in EXTRA_CONSTRAINTS:
        name = normalize(extra.split("<")[0].split("=")[0].split(">")[0])
        if name not in pinned:
            lines.append(extra)
    return lines


def pip_commands(python: str, missing: Sequence[Requirement], constraints_path: str,
                 index_url: str = "") -> list[list[str]]:
    """The pip invocations (one for normal packages, one for --no-deps ones); never -U, always -c."""
    base = [python, "-m", "pip", "install", "--prefer-binary", "--disable-pip-version-check",
            "-c", constraints_path]
    if index_url:
        base += ["--index-url", index_url]
    commands = []
    normal = [r.spec for r in missing if not r.no_deps]
    no_deps = [r.spec for r in missing if r.no_deps]
    if normal:
        commands.append(base + normal)
    if no_deps:
        commands.append(base + ["--no-deps"] + no_deps)
    return commands


def _run(command: list[str]) -> int:
    import subprocess

    return subprocess.run(command).returncode


def main(argv: Sequence[str] | None = None, *, version_of: Callable[[str], Optional[str]] = installed_version,
         distributions: Callable[[], dict[str, str]] = installed_distributions,
         runner: Callable[[list[str]], int] = _run, out: Callable[[str], None] = print) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in argv
    missing, different = plan(REQUIREMENTS, version_of)
    for req, have in different:
        out(f"[Training Lab] note: {req.dist} {have} is installed (tested with {req.version}); left as it is")
    if not missing:
        return 0
    import tempfile

    out("[Training Lab] installing " + ", ".join(r.spec for r in missing)
        + " (pinned; installed packages are held at their versions)")
    fd, path = tempfile.mkstemp(prefix="training-lab-constraints-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(constraint_lines(distributions())) + "\n")
        failed = False
        for command in pip_commands(sys.executable, missing, path, os.environ.get("INDEX_URL", "")):
            if dry_run:
                out(" ".join(command))
                continue
            if runner(command) != 0:
                failed = True
        if failed:
            out("[Training Lab] could not install " + ", ".join(r.spec for r in missing)
                + "; the WebUI's own packages were not changed. Install them by hand in the WebUI's Python.")
            return 1
        return 0
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
