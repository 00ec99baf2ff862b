"""Request and response schemas of the OpenAI-compatible API (pydantic), nothing else.

Requests are strict: wrong types are errors (``"64"`` is not an integer), unknown fields are
errors (a typo such as ``"step"`` must not be ignored silently), and OpenAI fields a diffusion
LM cannot honour are accepted only at their neutral value. The diffusion settings (``steps``,
``block_length``, ``remasking``, ``threshold``, ``repetition_penalty``, ``cfg_scale``,
``top_k``) are extra body fields, as vLLM does for its own extensions; every setting that is
left out takes the model's default (the Diffutron paper's).

Ranges here are the absolute ones; the server's own limits (``--max-tokens``, ``--max-steps``,
``--max-n``, ...) are checked by the service.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..sampling import REMASKING

MAX_SEED = 2**63 - 1 - 1024  # room for one seed per row (seed + row)
Remasking = Literal[REMASKING]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ------------------------------------------------------------------------------------ requests
class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with the token usage")
    include_denoising: bool = Field(
        False, description="also send every intermediate canvas of the answer (chunks whose choice has "
        "an empty delta and a `denoising` object): what the web page draws")


class SamplingFields(_Strict):
    """Fields shared by both endpoints: OpenAI's, then the diffusion extras."""

    model: Optional[str] = Field(None, description="the served model id (default: the one served model)")
    max_tokens: Optional[int] = Field(None, ge=1, description="answer length in tokens (default: the model's, 64)")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = greedy (default 0.1)")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    n: int = Field(1, ge=1, le=128, description="answers per prompt (each with seed + index)")
    stop: Optional[Union[str, list[str]]] = Field(None, description="up to 4 strings that end the answer")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="random seed; random when omitted")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = Field(None, max_length=256, description="ignored")
    # OpenAI fields accepted only at their neutral value (clients often send them).
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    # diffusion extras
    steps: Optional[int] = Field(None, ge=1, description="denoising steps (default: max_tokens, one token per step)")
    block_length: Optional[int] = Field(None, ge=1, description="tokens per block (default 32)")
    remasking: Optional[Remasking] = Field(None, description="low_confidence | margin | entropy | random")
    threshold: Optional[float] = Field(None, gt=0, le=1, description="also commit positions this confident")
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10, description="default 1.2; 1 = off")
    cfg_scale: Optional[float] = Field(None, ge=0, le=100, description="classifier-free guidance (0 = off)")
    top_k: Optional[int] = Field(None, ge=-1, description="sample among the k most likely tokens (0 or -1 = off)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        for s in stops:
            if not s or len(s) > 256:
                raise ValueError("each stop string must have 1 to 256 characters")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _neutral_penalty(cls, v):
        if v not in (None, 0, 0.0):
            raise ValueError("is not supported by a diffusion LM: leave it at 0 and use repetition_penalty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _neutral_bias(cls, v):
        if v:
            raise ValueError("is not supported by this server")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """A chat message; ``developer`` is OpenAI's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = Field(None, max_length=256)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)

    def as_dict(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None

    @model_validator(mode="after")
    def _chat_fields(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ: give one of them")
            self.max_tokens = self.max_completion_tokens
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported by this server")
        if self.store:
            raise ValueError("store is not supported by this server: it keeps no completions")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError('response_format: only {"type": "text"} is supported')
        return self


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str]] = Field(..., description="a text to continue, or a list of them")
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= 128:
            raise ValueError("give 1 to 128 prompts")
        return v

    @model_validator(mode="after")
    def _completion_fields(self):
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported by this server: use n")
        if self.logprobs:
            raise ValueError("logprobs are not supported by this server")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# ----------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Denoising(BaseModel):
    """One intermediate state of an answer: ``tokens`` has one entry per answer position, the
    token's text or ``null`` while it is still masked (``""`` for padding after the end)."""

    step: int = Field(description="this answer's denoising steps so far")
    block: int = Field(description="index of the block being decoded")
    block_length: int
    masked: int = Field(description="positions still masked")
    tokens: list[Optional[str]]


def _none(v) -> bool:
    return v is None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = Field(None, exclude_if=_none)
    content: Optional[str] = Field(None, exclude_if=_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Optional[Literal["stop", "length"]] = None
    logprobs: None = None
    denoising: Optional[Denoising] = Field(None, exclude_if=_none)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = Field(None, exclude_if=_none)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[Literal["stop", "length"]] = None
    logprobs: None = None
    denoising: Optional[Denoising] = Field(None, exclude_if=_none)


class CompletionResponse(BaseModel):
    """Also the shape of a streamed completion chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = Field(None, exclude_if=_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "diffutron"
    max_model_len: int
    diffusion_defaults: dict[str, Any] = Field(description="the sampler defaults (the paper's settings)")
    limits: dict[str, Any] = Field(description="this server's request limits")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
