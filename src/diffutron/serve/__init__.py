"""OpenAI-compatible HTTP server with batching, streaming and a live denoising web page.

Layout (as vLLM's OpenAI server): ``protocol.py`` pydantic schemas; ``jobs.py`` a queued
request and its events, ``scheduler.py`` the queue, batching and the sampler thread,
``streaming.py`` text deltas and denoising states, ``worker.py`` answers and whole eager
batches; ``service.py`` request -> sampler settings -> response (no HTTP); ``app.py`` the
FastAPI app, ``routes_api.py`` the ``/v1`` and ``/health`` routes, ``routes_page.py`` the web
page's, ``http_errors.py`` the error responses; ``static/`` the web page; ``limits.py`` the
server's limits and batching constants. Needs the ``serve`` extra (``pip install diffutron[serve]``); start it with
``diffutron serve``. Only ``limits`` loads without the extra (``serve --help`` states its values):
the rest is imported when first used.
"""

from importlib import import_module

from .limits import Limits

_LAZY = {"create_app": "app", "serve_in_thread": "app", "OpenAIService": "service", "ServiceError": "service"}

__all__ = ["create_app", "serve_in_thread", "Limits", "OpenAIService", "ServiceError"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
