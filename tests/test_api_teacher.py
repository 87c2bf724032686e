"""The OpenAI-compatible server (serve.py) and the API teacher client (teacher_api.py), end to end over real HTTP
on 127.0.0.1: a tiny random Llama with the real SmolLM2 tokenizer behind the server, urllib in front of it."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from fault_server import Faults

from smolthink.chat import render_prompt
from smolthink.serve import make_server
from smolthink.teacher_api import APITeacher, parse_retry_after

MSG = [{"role": "user", "content": "Is every cat an animal?"}]


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    from tiny import tiny_model

    model = tiny_model(vocab_size=len(tiny_tokenizer))
    srv = make_server(model, tiny_tokenizer, host="127.0.0.1", port=0)
    faults = Faults(srv)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield faults
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def srv(server):
    """The shared server's fault knobs and counters (tests/fault_server.py), reset."""
    server.reset()
    yield server
    server.reset()


def teacher_for(srv, tmp_path, **kw):
    kw = {"concurrency": 1, "backoff": 0.01, "timeout": 30, "cache_dir": tmp_path / "cache", **kw}
    return APITeacher(srv.url, "smolthink-local", api_key="test", **kw)


def reqs(keys, **params):
    return [{"key": k, "messages": [{"role": "user", "content": f"question {k}"}], "max_tokens": 8,
             "temperature": 0.7, "n": 1, "seed": i, **params} for i, k in enumerate(keys)]


def http(srv, method, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(srv.url.removesuffix("/v1") + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---------------------------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------------------------

def test_chat_completion_round_trip(srv, tiny_tokenizer):
    body = {"model": "smolthink-local", "messages": MSG, "max_tokens": 8, "n": 2, "temperature": 0.9, "seed": 3}
    status, resp = http(srv, "POST", "/v1/chat/completions", body)
    assert status == 200 and resp["object"] == "chat.completion" and resp["model"] == "smolthink-local"
    assert len(resp["choices"]) == 2
    for i, c in enumerate(resp["choices"]):
        assert c["index"] == i and c["message"]["role"] == "assistant"
        assert isinstance(c["message"]["content"], str) and "<|im_" not in c["message"]["content"]
        assert c["finish_reason"] in ("stop", "length")
    u = resp["usage"]
    assert u["prompt_tokens"] == len(render_prompt(tiny_tokenizer, MSG))
    assert 2 <= u["completion_tokens"] <= 16 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # the random tiny model rarely emits EOS: 8 tokens each means it was cut at max_tokens
    if u["completion_tokens"] == 16:
        assert all(c["finish_reason"] == "length" for c in resp["choices"])
    # a seed reproduces the sample; greedy n>1 gives identical choices
    assert http(srv, "POST", "/v1/chat/completions", body)[1]["choices"] == resp["choices"]
    greedy = http(srv, "POST", "/v1/chat/completions", {**body, "temperature": 0, "seed": None})[1]
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]
    status, models = http(srv, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["smolthink-local"]
    assert srv.calls == 3  # GETs are not counted


def test_bad_requests_get_openai_errors(srv):
    status, resp = http(srv, "POST", "/v1/chat/completions", raw=b'{"messages": [')
    assert status == 400 and resp["error"]["type"] == "invalid_request_error" and "JSON" in resp["error"]["message"]
    status, resp = http(srv, "POST", "/v1/chat/completions", {"messages": MSG, "n": 0})
    assert status == 400 and resp["error"]["param"] == "n"
    status, resp = http(srv, "POST", "/v1/chat/completions", {"messages": []})
    assert status == 400 and resp["error"]["param"] == "messages"
    status, resp = http(srv, "POST", "/v1/nope", {"messages": MSG})
    assert status == 404 and "error" in resp
    srv.fail_next = [503]
    status, resp = http(srv, "POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": 1})
    assert status == 503 and resp["error"]["type"] == "server_error" and srv.fail_next == []
    assert srv.generations == 0 and srv.in_flight == 0


# ---------------------------------------------------------------------------------------------------------------
# the teacher client
# ---------------------------------------------------------------------------------------------------------------

def test_teacher_retries_through_429_and_503(srv, tmp_path):
    srv.fail_next = [429, 503]
    t = teacher_for(srv, tmp_path, price_in_per_mtok=1.0, price_out_per_mtok=2.0)
    slept = []
    t._sleep = lambda s: slept.append(s) or False
    out = t.complete_many(reqs(["a"]))
    assert out[0] is not None and out[0]["choices"][0]["message"]["content"] is not None
    assert srv.calls == 3
    s = t.stats
    assert (s["requests"], s["retries"], s["completed"], s["failed"]) == (3, 2, 1, 0)
    assert s["errors"] == {"429": 1, "503": 1}
    assert 0.005 <= slept[0] <= 0.01 and 0.01 <= slept[1] <= 0.02  # exponential backoff with jitter
    u = out[0]["usage"]
    assert s["prompt_tokens"] == u["prompt_tokens"] and s["completion_tokens"] == u["completion_tokens"]
    assert s["cost_usd"] == pytest.approx((u["prompt_tokens"] + 2 * u["completion_tokens"]) / 1e6)


def test_teacher_honours_retry_after(srv, tmp_path):
    srv.fail_next, srv.retry_after = [429, 503], 0.25
    t = teacher_for(srv, tmp_path)
    slept = []
    t._sleep = lambda s: slept.append(s) or False
    assert t.complete_many(reqs(["a"]))[0] is not None
    assert slept == [0.25, 0.25]
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a past date
    assert parse_retry_after({}) is None


def test_teacher_does_not_retry_400_and_stops_on_401(srv, tmp_path):
    srv.fail_next = [400]
    t = teacher_for(srv, tmp_path)
    out = t.complete_many(reqs(["bad", "good"]))
    assert out[0] is None and out[1] is not None  # a 400 fails that request only
    assert srv.calls == 2 and t.stats["retries"] == 0 and t.stats["failed"] == 1
    assert not t.cache_path("bad").exists() and t.cache_path("good").exists()  # failures are not cached

    srv.calls, srv.fail_next = 0, [401]
    t = teacher_for(srv, tmp_path / "b")
    assert t.complete_many(reqs(["x", "y", "z"])) == [None, None, None]
    assert srv.calls == 1 and t.stats["aborted"] == 2  # a bad key is not repeated for every request


def test_teacher_gives_up_after_max_retries_and_retries_connection_errors(srv, tmp_path):
    srv.fail_next = [500, 502, 500]
    t = teacher_for(srv, tmp_path, max_retries=2)
    t._sleep = lambda s: False
    assert t.complete_many(reqs(["a"])) == [None]
    assert srv.calls == 3 and t.stats["failed"] == 1
    assert t.complete_many(reqs(["a"]))[0] is not None  # not cached, so a rerun asks again

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = APITeacher(f"http://127.0.0.1:{port}", "m", concurrency=1, max_retries=1, backoff=0,
                      cache_dir=tmp_path / "dead")
    assert dead.url == f"http://127.0.0.1:{port}/v1/chat/completions"
    assert dead.complete_many(reqs(["a"])) == [None]
    assert dead.stats["requests"] == 2 and dead.stats["retries"] == 1 and dead.stats["failed"] == 1


def test_a_refused_connection_gets_few_retries_and_a_reason(tmp_path):
    """Nothing listens there: REFUSED_RETRIES retries, not max_retries, and the reason is kept for the caller."""
    from smolthink.teacher_api import REFUSED_RETRIES

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = APITeacher(f"http://127.0.0.1:{port}", "m", concurrency=1, max_retries=6, backoff=0,
                      cache_dir=tmp_path / "dead")
    assert dead.complete_many(reqs(["a", "b"])) == [None, None]
    assert dead.stats["requests"] == 2 * (1 + REFUSED_RETRIES) < 2 * 7 and dead.stats["failed"] == 2
    assert "refused" in dead.last_error.lower()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_teacher_concurrency_limit(srv, tmp_path, concurrency):
    srv.delay_s = 0.15  # each request stays in flight a while, so overlap is observable
    t = teacher_for(srv, tmp_path, concurrency=concurrency)
    out = t.complete_many(reqs([f"k{i}" for i in range(7)]))
    assert all(o is not None for o in out) and srv.calls == 7
    assert srv.max_concurrent_seen <= concurrency
    if concurrency > 1:
        assert srv.max_concurrent_seen > 1  # the gauge really sees overlap, so the bound above can fail


def test_teacher_cache_resume_makes_no_calls(srv, tmp_path):
    keys = ["q0", "q1", "q2", "a key/with spaces"]
    t = teacher_for(srv, tmp_path, concurrency=2)
    first = t.complete_many(reqs(keys))
    assert all(first) and srv.calls == 4
    calls = srv.calls
    again = teacher_for(srv, tmp_path, concurrency=2)  # a fresh process would build a fresh teacher
    second = again.complete_many(reqs(keys))
    assert srv.calls == calls and again.stats["requests"] == 0 and again.stats["cache_hits"] == 4
    assert second == first
    # duplicate keys in one batch are asked once
    dup = teacher_for(srv, tmp_path / "dup")
    out = dup.complete_many(reqs(["same", "same"]))
    assert srv.calls == calls + 1 and out[0] == out[1] and out[0] is not out[1]


class Crash(BaseException):
    """Stands in for the process dying (or Ctrl-C) between writing a temp file and renaming it."""


def test_teacher_cache_survives_a_crash_midway(srv, tmp_path):
    keys = [f"k{i}" for i in range(6)]
    t = teacher_for(srv, tmp_path)  # one worker: k0, k1, k2 finish before k3 crashes
    real_put = t._cache_put

    def crashing_put(key, body, resp):
        if key == "k3":
            (t.cache_dir / f".{key}.partial.tmp").write_text('{"key": "k3", "respo')
            raise Crash()
        real_put(key, body, resp)

    t._cache_put = crashing_put
    with pytest.raises(Crash):
        t.complete_many(reqs(keys))
    deadline = time.monotonic() + 10  # the abandoned worker thread stops at its next check
    while any(th.name.startswith("api-teacher") for th in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(t.cache_path(k).exists() for k in ("k0", "k1", "k2")) and not t.cache_path("k3").exists()
    t.cache_path("k4").write_text('{"key": "k4", "response": {"cho')  # a torn file: must be ignored too

    done = [k for k in keys if k != "k4" and t.cache_path(k).exists()]
    calls = srv.calls
    resumed = teacher_for(srv, tmp_path)
    out = resumed.complete_many(reqs(keys))
    assert all(out)
    assert srv.calls - calls == len(keys) - len(done) >= 3  # only the unfinished ones are asked again
    assert resumed.stats["cache_hits"] == len(done)
    for k in keys:  # every entry is now complete JSON for its key
        assert json.loads(t.cache_path(k).read_text())["key"] == k
    calls = srv.calls
    assert teacher_for(srv, tmp_path).complete_many(reqs(keys)) == out and srv.calls == calls
    # the leftover temp file is never read, and is cleaned once stale
    tmp = t.cache_dir / ".k3.partial.tmp"
    assert tmp.exists()
    import os
    os.utime(tmp, (time.time() - 7200, time.time() - 7200))
    teacher_for(srv, tmp_path)
    assert not tmp.exists()
