"""The standalone web app: the same Dataset / Train / Monitor / Convert / Compare tabs as inside A1111, on the
standalone host (models loaded from files; outputs under --output-root).

Needs gradio (requirements.txt, "standalone app"). Listens on 127.0.0.1 unless told otherwise; the app can
read and write files wherever this process can, so only listen on other addresses on a trusted network.
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
    demo, ctx, launch = make_app(args)
    print(f"Training Lab app on http://{args.host}:{args.port or 7860} (Ctrl-C to quit)", flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, inbrowser=not args.no_browser,
                    show_api=False, **launch)
    finally:
        ctx.jobs.shutdown(timeout=60)
    return 0
