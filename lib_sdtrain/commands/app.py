"""The standalone web app: the same Dataset / Train / Monitor / Convert / Compare tabs as inside A1111, on the
standalone host (models loaded from files; outputs under --output-root).

Needs gradio (requirements.txt, "standalone app"). Listens on 127.0.0.1 unless told otherwise. The app starts
jobs and reads and writes files wherever this process can, so listening on any other address needs a login
(`--auth USER:PASSWORD`, or the TRAINING_LAB_AUTH environment variable): without one it refuses to start.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860, or the next free)")
    parser.add_argument("--model", default=None,
                        help="base model file shown in the Train tab (default: the bundled toy model)")
    parser.add_argument("--output-root", default=None,
                        help="folder for outputs: Lora/, embeddings/, runs/ ... (default: $TRAINING_LAB_OUTPUT "
                             "or ./outputs)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="dtype of the frozen base model (auto: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD[,USER2:PASSWORD2]",
                        help="ask for a login (required when --host is not a loopback address; default: "
                             "$TRAINING_LAB_AUTH)")


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """[(user, password)] from "user:pass,user2:pass2" (A1111's --api-auth rule: split at the first colon)."""
    from ..errors import UserError

    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth wants USER:PASSWORD (several separated by commas)")
        pairs.append((user, password))
    return pairs


def check_listen(host: str, auth: list[tuple[str, str]]) -> None:
    """Refuse to serve beyond this computer without a login: anyone who reaches the port could start jobs."""
    from ..errors import UserError

    if (host or "").strip().lower() not in LOOPBACK_HOSTS and not auth:
        raise UserError(f"listening on {host} lets other computers start training jobs and write files: give "
                        "--auth USER:PASSWORD (or set TRAINING_LAB_AUTH), or listen on 127.0.0.1")


def check_output_root(root: str | None) -> None:
    """Refuse an output root the jobs could not write to (a file, a folder under a file, a read-only place):
    otherwise the server starts and every job fails on it."""
    from ..errors import UserError
    from ..hosts import standalone_output_root
    from ..train.preflight import check_writable

    folder = standalone_output_root(root)
    if folder.exists() and not folder.is_dir():
        where = "--output-root" if root else "--output-root (or $TRAINING_LAB_OUTPUT)"
        raise UserError(f"the output root {folder} is a file, not a folder: give {where} a folder (it is made "
                        "if missing)")
    check_writable(folder, "output root")


def standalone_context(model: str | None = None, output_root: str | None = None, device: str | None = None,
                       dtype: str = "auto"):
    """A UiContext over the standalone host: what `python -m lib_sdtrain app` serves (the screen is handed its
    host; it never picks one)."""
    from ..hosts.standalone import StandaloneHost, default_model
    from ..jobs import JobManager
    from ..ui.context import UiContext

    def host_factory() -> Any:
        return StandaloneHost(device=device, dtype=dtype, output_root=output_root)

    if model is None:
        try:
            model = str(default_model())
        except Exception:  # noqa: BLE001 - no bundled toy model: the user must pick one
            model = ""
    return UiContext(host_factory=host_factory, jobs=JobManager(host_factory), in_webui=False,
                     default_model=model or "")


def make_app(args: argparse.Namespace):
    """(blocks, ctx, launch kwargs) without launching: what `run` serves; tests build it the same way."""
    from ..errors import UserError

    import importlib.util

    if importlib.util.find_spec("gradio") is None:   # gradio itself is imported by ui/ only (test_boundaries)
        raise UserError("the app needs gradio: pip install 'gradio>=4.40,<6' (see requirements.txt)")
    from ..ui import compat
    from ..ui.tabs import build_app

    ctx = standalone_context(model=args.model, output_root=args.output_root, device=args.device, dtype=args.dtype)
    demo, launch = build_app(ctx)
    compat.queue(demo, concurrency=4)
    return demo, ctx, launch


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import UserError

    if args.port is not None and not 1 <= args.port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, not {args.port}")
    auth = parse_auth(args.auth if args.auth is not None else os.environ.get("TRAINING_LAB_AUTH"))
    check_listen(args.host, auth)   # before anything is built
    check_output_root(args.output_root)
    demo, ctx, launch = make_app(args)
    if auth:
        launch = {**launch, "auth": auth}
    print(f"Training Lab app on http://{args.host}:{args.port or 7860} (Ctrl-C to quit)", flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, inbrowser=not args.no_browser,
                    show_api=False, **launch)
    except OSError as e:     # the port is taken, or the address is not this computer's
        raise UserError(f"cannot listen on {args.host}:{args.port or 7860}: {e}") from None
    finally:
        ctx.jobs.shutdown(timeout=60)
    return 0
