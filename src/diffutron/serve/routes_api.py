"""The API routes: OpenAI's ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` (and
``/v1/models/{id}``), and ``/health``. Each route parses its body (size limit, API key, schema)
and hands the request to ``service.py``; streams go out as server-sent events.
"""

from __future__ import annotations

import hmac
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from . import protocol as P
from .http_errors import invalid, too_large
from .service import OpenAIService, ServiceError


def api_routes(service: OpenAIService, *, api_key: str | None, max_request_bytes: int) -> APIRouter:
    """The API routes over ``service``; with ``api_key``, every ``/v1`` route needs
    ``Authorization: Bearer KEY``, and no body may exceed ``max_request_bytes``."""
    router = APIRouter()

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
            raise too_large(max_request_bytes)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_request_bytes:
                raise too_large(max_request_bytes)
        try:
            return schema.model_validate_json(bytes(body))
        except ValidationError as err:
            raise invalid(err) from None

    async def answer(request: Request, prep):
        service.submit(prep)
        if prep.job.stream:
            return StreamingResponse(sse(service.stream(prep)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await service.result(prep, request.is_disconnected)
        if result is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        return JSONResponse(result.model_dump())

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, P.ChatCompletionRequest)
        return await answer(request, service.prepare_chat(req))

    @router.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, P.CompletionRequest)
        return await answer(request, service.prepare_completion(req))

    @router.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return JSONResponse(service.models().model_dump())

    @router.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        authorize(request)
        service.check_model(model_id)
        return JSONResponse(service.model_card().model_dump())

    @router.get("/health")
    async def health():
        return service.health()

    return router


async def sse(chunks):
    """Server-sent events in OpenAI's framing, ending with ``data: [DONE]``."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await chunks.aclose()  # a client that went away cancels its job here
