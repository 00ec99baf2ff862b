"""The server's error responses: every failure as OpenAI's body
``{"error": {"message", "type", "param", "code"}}``.

400 malformed JSON, 401 bad API key, 404 unknown model or route, 405 wrong method, 413 body or
prompt too large, 422 invalid fields, 429 queue full (with ``Retry-After``). An unexpected
failure is a 500 with a generic message (the traceback goes to the server log, never into a
response).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .service import ServiceError

log = logging.getLogger("diffutron.serve")


def error_response(err: ServiceError) -> JSONResponse:
    """``err`` as a JSON response with its status (and ``Retry-After: 1`` on a 429)."""
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Make ``app`` answer every error (ours, Starlette's, FastAPI's, unexpected) in OpenAI's form."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, err: ServiceError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            return error_response(ServiceError(404, f"no route {request.method} {request.url.path}",
                                               code="not_found"))
        if err.status_code == 405:
            return error_response(ServiceError(405, f"method {request.method} is not allowed on {request.url.path}",
                                               code="method_not_allowed"))
        return error_response(ServiceError(err.status_code, str(err.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return error_response(ServiceError(422, "invalid request"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(ServiceError(500, "internal server error; the server logged the details",
                                           type="server_error", code="internal_error"))


def too_large(limit: int) -> ServiceError:
    """413 for a request body over ``limit`` bytes."""
    return ServiceError(413, f"request body over {limit} bytes", code="request_too_large")


def invalid(err: ValidationError) -> ServiceError:
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
