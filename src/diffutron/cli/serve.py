"""``diffutron serve``: the OpenAI-compatible HTTP server and its web page."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from ..errors import DiffutronError
from ..sampling import CACHES
from ._common import add_model_args, load_lm


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (batching, streaming) with a live denoising web page",
        description="Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /health, "
                    "and a web page at / that shows the answer denoising. Sampler settings default to the "
                    "paper's; requests override them per call.",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send as `model` (default: the model directory's name)")
    p.add_argument("--api-key", default=os.environ.get("DIFFUTRON_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DIFFUTRON_API_KEY, else none)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable; e.g. http://localhost:3000)")
    p.add_argument("--fast", choices=["bf16", "int8"], nargs="?", const="bf16", default=None,
                   help="approximate but faster weights: bf16 (default for --fast) or int8 dynamic quantization, "
                        "and the delayed cache unless --cache says otherwise")
    p.add_argument("--cache", choices=CACHES, default=None,
                   help="key/value reuse for requests without cfg_scale (ModernBERT): delayed (default with --fast), "
                        "dual (Fast-dLLM's DualCache alone) or none (exact; the default)")
    p.add_argument("--cache-refresh", type=int, default=0, metavar="R",
                   help="with a cache, also refresh it after every R window steps (default 0: only when a block "
                        "starts)")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch-size", type=int, default=16, help="answers decoded together in one batch (default 16)")
    g.add_argument("--max-queue", type=int, default=256, help="requests allowed to wait; more get HTTP 429 (default 256)")
    g.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="longest wait for requests sent at about the same moment to share a batch; the batch "
                        "starts as soon as arrivals pause for 2 ms (default 20)")
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: the context)")
    g.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens accepted (default: the context)")
    g.add_argument("--max-steps", type=int, default=1024, help="largest steps accepted (default 1024)")
    g.add_argument("--max-n", type=int, default=8, help="largest n (answers per prompt) accepted (default 8)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import Limits, create_app
    except ModuleNotFoundError as err:
        raise DiffutronError(f"the server needs {err.name}: pip install 'diffutron[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise DiffutronError(f"--port must be 0..65535, got {args.port}")
    limits = Limits(max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens, max_steps=args.max_steps, max_n=args.max_n,
                    batch_wait_ms=args.batch_wait_ms)
    sock = _bind(args.host, args.port)  # fail early, with a clear message, when the port is taken
    lm = load_lm(args)
    if args.fast:
        if not hasattr(lm, "make_fast"):
            raise DiffutronError("--fast is not available in this build")
        lm.make_fast(args.fast, cache=args.cache or "delayed")
    elif args.cache is not None:
        lm.use_cache(args.cache)
    if args.cache_refresh:
        lm.defaults = lm.defaults.replace(cache_refresh=args.cache_refresh)
    app = create_app(lm, served_model_name=args.served_model_name, limits=limits, api_key=args.api_key or None,
                     cors_origins=args.cors_origin)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"diffutron: serving {app.state.service.model_name!r} on http://{shown}:{port} "
          f"(web page at /, API at /v1{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after a clean shutdown
        pass
    print("diffutron: server stopped", file=sys.stderr)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise DiffutronError(f"cannot listen on {host}:{port}: {err.strerror} (pick another --port or --host)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
