"""A small OpenAI-compatible HTTP server for any model smolthink can load (`smolthink serve`).

Standard library HTTP only (http.server). Endpoints:

    POST /v1/chat/completions   messages, temperature, top_p, max_tokens (or max_completion_tokens), n, seed
    GET  /v1/models             the one served model
    GET  /v1/models/<id>, GET /health

Prompts are rendered with the model's chat template (generation prompt added, the same ids training uses) and
generated through the rollout engine (HFEngine by default), one generation at a time behind a lock; completions
are decoded without special tokens. Errors use OpenAI's body shape: {"error": {"message", "type", "param", "code"}}.

No client can hold the server (see Limits): oversized work is refused before the request waits for the lock,
waiting for the lock and generating share one time limit, idle connections are closed, handler threads are
bounded, and a malformed body is a 400. A 500 means a bug in the server and is logged with its traceback.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .chat_request import MAX_N, RequestError, decode_json, error_body, parse_chat_request
from .errors import SmolthinkError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COMPLETIONS = "/v1/chat/completions"


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server, sized for a 135M model on a 2-core CPU (where one request with
    n=64, max_tokens=900 held the lock for over 6 minutes) and for clients like APITeacher, whose 60 s read
    timeout an answer must beat. Requests over a size limit are refused before they wait for the lock; the time
    limit bounds whatever the size limits let through."""

    max_body_bytes: int = 1 << 20  # a prompt within max_prompt_tokens is a few KB of JSON
    max_prompt_tokens: int = 4096  # after the chat template
    max_request_tokens: int = 4096  # rows generated x max_tokens; greedy requests generate one row whatever n is
    time_limit_s: float = 45.0  # from the body's arrival: waiting for the lock plus generating
    lock_wait_s: float = 20.0  # a request that gets no lock in this time is answered 503 with Retry-After
    idle_timeout_s: float = 5.0  # a connection that sends nothing for this long is closed
    max_connections: int = 32  # handler threads at once; more connections get 503 and are closed


class GenerationTimeout(Exception):
    """Raised inside the model's forward pass once a request's deadline has passed."""



@contextmanager
def deadline(model, at: float) -> Iterator[None]:
    """Abort the model's next forward pass after time.monotonic() passes `at` (GenerationTimeout).

    The check sits on the input embeddings, which every forward pass of every engine built on the model's
    forward (HFEngine, also under PEFT) runs once per generated token; the hook is gone when the block exits."""
    def check(module, args):
        if time.monotonic() > at:
            raise GenerationTimeout

    handle = model.get_input_embeddings().register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


class ChatServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the model, the engine, the generation lock and the limits."""

    daemon_threads = True
    request_queue_size = 64  # many clients connecting at once queue up instead of waiting on SYN retries

    def __init__(self, addr, model, tokenizer, model_name: str, engine, api_key: str | None = None,
                 limits: Limits = Limits()):
        super().__init__(addr, _Handler)
        self.model, self.tokenizer, self.model_name, self.engine = model, tokenizer, model_name, engine
        self.api_key, self.limits = api_key, limits
        self.created = int(time.time())
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.generate_lock = threading.Lock()  # one generation at a time
        self.busy_until = 0.0  # monotonic deadline of the generation holding the lock: the Retry-After hint
        self._slots = threading.BoundedSemaphore(limits.max_connections)

    @property
    def url(self) -> str:
        """Base URL clients use (http://host:port/v1)."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/v1"

    # -- connections -----------------------------------------------------------------------------------------
    def process_request(self, request, client_address) -> None:
        """One handler thread per connection, at most limits.max_connections at once: a connection beyond that
        is answered 503 and closed straight from the accept loop (a few bytes into an empty send buffer)."""
        if self._slots.acquire(blocking=False):
            return super().process_request(request, client_address)
        try:
            request.sendall(_BUSY_RESPONSE)
        except OSError:  # the client is already gone
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        """A client that vanished or stalled mid-request is routine; anything else is a bug worth a traceback."""
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("connection from %s dropped: %s", client_address, sys.exc_info()[1])
        else:
            log.exception("unexpected error serving %s", client_address)

    # -- requests --------------------------------------------------------------------------------------------
    def authorised(self, authorization: str) -> bool:
        """Whether an Authorization header value carries the server's key (always, when it has none)."""
        return not self.api_key or authorization == f"Bearer {self.api_key}"

    def respond(self, path: str, body: bytes, authorization: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Answer one POST -> (status, JSON payload, extra headers). Every client error is a 4xx or a 503; a 500
        is a bug and is logged."""
        arrived = time.monotonic()
        try:
            if not self.authorised(authorization):
                raise RequestError(401, "invalid API key", code="invalid_api_key")
            if path != COMPLETIONS:
                raise RequestError(404, f"unknown path {path}", code="not_found")
            req = parse_chat_request(decode_json(body), self.limits.max_request_tokens)
            return 200, self.complete(req, arrived + self.limits.time_limit_s), {}
        except RequestError as e:
            return e.answer()
        except Exception as e:  # a bug: answered 500 and logged, the server stays up
            log.exception("chat completion failed")
            return 500, error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), {}

    def _prompt(self, req: dict[str, Any]) -> list[int]:
        """The chat-templated prompt ids, within the prompt and context limits."""
        from jinja2 import TemplateError

        from .chat import render_prompt

        try:
            prompt = render_prompt(self.tokenizer, req["messages"])
        except TemplateError as e:  # a template that rejects this conversation (e.g. role order)
            raise RequestError(400, f"chat template rejected the messages: {e}", param="messages") from None
        if len(prompt) > self.limits.max_prompt_tokens:
            raise RequestError(400, f"the prompt is {len(prompt)} tokens after the chat template, over this "
                               f"server's limit of {self.limits.max_prompt_tokens}", param="messages",
                               code="context_length_exceeded")
        if self.max_context and len(prompt) + req["max_tokens"] > self.max_context:
            raise RequestError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({req['max_tokens']}) exceeds the "
                               f"model's context of {self.max_context} tokens", param="messages",
                               code="context_length_exceeded")
        return prompt

    def _generate(self, prompt: list[int], req: dict[str, Any], until: float) -> list:
        """Rollouts for one request, under the lock, cut at the monotonic deadline `until`.

        A request that waits past limits.lock_wait_s (or its deadline) for the lock gets 503 with Retry-After. A
        generation still running at the deadline is aborted with 503 "timeout" rather than answered with the
        tokens so far: the engines cannot hand back a half-finished batch, and a truncated answer with
        finish_reason "length" would look final to clients that cache answers (APITeacher does)."""
        from .types import SamplingParams

        sampling = SamplingParams(max_new_tokens=req["max_tokens"], temperature=req["temperature"],
                                  top_p=req["top_p"], top_k=0)
        n = 1 if req["temperature"] <= 0 else req["n"]
        wait = min(self.limits.lock_wait_s, until - time.monotonic())
        if not self.generate_lock.acquire(timeout=max(0.0, wait)):
            retry = max(1, math.ceil(self.busy_until - time.monotonic()))
            raise RequestError(503, "the server is busy with another request; retry later", code="server_busy",
                               type_="server_error", headers={"Retry-After": str(retry)})
        try:
            self.busy_until = until
            with deadline(self.model, until):
                return self.engine.generate(self.model, [prompt], n, sampling, seed=req["seed"])[0]
        except GenerationTimeout:
            raise RequestError(503, f"generation ran past this server's {self.limits.time_limit_s:g} s limit per "
                               "request: lower n or max_tokens, or retry later", code="timeout",
                               type_="server_error") from None
        finally:
            self.generate_lock.release()

    def complete(self, req: dict[str, Any], until: float) -> dict[str, Any]:
        """Run one chat completion, finished by the monotonic time `until` -> the OpenAI response object."""
        prompt = self._prompt(req)
        rollouts = self._generate(prompt, req, until)
        if req["temperature"] <= 0:
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
        """The /v1/models entry for the served model."""
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "smolthink"}


_BUSY_BODY = json.dumps(error_body("too many connections; retry later", "server_error", code="server_busy"))
_BUSY_RESPONSE = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                  f"Content-Length: {len(_BUSY_BODY)}\r\nConnection: close\r\n\r\n{_BUSY_BODY}").encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ChatServer
    server_version = "smolthink"

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout_s  # StreamRequestHandler puts it on the socket
        super().setup()

    def log_message(self, fmt: str, *args: Any) -> None:  # route access logs through logging, quietly
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
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
        """The request body, by Content-Length. Socket errors and timeouts propagate: the connection is dropped
        (handle_one_request closes it on a timeout, ChatServer.handle_error logs the rest quietly)."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        limit = self.server.limits.max_body_bytes
        if not (length.isascii() and length.isdigit()):  # int() would also take "+5", " 5", "1_0"
            self.close_connection = True
            raise RequestError(400, "bad Content-Length header")
        if len(length) > 12 or int(length) > limit:
            self.close_connection = True
            raise RequestError(413, f"request body over this server's limit of {limit} bytes")
        data = self.rfile.read(int(length))
        if len(data) < int(length):
            raise ConnectionError("the client closed the connection mid-body")
        return data

    def do_GET(self) -> None:
        """/health, /v1/models and /v1/models/<id>."""
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            return self._send(200, {"status": "ok"})
        if not self.server.authorised(self.headers.get("Authorization", "")):
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
        """Read the body, answer through ChatServer.respond."""
        try:
            body = self._read_body()
        except RequestError as e:
            return self._send(*e.answer())
        path = self.path.split("?", 1)[0].rstrip("/")
        self._send(*self.server.respond(path, body, self.headers.get("Authorization", "")))


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 0, model_name: str = "smolthink-local",
                engine=None, api_key: str | None = None, limits: Limits = Limits()) -> ChatServer:
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
    return ChatServer((host, port), model, tokenizer, model_name, engine, api_key=api_key, limits=limits)


def serve(model_spec: str | None, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None) -> None:
    """Load `model_spec` (hub id, directory, .gguf, None = embedded) and serve it until interrupted."""
    from .models import load_model

    model, tok = load_model(model_spec)
    name = model_name or (model_spec or "smolthink-local")
    try:
        server = make_server(model, tok, host, port, model_name=name, api_key=api_key)
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0-65535
        raise SmolthinkError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    if host not in LOOPBACK and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    log.info("serving %s at %s (POST /chat/completions, GET /models); Ctrl-C to stop", name, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.server_close()
