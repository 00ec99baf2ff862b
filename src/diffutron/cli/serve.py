"""``diffutron serve``: the OpenAI-compatible HTTP server and its web page."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from ..errors import DiffutronError
from ..sampling import SamplerConfig
from ..serve import limits as serve_limits
from ._common import add_model_args, load_lm
from ._sampler import add_sampler_flags, flag_name, sampler_overrides

# SamplerConfig fields each request settles, not the server: it always ends an answer where the
# answer ends (the row goes to the next request), and rows of many requests share a batch, each
# row drawing from its own keyed stream (rng="keyed")
PER_REQUEST = ("stop_at_eos", "rng")
SERVER_NOTES = {
    "steps": "a request that sets max_tokens without steps keeps these defaults' tokens per step",
    "cache": "requests with cfg_scale decode exactly",
    "seed": "the seed the web page sends (turn N: seed + N); an API request without a seed gets a random one",
}


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (batching, streaming) with a live denoising web page",
        description="Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /health, "
                    "and a web page at / that shows the answer denoising. Sampler settings default to the "
                    "paper's (or the flags below); requests override them per call. Not server settings: "
                    f"{', '.join(flag_name(f) for f in PER_REQUEST)} (an answer always ends where it ends; "
                    "each row of a shared batch draws from its own keyed stream).",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send as `model` (default: the model directory's name)")
    p.add_argument("--api-key", default=os.environ.get("DIFFUTRON_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DIFFUTRON_API_KEY, else none)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable; e.g. http://localhost:3000)")
    add_sampler_flags(p, "sampler defaults (the Diffutron paper's; each request may override them)",
                      skip=PER_REQUEST, notes=SERVER_NOTES)
    limits = serve_limits.Limits  # the defaults of Limits, the server's own settings
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch-size", type=int, default=limits.max_batch_size,
                   help="answers decoded together; requests join a running batch at block boundaries "
                        f"(default: {serve_limits.GPU_MAX_BATCH_SIZE} with the model on a GPU, "
                        f"{serve_limits.CPU_MAX_BATCH_SIZE} on a CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode on the compiled engine (CUDA graphs + torch.compile on a GPU), compiled and "
                        "warmed up before the port accepts requests (tens of seconds, once) "
                        "(default: on with a GPU, off on a CPU)")
    g.add_argument("--max-queue", type=int, default=limits.max_queue,
                   help="requests allowed to wait; more get HTTP 429 (default %(default)s)")
    g.add_argument("--batch-wait-ms", type=float, default=limits.batch_wait_ms,
                   help="longest wait for requests sent at about the same moment to share a batch; the batch "
                        f"starts as soon as arrivals pause for {serve_limits.QUIET_S * 1000:g} ms (default %(default)g)")
    g.add_argument("--max-prompt-tokens", type=int, default=limits.max_prompt_tokens,
                   help="longest prompt accepted (default: the context)")
    g.add_argument("--max-tokens", type=int, default=limits.max_tokens,
                   help="largest max_tokens accepted (default: the context)")
    g.add_argument("--max-steps", type=int, default=limits.max_steps, help="largest steps accepted (default %(default)s)")
    g.add_argument("--max-n", type=int, default=limits.max_n,
                   help="largest n (answers per prompt) accepted (default %(default)s)")
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
    overrides = sampler_overrides(args)
    cache = overrides.pop("cache", None)  # set with the weights below (--fast picks one when not given)
    SamplerConfig(**overrides)  # a bad setting fails before the model loads
    sock = _bind(args.host, args.port)  # fail early, with a clear message, when the port is taken
    lm = load_lm(args)
    max_batch = args.max_batch_size
    if max_batch is None:
        max_batch = serve_limits.default_max_batch_size(lm)
        limits.max_batch_size = max_batch
    lm.defaults = lm.defaults.replace(**overrides)
    if args.fast or args.fast_mode:
        lm.make_fast(args.fast_mode, cache=cache)  # None: the device's --fast defaults
    elif cache is not None:
        lm.use_cache(cache)
    compile_ = lm.device.type == "cuda" if args.compile is None else args.compile
    if compile_:
        lm.compile(max_batch=max_batch)
    app = create_app(lm, served_model_name=args.served_model_name, limits=limits, api_key=args.api_key or None,
                     cors_origins=args.cors_origin)
    if compile_:
        _warm_up(app.state.service, max_batch)
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


def _warm_up(service, max_batch: int) -> None:
    """Compile the engine and capture its graphs for a default request now, not in the first requests."""
    print(f"diffutron: compiling and warming up the decoding engine (batch 1 and {max_batch}; tens of "
          "seconds on a GPU, once)...", file=sys.stderr, flush=True)
    done = service.warm_up()
    if done is None:
        print("diffutron: no warm-up: the default settings run on the eager sampler (the delayed cache)",
              file=sys.stderr, flush=True)
        return
    alone = (f"; the engine alone at batch {done['batch']}: {done['tokens_per_s']:,.0f} tokens/s"
             if done["tokens_per_s"] else "")
    print(f"diffutron: engine warmed up in {done['seconds']:.1f} s (compiling and graph capture "
          f"{service.lm.compile_seconds:.1f} s){alone}", file=sys.stderr, flush=True)


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
