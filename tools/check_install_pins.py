"""Check that install.py never changes a package A1111 v1.10 pins.

Builds a throw-away venv holding A1111 v1.10.1's pins that install on this machine (deps.md §1), records
`pip freeze`, runs the extension's install.py in it the way A1111 does (a subprocess with the WebUI's Python),
records `pip freeze` again, diffs the two, times a second (no-op) run, and checks that what was installed
imports. Writes a report (default bench/results/install_pins.txt); exit status 1 if a pinned package changed.

Stand-ins, said in the report: torch is the local torch==2.13.0 CPU wheel (A1111 uses 2.1.2+cu121, not
installable here) and Python is 3.11 (the wheel's; A1111 is tested on 3.10.6).

Usage: python tools/check_install_pins.py [--python python3.11] [--torch-wheel PATH] [--out FILE] [--keep]
"""

from __future__ import annotations

import argparse
import difflib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A1111 v1.10.1 requirements_versions.txt pins (deps.md §1) that matter to install.py's packages and install
# without CUDA: the ML stack peft/tensorboardX resolve against, the web stack, and what the tokenizer uses.
A1111_PINS = [
    "transformers==4.30.2", "accelerate==0.21.0", "safetensors==0.4.2", "numpy==1.26.2", "Pillow==9.5.0",
    "protobuf==3.20.0", "fastapi==0.94.0", "httpx==0.24.1", "omegaconf==2.2.3", "einops==0.4.1",
    "psutil==5.9.5", "huggingface_hub<1",
]
# open-clip-torch is pinned too; its dependencies would pull torchvision (and a second torch): A1111 installs it
# with torch already present, so here it goes in without them, plus the two it needs for its tokenizer.
NO_DEPS = ["open-clip-torch==2.20.0"]
TOKENIZER_DEPS = ["ftfy==6.1.1", "regex==2023.10.3"]
PINNED_NAMES = {"torch", "transformers", "accelerate", "safetensors", "numpy", "pillow", "protobuf", "fastapi",
                "httpx", "omegaconf", "einops", "psutil", "open-clip-torch", "huggingface-hub", "tokenizers",
                "ftfy", "regex"}


def run(cmd: list[str], log: list[str], check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    log.append("$ " + " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    tail = (out.stdout + out.stderr).strip().splitlines()[-5:]
    log += ["  " + line for line in tail]
    if check and out.returncode != 0:
        raise SystemExit("\n".join(log))
    return out


def freeze(python: str, log: list[str]) -> list[str]:
    out = run([python, "-m", "pip", "freeze", "--all"], log)
    return sorted(line for line in out.stdout.splitlines() if line.strip())


def name_of(line: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", line.split("==")[0].split(" @ ")[0]).lower()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default="python3.11")
    ap.add_argument("--torch-wheel", default=next(iter(sorted(glob.glob("/opt/wheels/torch-2.13.0*.whl"))), ""))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "install_pins.txt"))
    ap.add_argument("--keep", action="store_true", help="keep the venv (its path is printed)")
    args = ap.parse_args(argv)
    log: list[str] = []
    venv = Path(tempfile.mkdtemp(prefix="a1111-pins-"))
    py = str(venv / "bin" / "python")
    try:
        run([args.python, "-m", "venv", str(venv)], log)
        pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--prefer-binary"]
        torch_req = args.torch_wheel or "torch==2.13.0"
        run(pip + [torch_req, *A1111_PINS, *TOKENIZER_DEPS], log)
        run(pip + ["--no-deps", *NO_DEPS], log)
        before = freeze(py, log)

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        first = run([py, str(ROOT / "install.py")], log, env=env)
        t_install = time.perf_counter() - t0
        after = freeze(py, log)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            second = run([py, str(ROOT / "install.py")], log, env=env)
            times.append(time.perf_counter() - t0)
        imports = run([py, "-c", "import peft, tensorboardX, transformers, torch; "
                       "from peft.tuners.lora import layer; from peft.tuners.loha import layer as l2; "
                       "from peft.tuners.lokr import layer as l3; "
                       "print('imports ok: peft', peft.__version__, 'tensorboardX', tensorboardX.__version__, "
                       "'transformers', transformers.__version__, 'torch', torch.__version__)"], log, check=False)

        b, a = {name_of(x): x for x in before}, {name_of(x): x for x in after}
        changed = sorted(n for n in b if n in a and a[n] != b[n])
        removed = sorted(n for n in b if n not in a)
        added = sorted(a[n] for n in a if n not in b)
        pinned_changed = [n for n in changed + removed if n in PINNED_NAMES]
        ok = not changed and not removed and imports.returncode == 0 and second.stdout.strip() == ""

        lines = [
            "install.py against A1111 v1.10.1's pins (tools/check_install_pins.py)",
            f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}",
            f"python: {subprocess.run([py, '-V'], capture_output=True, text=True).stdout.strip()} "
            "(stand-in: A1111 is tested on 3.10.6; the local torch wheel is cp311)",
            f"torch: {Path(torch_req).name} (stand-in for A1111's torch==2.1.2+cu121)",
            "pins installed: " + " ".join([*A1111_PINS, *TOKENIZER_DEPS]) + " + --no-deps " + " ".join(NO_DEPS),
            "",
            "first install.py run (missing packages installed):",
            *["  " + x for x in (first.stdout + first.stderr).splitlines() if x.startswith("[Training Lab]")],
            "  pip's last lines:",
            *["    " + x for x in (first.stdout + first.stderr).strip().splitlines()[-4:]],
            f"  took {t_install:.1f} s",
            "second install.py run (nothing missing): output " + (repr(second.stdout.strip()) or "''")
            + f"; wall time per run incl. interpreter start-up: "
              f"min {min(times) * 1000:.0f} ms, median {sorted(times)[len(times) // 2] * 1000:.0f} ms (5 runs)",
            "",
            f"packages added ({len(added)}): " + ", ".join(added),
            f"packages changed: {changed or 'none'}",
            f"packages removed: {removed or 'none'}",
            f"pinned packages changed: {pinned_changed or 'none'}",
            "",
            imports.stdout.strip() or ("import check FAILED: " + (imports.stderr.strip().splitlines() or ["?"])[-1]),
            "",
            "RESULT: " + ("PASS - no installed package was changed; only new packages were added"
                          if ok else "FAIL"),
            "",
            "diff of pip freeze (before → after):",
            *difflib.unified_diff(before, after, "before", "after", lineterm="", n=0),
            "",
            "pip freeze after:",
            *["  " + x for x in after],
        ]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print("\n".join(lines[:22]))
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"venv kept at {venv}")
        else:
            shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
