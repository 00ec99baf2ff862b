"""The web page's routes: ``/`` (``static/index.html`` with the server's sampler defaults filled
in) and ``/static/{name}`` (a fixed list of files), each with a strict Content-Security-Policy.
"""

from __future__ import annotations

import html
import re
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from .service import OpenAIService, ServiceError

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def page_routes(service: OpenAIService) -> APIRouter:
    """The routes of the web page, its defaults taken from ``service`` (``page_defaults``)."""
    pages = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in STATIC}
    pages["index.html"] = render_page(pages["index.html"].decode("utf-8"), page_defaults(service)).encode("utf-8")
    router = APIRouter()

    def page(name: str) -> Response:
        return Response(pages[name], media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP,
                                 "X-Content-Type-Options": "nosniff"})

    @router.get("/")
    async def index():
        return page("index.html")

    @router.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC or name == "index.html":  # a fixed list: no path ever reaches the disk
            raise ServiceError(404, f"no such file: {name}", code="not_found")
        return page(name)

    return router


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
