"""OpenAI Chat Completions, the parts this server speaks: request checks and response shapes.

Every refusal is an ``ApiError``: an HTTP 4xx (5xx only for the server's own trouble) with
OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``, so OpenAI clients raise
their usual exceptions (``BadRequestError``, ``NotFoundError``, ``RateLimitError``...).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from lora_assets.serving.engine import Sampling

BASE = "base"  # the model name of the bare base model
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unauthorized() -> ApiError:
    return ApiError(401, "Incorrect API key provided: pass a lora-assets token as 'Authorization: Bearer <token>'.",
                    code="invalid_api_key")


def model_not_found(model: str) -> ApiError:
    """The one answer for an unknown model, another user's adapter and an unpublished one alike."""
    return ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    user: str | None  # None for the base model
    mode: str | None
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "The JSON body of your request is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request ({exc}).") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def parse_chat(body: dict[str, Any], modes: set[str], max_tokens_limit: int) -> ChatRequest:
    """Check a chat completion request; the model must be ``base`` or ``<user>/<mode>``."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model")
    user = mode = None
    if model != BASE:
        user, _, mode = model.partition("/")
        if not user or mode not in modes:
            raise model_not_found(model)
    messages = _messages(body.get("messages"))
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "n must be 1: one choice per request", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = min(256, max_tokens_limit) if max_tokens is None else max_tokens
    if not _int(max_tokens) or not 1 <= max_tokens <= max_tokens_limit:
        raise ApiError(400, f"max_tokens must be an integer from 1 to {max_tokens_limit}, not {max_tokens!r}",
                       param="max_tokens", code="invalid_value")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "top_p must be above 0", param="top_p", code="invalid_value")
    seed = body.get("seed")
    if seed is not None and not (_int(seed) and 0 <= seed < 2**63):
        raise ApiError(400, "seed must be an integer from 0 to 2**63 - 1", param="seed", code="invalid_value")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return ChatRequest(model, user, mode, messages, Sampling(max_tokens, temperature, top_p, seed, tuple(stop)),
                       stream, bool(options.get("include_usage")))


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number from {low} to {high}, not {value!r}", param=name,
                       code="invalid_value")
    return float(value)


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def with_instruction(messages: list[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    """The mode's instruction as the system turn, as in training; a client's own system text follows it."""
    extra = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    system = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "system", "content": system}, *(m for m in messages if m["role"] != "system")]


class Completion:
    """The response of one request, as a whole object or as ``chat.completion.chunk`` events."""

    def __init__(self, model: str, fingerprint: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint

    def whole(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens),
        }

    def chunk(self, delta: dict[str, str], finish: str | None = None, usage_: dict | None = None,
              choices: bool = True) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
        if usage_ is not None:
            body["usage"] = usage_
        return sse(body)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(body: dict[str, Any] | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()
