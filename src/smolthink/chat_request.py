"""The OpenAI chat-completions wire format on the server side: a request body validated into generation
settings, and OpenAI's error body. Every way a body can be wrong is a RequestError (a 4xx), never a crash."""
from __future__ import annotations

import json
import reprlib
from typing import Any

MAX_N = 64
DEFAULT_MAX_TOKENS = 256


class RequestError(Exception):
    """A failed request, answered with an OpenAI-style error body (and `headers`, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def answer(self) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, error body, headers) for the client."""
        return self.status, error_body(self.message, self.type, self.param, self.code), self.headers


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def decode_json(body: bytes) -> Any:
    """The request body as JSON; every way it can be malformed is a 400."""
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # bad JSON, bad UTF-8, an integer literal over Python's 4300-digit limit
        raise RequestError(400, f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(400, f"'{name}' must be a number in [{lo}, {hi}], got {reprlib.repr(value)}", param=name)
    return float(value)


def _integer(value: Any, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RequestError(400, f"'{name}' must be an integer {bound}, got {reprlib.repr(value)}", param=name)
    return value


def _content_text(content: Any) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise RequestError(400, "only text content parts are supported", param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(400, "message content must be a string or a list of text parts", param="messages")
    try:
        content.encode("utf-8")  # JSON can spell lone surrogates ("\ud800"), which the tokenizer refuses
    except UnicodeEncodeError:
        raise RequestError(400, "message content is not valid Unicode text", param="messages") from None
    return content


def parse_chat_request(body: Any, max_request_tokens: int) -> dict[str, Any]:
    """Validate a chat-completions body -> {messages, temperature, top_p, max_tokens, n, seed}; the work it asks
    for (rows generated x max_tokens) must be at most `max_request_tokens`."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(400, "each message needs a role of system, user or assistant", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": _content_text(m.get("content"))})
    if body.get("stream"):
        raise RequestError(400, "streaming is not supported by this server", param="stream")
    tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body.get(tokens_name), tokens_name, DEFAULT_MAX_TOKENS, 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    temperature = 0.0 if top_p == 0 else temperature  # top_p 0 keeps only the top token: greedy
    n = _integer(body.get("n"), "n", 1, 1, MAX_N)
    seed = _integer(body.get("seed"), "seed", None, -(2 ** 63))
    rows = 1 if temperature <= 0 else n  # greedy samples are identical: generated once
    if rows * max_tokens > max_request_tokens:
        raise RequestError(400, f"n x {tokens_name} = {rows} x {reprlib.repr(max_tokens)} tokens is over this server's limit of "
                           f"{max_request_tokens} generated tokens per request: lower n or {tokens_name}",
                           param=tokens_name, code="request_too_large")
    return {"messages": clean, "temperature": temperature, "top_p": top_p or 1.0, "max_tokens": max_tokens,
            "n": n, "seed": None if seed is None else seed % (2 ** 63)}
