"""The FastAPI app of the OpenAI-compatible server: ``create_app`` puts together the error
handlers (``http_errors.py``), the API routes (``routes_api.py``) and the web page
(``routes_page.py``) over one ``OpenAIService`` (``service.py``, where the work happens);
``serve_in_thread`` runs it in the background (tests, notebooks).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..lm import DiffusionLM
from .http_errors import install_error_handlers
from .routes_api import api_routes
from .routes_page import page_routes
from .service import Limits, OpenAIService

MAX_REQUEST_BYTES = 4 * 1024 * 1024


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
    install_error_handlers(app)
    app.include_router(api_routes(service, api_key=api_key, max_request_bytes=max_request_bytes))
    app.include_router(page_routes(service))
    return app


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
