"""HTTP routes of the OpenAI-compatible server (FastAPI); the work happens in ``service.py``.

Errors always have OpenAI's body ``{"error": {"message", "type", "param", "code"}}``:
400 malformed JSON, 401 bad API key, 404 unknown model or route, 405 wrong method, 413 body or
prompt too large, 422 invalid fields, 429 queue full. An unexpected failure is a 500 with a
generic message (the traceback goes to the server log, never into a response).
"""

from __future__ import annotations

import hmac
import html
import json
import re
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..lm import DiffusionLM
from . import protocol as P
from .service import Limits, OpenAIService, ServiceError

log = logging.getLogger("diffutron.serve")

MAX_REQUEST_BYTES = 4 * 1024 * 1024
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def create_app(
    lm: DiffusionLM,
    *,
    served_model_name: str | None = None,
    limits: Limits | None = None,
    api_key: str | None = None,
    cors_origins: list[str] | tuple[str, ...] = (),
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``lm``: OpenAI routes under ``/v1``, ``/health`` and the web page at ``/``."""
    service = OpenAIService(lm, served_model_name=served_model_name, limits=limits)
    pages = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in STATIC}
    pages["index.html"] = render_page(pages["index.html"].decode("utf-8"), page_defaults(service)).encode("utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="diffutron", summary="OpenAI-compatible server for masked diffusion LMs",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    # ------------------------------------------------------------------------------ errors
    def error(err: ServiceError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, err: ServiceError):
        return error(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            return error(ServiceError(404, f"no route {request.method} {request.url.path}", code="not_found"))
        if err.status_code == 405:
            return error(ServiceError(405, f"method {request.method} is not allowed on {request.url.path}",
                                      code="method_not_allowed"))
        return error(ServiceError(err.status_code, str(err.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return error(ServiceError(422, "invalid request"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(ServiceError(500, "internal server error; the server logged the details",
                                  type="server_error", code="internal_error"))

    # ------------------------------------------------------------------------------ helpers
    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ServiceError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key")

    async def parse(request: Request, schema: type[BaseModel]):
        authorize(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            raise _too_large(max_request_bytes)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_request_bytes:
                raise _too_large(max_request_bytes)
        try:
            return schema.model_validate_json(bytes(body))
        except ValidationError as err:
            raise _invalid(err) from None

    async def answer(request: Request, prep):
        service.submit(prep)
        if prep.job.stream:
            return StreamingResponse(_sse(service.stream(prep)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await service.result(prep, request.is_disconnected)
        if result is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        return JSONResponse(result.model_dump())

    # ------------------------------------------------------------------------------ routes
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, P.ChatCompletionRequest)
        return await answer(request, service.prepare_chat(req))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, P.CompletionRequest)
        return await answer(request, service.prepare_completion(req))

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return JSONResponse(service.models().model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        authorize(request)
        service.check_model(model_id)
        return JSONResponse(service.model_card().model_dump())

    @app.get("/health")
    async def health():
        return service.health()

    def page(name: str) -> Response:
        return Response(pages[name], media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP,
                                 "X-Content-Type-Options": "nosniff"})

    @app.get("/")
    async def index():
        return page("index.html")

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC or name == "index.html":  # a fixed list: no path ever reaches the disk
            raise ServiceError(404, f"no such file: {name}", code="not_found")
        return page(name)

    return app


def page_defaults(service: OpenAIService) -> dict[str, object]:
    """The sampler defaults the web page shows and sends, by field id: the server's own (its
    model's ``SamplerConfig``, which ``diffutron generate`` and ``chat`` default to), within the
    server's limits. ``seed`` is sent with every request, as the CLI does (turn N of a
    conversation uses seed + N, as ``diffutron chat``); the API itself draws a random seed for a
    request without one."""
    d = service.lm.defaults
    return {"max_tokens": min(d.max_new_tokens, service.max_tokens), "steps": min(d.steps, service.limits.max_steps),
            "block_length": d.block_length, "temperature": d.temperature, "top_p": d.top_p,
            "repetition_penalty": d.repetition_penalty, "remasking": d.remasking, "threshold": d.threshold,
            "cfg_scale": d.cfg_scale, "seed": d.seed if isinstance(d.seed, int) else d.seed[0]}


def render_page(template: str, values: dict[str, object]) -> str:
    """``template`` with every ``{{name}}`` replaced by ``values[name]`` (HTML-escaped; None as
    empty, floats in their shortest exact form: 1.2, 1, 0.1)."""

    def text(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return str(int(value)) if value.is_integer() else repr(value)
        return str(value)

    return re.sub(r"\{\{(\w+)\}\}", lambda m: html.escape(text(values[m.group(1)])), template)


def _too_large(limit: int) -> ServiceError:
    return ServiceError(413, f"request body over {limit} bytes", code="request_too_large")


def _invalid(err: ValidationError) -> ServiceError:
    """400 for a body that is not JSON, 422 naming the first invalid field otherwise."""
    errors = err.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return ServiceError(400, f"malformed JSON body: {first['msg']}", code="invalid_json")
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field (not part of this API)"
    elif first["type"] == "missing":
        msg = "field required"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    where = f"{loc}: " if loc else ""
    return ServiceError(422, f"{where}{msg}{more}", param=loc or None, code="invalid_value")


async def _sse(chunks):
    """Server-sent events in OpenAI's framing, ending with ``data: [DONE]``."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await chunks.aclose()  # a client that went away cancels its job here


@contextmanager
def serve_in_thread(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0,
                    log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread (tests, notebooks); yields its base URL.

    ``port=0`` picks a free port (the socket is bound before the server starts: no race).

    Raises:
        RuntimeError: the server did not start within ``timeout`` seconds.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="diffutron-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
