"""OpenAI-compatible HTTP server with batching, streaming and a live denoising web page.

Layout (as vLLM's OpenAI server): ``protocol.py`` pydantic schemas, ``scheduler.py`` batching
and the sampler thread, ``service.py`` request -> sampler settings -> response (no HTTP),
``app.py`` the FastAPI routes, ``static/`` the web page. Needs the ``serve`` extra
(``pip install diffutron[serve]``); start it with ``diffutron serve``.
"""

from .app import create_app, serve_in_thread
from .service import Limits, OpenAIService, ServiceError

__all__ = ["create_app", "serve_in_thread", "Limits", "OpenAIService", "ServiceError"]
