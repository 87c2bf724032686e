"""A small OpenAI-compatible HTTP server for any model smolthink can load (`smolthink serve`).

Standard library HTTP only (http.server). Endpoints:

    POST /v1/chat/completions   messages, temperature, top_p, max_tokens (or max_completion_tokens), n, seed
    GET  /v1/models             the one served model
    GET  /v1/models/<id>, GET /health

Prompts are rendered with the model's chat template (generation prompt added, the same ids training uses) and
generated through the rollout engine (HFEngine by default), one generation at a time behind a lock; completions
are decoded without special tokens. Errors use OpenAI's body shape: {"error": {"message", "type", "param", "code"}}.

Test knobs on the server object (never reachable over HTTP): `fail_next` (status codes answered, in order, before
serving normally), `retry_after` (Retry-After header sent with injected 429/503), `delay_s` (sleep inside each
in-flight request, outside the generation lock, so client concurrency becomes observable), and the counters
`calls`, `in_flight`, `max_concurrent_seen`.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .errors import SmolthinkError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20
MAX_N = 64
DEFAULT_MAX_TOKENS = 256
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RequestError(Exception):
    """A client error, answered with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(400, f"'{name}' must be a number in [{lo}, {hi}], got {value!r}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RequestError(400, f"'{name}' must be an integer {bound}, got {value!r}", param=name)
    return value


def _content_text(content: Any) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(400, "message content must be a string or a list of text parts", param="messages")


def parse_chat_request(body: Any) -> dict[str, Any]:
    """Validate a chat-completions body -> {messages, temperature, top_p, max_tokens, n, seed}."""
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
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", DEFAULT_MAX_TOKENS, 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    seed = _integer(body, "seed", None, -(2 ** 63))
    return {
        "messages": clean,
        "temperature": 0.0 if top_p == 0 else temperature,  # top_p 0 keeps only the top token: greedy
        "top_p": top_p or 1.0,
        "max_tokens": max_tokens,
        "n": _integer(body, "n", 1, 1, MAX_N),
        "seed": None if seed is None else seed % (2 ** 63),
    }


class ChatServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the model, the engine, the generation lock, counters and the test knobs."""

    daemon_threads = True
    request_queue_size = 64  # many clients connecting at once queue up instead of waiting on SYN retries

    def __init__(self, addr, model, tokenizer, model_name: str, engine, api_key: str | None = None):
        super().__init__(addr, _Handler)
        self.model, self.tokenizer, self.model_name, self.engine = model, tokenizer, model_name, engine
        self.api_key = api_key
        self.created = int(time.time())
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.generate_lock = threading.Lock()  # one generation at a time
        self._stats_lock = threading.Lock()
        # test knobs and counters (not reachable over HTTP)
        self.fail_next: list[int] = []
        self.retry_after: float | None = None
        self.delay_s: float = 0.0
        self.calls = 0
        self.in_flight = 0
        self.max_concurrent_seen = 0
        self.generations = 0

    @property
    def url(self) -> str:
        """Base URL clients use (http://host:port/v1)."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/v1"

    def enter(self) -> int | None:
        """Count one request in; return an injected failure status to answer instead, if one is queued."""
        with self._stats_lock:
            self.calls += 1
            self.in_flight += 1
            self.max_concurrent_seen = max(self.max_concurrent_seen, self.in_flight)
            return self.fail_next.pop(0) if self.fail_next else None

    def leave(self) -> None:
        with self._stats_lock:
            self.in_flight -= 1

    def complete(self, req: dict[str, Any]) -> dict[str, Any]:
        """Run one chat completion -> the OpenAI response object."""
        from .chat import render_prompt
        from .types import SamplingParams

        try:
            prompt = render_prompt(self.tokenizer, req["messages"])
        except Exception as e:  # a template that rejects this conversation (e.g. role order)
            raise RequestError(400, f"chat template rejected the messages: {e}", param="messages") from None
        if self.max_context and len(prompt) + req["max_tokens"] > self.max_context:
            raise RequestError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({req['max_tokens']}) exceeds the "
                               f"model's context of {self.max_context} tokens", param="messages",
                               code="context_length_exceeded")
        sampling = SamplingParams(max_new_tokens=req["max_tokens"], temperature=req["temperature"],
                                  top_p=req["top_p"], top_k=0)
        greedy = req["temperature"] <= 0
        n = 1 if greedy else req["n"]  # greedy samples are identical: generate once, repeat
        with self.generate_lock:
            rollouts = self.engine.generate(self.model, [prompt], n, sampling, seed=req["seed"])[0]
            self.generations += 1
        if greedy:
            rollouts = rollouts * req["n"]
        choices, completion_tokens = [], 0
        for i, r in enumerate(rollouts):
            text = self.tokenizer.decode(r.completion_ids, skip_special_tokens=True)
            completion_tokens += len(r.completion_ids)
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": r.finish_reason, "logprobs": None})
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                      "total_tokens": len(prompt) + completion_tokens},
        }

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "smolthink"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ChatServer
    server_version = "smolthink"

    def log_message(self, fmt: str, *args: Any) -> None:  # route access logs through logging, quietly
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- plumbing --------------------------------------------------------------------------------------------
    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, "bad Content-Length header") from None
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(n)

    def _authorised(self) -> bool:
        key = self.server.api_key
        return not key or self.headers.get("Authorization", "") == f"Bearer {key}"

    # -- routes ----------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            return self._send(200, {"status": "ok"})
        if not self._authorised():
            return self._send(401, error_body("invalid API key", code="invalid_api_key"))
        if path == "/v1/models":
            return self._send(200, {"object": "list", "data": [self.server.model_card()]})
        if path == f"/v1/models/{self.server.model_name}":
            return self._send(200, self.server.model_card())
        if path.startswith("/v1/models/"):
            return self._send(404, error_body(f"model '{path[len('/v1/models/'):]}' not found",
                                              code="model_not_found"))
        self._send(404, error_body(f"unknown path {path}", code="not_found"))

    def do_POST(self) -> None:
        server = self.server
        path = self.path.split("?", 1)[0].rstrip("/")
        injected = server.enter()
        status, payload, headers = 200, {}, {}
        try:
            body = self._read_body()
            if injected is not None:
                status = injected
                payload = error_body(f"injected failure {injected}", type_="server_error" if injected >= 500
                                     else "rate_limit_error" if injected == 429 else "invalid_request_error",
                                     code="injected")
                if server.retry_after is not None and injected in (429, 503):
                    headers["Retry-After"] = f"{server.retry_after:g}"
            elif not self._authorised():
                status, payload = 401, error_body("invalid API key", code="invalid_api_key")
            elif path != "/v1/chat/completions":
                status, payload = 404, error_body(f"unknown path {path}", code="not_found")
            else:
                if server.delay_s > 0:
                    time.sleep(server.delay_s)
                try:
                    parsed = json.loads(body)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise RequestError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
                payload = server.complete(parse_chat_request(parsed))
        except RequestError as e:
            status, payload = e.status, error_body(e.message, e.type, e.param, e.code)
        except Exception as e:  # noqa: BLE001 - a generation bug must not kill the server
            log.exception("chat completion failed")
            status, payload = 500, error_body(f"internal error: {type(e).__name__}: {e}", "server_error")
        finally:
            # leave before answering: a client that sends its next request as soon as it reads this response
            # must not be counted as overlapping with this one
            server.leave()
        self._send(status, payload, headers)


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 0, model_name: str = "smolthink-local",
                engine=None, api_key: str | None = None) -> ChatServer:
    """An OpenAI-compatible server for (model, tokenizer), bound but not yet serving: call serve_forever()
    (e.g. in a thread; port 0 picks a free port, see `server.url`). `api_key`, when set, is required as a
    Bearer token. `engine` defaults to HFEngine with the model's EOS ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise SmolthinkError("the tokenizer has no chat template: the server renders prompts with it")
    if engine is None:
        from .models import eos_ids
        from .rollout.hf import HFEngine

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        engine = HFEngine(eos_ids(tokenizer, model), pad_id=pad, batch_size=MAX_N)
    model.eval()
    return ChatServer((host, port), model, tokenizer, model_name, engine, api_key=api_key)


def serve(model_spec: str | None, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None) -> None:
    """Load `model_spec` (hub id, directory, .gguf, None = embedded) and serve it until interrupted."""
    from .models import load_model

    model, tok = load_model(model_spec)
    name = model_name or (model_spec or "smolthink-local")
    try:
        server = make_server(model, tok, host, port, model_name=name, api_key=api_key)
    except OSError as e:
        raise SmolthinkError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if host not in LOOPBACK and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    log.info("serving %s at %s (POST /chat/completions, GET /models); Ctrl-C to stop", name, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.server_close()
