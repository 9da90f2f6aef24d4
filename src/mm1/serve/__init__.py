"""`mm1 serve CHECKPOINT`: an OpenAI-compatible chat server with a chat page (`mm1[serve]`).

The web stack (FastAPI, uvicorn) is imported only when a server starts, so the rest of mm1 runs
without it.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mm1.config import ConfigError

if TYPE_CHECKING:
    import uvicorn


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a run directory, one of its checkpoints (RUN/checkpoints/step_N), an export, or a "
        "transformers LLaVA / LLaVA-NeXT / Fuyu directory",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: loopback)"
    )
    p.add_argument(
        "--port",
        type=int,
        default=8000,
        help="default 8000; 0: a free port (the banner says which)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="the name clients ask for (default: the directory's name)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="a built-in (plain, vicuna_v1 or its alias llava_v1, chatml, llama3), a .jinja file, or one of the "
        "tokenizer's named templates (default: the model's own, else plain)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument(
        "--max-waiting", type=int, default=64, help="requests queued beyond those (then HTTP 429)"
    )
    p.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds a request may take in all"
    )
    p.add_argument(
        "--image-dir",
        default=None,
        help="allow image_url parts naming local files under this folder (default: data URLs only)",
    )
    p.add_argument("--max-image-mb", type=float, default=20.0, help="the largest image accepted")
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=100.0,
        help="the largest request body accepted, images included (base64: 4/3 of their bytes)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=8192 * 8192,  # protocol.MAX_IMAGE_PIXELS, not imported: it pulls in PIL
        help="the most pixels an image's header may declare (default: 8192x8192; 0 = no limit): "
        "a small PNG can decode to gigabytes",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step at fixed shapes (a CUDA graph per step on GPU) before "
        "serving",
    )
    from mm1.inference_options import TEMPLATE_KWARGS_HELP, add_runtime_arguments

    p.add_argument(
        "--chat-template-kwargs",
        default=None,
        help=TEMPLATE_KWARGS_HELP + "; a request's chat_template_kwargs (vLLM's field) add to them",
    )
    add_runtime_arguments(p)  # --device, --dtype: as every command's


def check_arguments(args: argparse.Namespace) -> None:
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_waiting < 0:
        raise ConfigError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.max_body_mb <= 0:
        raise ConfigError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if args.request_timeout <= 0:
        raise ConfigError(f"--request-timeout must be > 0, got {args.request_timeout}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.max_image_pixels < 0:
        raise ConfigError(
            f"--max-image-pixels must be >= 0 (0 = no limit), got {args.max_image_pixels}"
        )
    if args.image_dir is not None and not Path(args.image_dir).is_dir():
        raise ConfigError(f"--image-dir: no folder {args.image_dir}")


def bind_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening: connections are refused until the
    server listens), or a one-line error naming --port or --host."""
    # As uvicorn binds: IPv6 for an address with a colon, SO_REUSEADDR (a port in TIME_WAIT
    # after a restart is free; one being listened on is not).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        why = err.strerror or str(err)
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"--port {port}: {host}:{port} is already in use (another server?): stop it or "
                "pick another --port"
            ) from None
        if err.errno == errno.EACCES:
            raise ConfigError(
                f"--port {port}: not allowed to listen there ({why}; ports below 1024 need "
                "privileges): pick another --port"
            ) from None
        raise ConfigError(f"--host {host}: cannot listen there ({why})") from None
    return sock


def run(args: argparse.Namespace) -> int | None:
    """Load the model and serve until interrupted."""
    check_arguments(args)
    from mm1.inference_options import template_kwargs

    kwargs = template_kwargs(args.chat_template_kwargs)
    try:
        import uvicorn

        from mm1.serve.app import create_app
    except ImportError as err:
        raise ConfigError(
            f"mm1 serve needs the web stack: pip install 'mm1[serve]' ({err})"
        ) from None
    from mm1.chat import resolve_chat_template, template_variables
    from mm1.pretrained import load_pretrained
    from mm1.reasoning import chat_reasoning
    from mm1.serve.engine import Engine
    from mm1.serve.protocol import ServeOptions

    # The port first: taken or not allowed is known at once, not after the model has loaded.
    sock = bind_port(args.host, args.port)
    try:
        p = load_pretrained(args.model, args.device, args.dtype)
        template = resolve_chat_template(p.tokenizer, args.chat_template)
        if template.notice:
            print(f"note: {template.notice}", file=sys.stderr)
        variables = template_variables(template, p.tokenizer, kwargs)  # checked before serving
        opts = ServeOptions(
            model_name=args.model_name or Path(args.model).resolve().name,
            chat_template=template.source,
            image_dir=Path(args.image_dir) if args.image_dir else None,
            max_image_bytes=int(args.max_image_mb * 2**20),
            max_image_pixels=args.max_image_pixels,
            max_body_bytes=int(args.max_body_mb * 2**20),
            request_timeout=args.request_timeout,
            template_kwargs=kwargs,
            reasoning=chat_reasoning(template.source, variables),
        )
        engine = Engine(
            p.model,
            p.tokenizer,
            max_batch=args.max_batch,
            max_waiting=args.max_waiting,
            compile=args.compile,
        )
        app = create_app(p, engine, opts)
        host = f"[{args.host}]" if ":" in args.host else args.host
        banner = (
            f"serving {opts.model_name!r} ({p.runtime['device']}, {p.runtime['dtype']}; chat "
            f"template: {template.name}) on "
            f"http://{host}:{sock.getsockname()[1]}/ — the chat page is at /, the API at /v1"
        )
        # Not started (the app's start-up failed; uvicorn logged why): exit 1, as uvicorn.run.
        return None if serve_on(uvicorn.Config(app, log_level="warning"), sock, banner) else 1
    finally:
        sock.close()


def serve_on(config: uvicorn.Config, sock: socket.socket, banner: str) -> bool:
    """Serve on the bound `sock` until stopped, printing `banner` once listening; whether the
    server started."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # listening: only now is "serving" true
                print(banner, file=sys.stderr, flush=True)

    server = Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down on Ctrl-C, then raises it again: a normal stop once serving.
        if not server.started:
            raise
    return server.started
