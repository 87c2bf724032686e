"""smolthink serve cannot be held: oversized work is refused before the generation lock, malformed bodies are 400s,
idle connections are closed, handler threads are bounded, a generation past the time limit is cut, and requests
that cannot get the lock in time get 503 with Retry-After. Real HTTP server on 127.0.0.1 (port 0), fake engines."""
import http.client
import json
import logging
import socket
import threading
import time

import pytest
import torch

from smolthink.errors import SmolthinkError
from smolthink.serve import Limits, make_server, serve
from smolthink.types import Rollout

MSG = [{"role": "user", "content": "Is every cat an animal?"}]


class FixedEngine:
    """Answers every prompt with the same few tokens at once; counts its calls."""

    def __init__(self):
        self.calls = 0

    def generate(self, model, prompts, n, sampling, seed=None):
        self.calls += 1
        return [[Rollout(list(p), [28, 29, 30], "length") for _ in range(n)] for p in prompts]


class SlowEngine:
    """One forward pass of the served model per token, slowly: a real engine on a busy CPU."""

    def __init__(self):
        self.steps = 0

    def generate(self, model, prompts, n, sampling, seed=None):
        ids = torch.tensor([prompts[0][-4:]])  # [1, 4]
        for _ in range(sampling.max_new_tokens):
            model(input_ids=ids)
            self.steps += 1
            time.sleep(0.02)
        return [[Rollout(list(p), [28] * sampling.max_new_tokens, "length") for _ in range(n)] for p in prompts]


class BlockingEngine:
    """Holds the generation lock until the test releases it."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def generate(self, model, prompts, n, sampling, seed=None):
        self.started.set()
        assert self.release.wait(30)
        return [[Rollout(list(p), [28], "length") for _ in range(n)] for p in prompts]


class FailingEngine:
    def generate(self, model, prompts, n, sampling, seed=None):
        raise RuntimeError("engine bug")


class CountingLock:
    """The generation lock, counting how often it was taken."""

    def __init__(self):
        self._lock, self.taken = threading.Lock(), 0

    def acquire(self, blocking=True, timeout=-1):
        got = self._lock.acquire(blocking, timeout)
        self.taken += got
        return got

    def release(self):
        self._lock.release()


@pytest.fixture()
def start(tiny_lm, tiny_tokenizer):
    """start(engine, **limits) -> a serving ChatServer with a CountingLock; all are shut down after the test."""
    servers = []

    def _start(engine=None, **limits):
        srv = make_server(tiny_lm, tiny_tokenizer, port=0, engine=engine or FixedEngine(), limits=Limits(**limits))
        srv.generate_lock = CountingLock()
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def connect(srv, timeout=10.0):
    return socket.create_connection(srv.server_address[:2], timeout=timeout)


def read_answer(sock):
    """(status, headers, JSON body) of one response read from a raw socket."""
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, r.headers, json.loads(r.read())


def post(srv, body=None, raw=None, length=None, path="/v1/chat/completions"):
    """One POST on a fresh connection: a JSON `body`, or `raw` bytes with an optional forged Content-Length."""
    data = raw if raw is not None else json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if length != "omit":
        head += f"Content-Length: {len(data) if length is None else length}\r\n"
    with connect(srv, timeout=30) as s:
        s.sendall(head.encode() + b"\r\n" + data)
        return read_answer(s)


def test_oversized_requests_are_refused_before_the_lock(start):
    srv = start(max_prompt_tokens=64, max_body_bytes=10_000)
    long_msg = [{"role": "user", "content": "every cat is an animal " * 40}]
    cases = [  # (body, status, param)
        ({"messages": MSG, "n": 64, "max_tokens": 900}, 400, "max_tokens"),
        ({"messages": MSG, "n": 17}, 400, "max_tokens"),  # 17 x the default 256 > 4096
        ({"messages": MSG, "max_completion_tokens": 10 ** 30}, 400, "max_completion_tokens"),
        ({"messages": MSG, "n": 65, "max_tokens": 1}, 400, "n"),
        ({"messages": long_msg, "max_tokens": 1}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 20_000}]}, 413, None),
    ]
    for body, status, param in cases:
        got, _, resp = post(srv, body)
        assert (got, resp["error"]["param"]) == (status, param), body
    assert "limit of 64" in post(srv, {"messages": long_msg, "max_tokens": 1})[2]["error"]["message"]
    got, _, resp = post(srv, raw=b"{}", length="9" * 5000)
    assert got == 413 and "10000 bytes" in resp["error"]["message"]
    assert srv.generate_lock.taken == 0 and srv.engine.calls == 0
    # greedy samples are generated once, so n=64 greedy is one row's work; the lock count can move
    got, _, resp = post(srv, {"messages": MSG, "n": 64, "max_tokens": 64, "temperature": 0})
    assert got == 200 and len(resp["choices"]) == 64
    assert srv.generate_lock.taken == 1 and srv.engine.calls == 1


MALFORMED = {
    "deep nesting": b"[" * 200_000,
    "deep nesting in a field": b'{"messages": ' + b"[" * 200_000,
    "5000-digit max_tokens": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
    "non-UTF-8 bytes": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "UTF-16 BOM garbage": b"\xff\xfe\x00\xd8garbage",
    "lone surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    "empty body": b"",
    "truncated JSON": b'{"messages": [',
    "NaN temperature": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "Infinity top_p": b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
    "1e400 max_tokens": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
}
WRONG = [  # bodies that are valid JSON but not a valid request
    None, [], "x", 5, {}, {"model": "m"}, {"messages": "hello"}, {"messages": [1]}, {"messages": [[[[[]]]]]},
    {"messages": [{"content": "hi"}]}, {"messages": [{"role": "user"}]}, {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": ["user"], "content": "x"}]}, {"messages": [{"role": {"a": 1}, "content": "x"}]},
    {"messages": [{"role": "user", "content": 5}]}, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
] + [{"messages": MSG, field: value} for field, value in [
    ("temperature", "hot"), ("temperature", -1), ("temperature", 3), ("temperature", [[[[[[[[1]]]]]]]]),
    ("top_p", 2), ("top_p", True), ("n", 1.5), ("n", True), ("n", "2"), ("n", 0), ("n", 10 ** 30),
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", "5"), ("max_tokens", 1.0), ("max_tokens", 10 ** 4000),
    ("max_completion_tokens", [1]), ("seed", "x"), ("seed", 1.5), ("seed", -(2 ** 64)), ("stream", True),
]]


def test_malformed_bodies_get_400(start, caplog):
    srv = start()
    caplog.set_level(logging.DEBUG, logger="smolthink.serve")
    for name, raw in MALFORMED.items():
        status, _, resp = post(srv, raw=raw)
        assert status == 400 and resp["error"]["type"] == "invalid_request_error", name
    for body in WRONG:
        status, _, resp = post(srv, body)
        assert status == 400 and resp["error"]["type"] == "invalid_request_error", body
    for length, status in [("abc", 400), ("-5", 400), ("1_0", 400), ("omit", 411)]:
        assert post(srv, {"messages": MSG}, length=length)[0] == status, length
    assert srv.engine.calls == 0 and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert post(srv, {"messages": MSG, "max_tokens": 3})[0] == 200  # and the server is still fine


def test_a_500_is_a_logged_bug(start, caplog):
    srv = start(engine=FailingEngine())
    status, _, resp = post(srv, {"messages": MSG})
    assert status == 500 and resp["error"]["type"] == "server_error" and "engine bug" in resp["error"]["message"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info is not None


def test_idle_and_stalled_connections_are_closed(start, caplog, capsys):
    srv = start(idle_timeout_s=0.2)
    half_body = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"messages\""
    for sent in [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost", half_body]:
        with connect(srv, timeout=5) as s:  # far above the server's 0.2 s: a server that never closes fails
            s.sendall(sent)
            assert s.recv(1) == b"", sent  # EOF, no answer
    with connect(srv, timeout=5) as s:  # a kept-alive connection, idle after its answer
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(s)[0] == 200
        assert s.recv(1) == b""
    with connect(srv, timeout=5) as s:  # a client that gives up mid-body is dropped quietly
        s.sendall(half_body)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
    assert post(srv, {"messages": MSG})[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR] and "Traceback" not in capsys.readouterr().err


def test_handler_threads_are_bounded(start):
    srv = start(max_connections=2, idle_timeout_s=30)
    held = [connect(srv) for _ in range(2)]
    for s in held:  # answered, so each has its handler thread, idle on a kept-alive connection
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(s)[0] == 200
    with connect(srv) as s:
        status, headers, resp = read_answer(s)
        assert status == 503 and headers["Retry-After"] == "1" and resp["error"]["code"] == "server_busy"
        assert s.recv(1) == b""
    held.pop().close()  # its thread sees EOF and frees its slot
    status = None
    for _ in range(100):
        with connect(srv) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status = read_answer(s)[0]
        if status == 200:
            break
        time.sleep(0.05)
    assert status == 200
    held.pop().close()


def test_generation_past_the_time_limit_is_cut(start, tiny_lm):
    engine = SlowEngine()
    srv = start(engine=engine, time_limit_s=0.5)
    status, _, resp = post(srv, {"messages": MSG, "max_tokens": 500})  # 10 s at 0.02 s a token
    assert status == 503 and resp["error"]["code"] == "timeout" and "0.5 s" in resp["error"]["message"]
    assert 0 < engine.steps < 500
    status, _, resp = post(srv, {"messages": MSG, "max_tokens": 2})  # the lock was released
    assert status == 200 and engine.steps >= 2 and srv.generate_lock.taken == 2
    tiny_lm(input_ids=torch.tensor([[1, 2]]))  # and the deadline hook was removed from the model


def test_the_time_limit_cuts_hf_generate(tiny_lm, tiny_tokenizer):
    """The deadline check runs inside the default engine's model.generate (no time at all: the first forward)."""
    srv = make_server(tiny_lm, tiny_tokenizer, port=0, limits=Limits(time_limit_s=0.0))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        status, _, resp = post(srv, {"messages": MSG, "max_tokens": 8})
    finally:
        srv.shutdown()
        srv.server_close()
    assert status == 503 and resp["error"]["code"] == "timeout"


@pytest.mark.parametrize("lock_wait_s,time_limit_s", [(0.2, 60.0), (60.0, 0.3)])
def test_requests_that_cannot_get_the_lock_get_503(start, lock_wait_s, time_limit_s):
    """Whichever ends first, the lock wait or the request's time limit, a waiting request gets 503."""
    engine = BlockingEngine()
    srv = start(engine=engine, lock_wait_s=lock_wait_s, time_limit_s=time_limit_s)
    first = {}
    holder = threading.Thread(target=lambda: first.update(answer=post(srv, {"messages": MSG})))
    holder.start()
    assert engine.started.wait(10)
    answers = []
    waiters = [threading.Thread(target=lambda: answers.append(post(srv, {"messages": MSG}))) for _ in range(3)]
    for t in waiters:
        t.start()
    for t in waiters:
        t.join(15)  # a waiter held for the other, longer limit would still be waiting here
    assert len(answers) == 3
    for status, headers, resp in answers:
        assert status == 503 and resp["error"]["code"] == "server_busy" and int(headers["Retry-After"]) >= 1
    assert srv.generate_lock.taken == 1
    engine.release.set()
    holder.join(10)
    assert first["answer"][0] == 200
    assert post(srv, {"messages": MSG})[0] == 200


def test_serve_reports_a_bad_port(monkeypatch, tiny_lm, tiny_tokenizer):
    monkeypatch.setattr("smolthink.models.load_model", lambda spec: (tiny_lm, tiny_tokenizer))
    with pytest.raises(SmolthinkError, match="cannot listen on 127.0.0.1:99999"):
        serve("tiny", port=99999)
