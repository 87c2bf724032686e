"""A client for OpenAI-compatible chat-completions APIs, built for generating warm-up traces from a teacher.

Standard library only (urllib + a thread pool). What it adds over a plain loop of HTTP calls:

* bounded concurrency: at most `concurrency` requests in flight;
* retries with exponential backoff and jitter on 408/409/425/429, 5xx, timeouts, connection errors and malformed
  200 answers, honouring `Retry-After` / `retry-after-ms`; other 4xx are permanent (logged, result None), and
  401/403/404 (bad key, wrong URL or model) stop the remaining requests of the batch instead of repeating them;
  a refused connection (nothing listens there: a wrong URL or a server that is down) gets at most
  REFUSED_RETRIES retries, so a dead address fails in seconds rather than after minutes of backoff;
* a resumable on-disk cache, one JSON file per request key, written atomically (temp file, fsync, rename), so
  a rerun after a crash or Ctrl-C never pays twice for a finished request; failures are not cached;
* counters in `teacher.stats`: requests (HTTP attempts), retries, cache_hits, completed, failed, aborted,
  prompt_tokens, completion_tokens, cost_usd, errors (by HTTP status or exception name).
"""
from __future__ import annotations

import copy
import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import SmolthinkError

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429})
FATAL_STATUS = frozenset({401, 403, 404})  # every later request would fail the same way
REFUSED_RETRIES = 2
_SAFE_KEY = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")
_STALE_TMP_S = 3600.0


class _Retryable(Exception):
    """A failed attempt worth retrying; `retry_after` is the server's requested wait in seconds, if any."""

    def __init__(self, reason: str, retry_after: float | None = None, refused: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.refused = refused  # the connection was refused


class _Permanent(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def default_cache_dir(base_url: str, model: str) -> Path:
    """$SMOLTHINK_CACHE (else ~/.cache/smolthink)/api/<hash of base_url and model>."""
    root = Path(os.environ.get("SMOLTHINK_CACHE", Path.home() / ".cache" / "smolthink"))
    return root / "api" / hashlib.sha256(f"{base_url}\n{model}".encode()).hexdigest()[:16]


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date); None when absent/bad."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return None if when is None else max(0.0, when.timestamp() - time.time())


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-style error body, else the first 200 characters of the body."""
    text = raw.decode("utf-8", "replace")
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
    except (ValueError, AttributeError):
        pass
    return text.strip()[:200] or "(empty body)"


class APITeacher:
    """Chat completions from an OpenAI-compatible endpoint, concurrent, retried and cached on disk.

    base_url: e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (a bare http://host:port gets /v1).
    api_key: sent as a Bearer token; defaults to $OPENAI_API_KEY (none sent when neither is set).
    cache_dir: one <key>.json per finished request; default default_cache_dir(base_url, model).
    price_*_per_mtok: USD per million prompt / completion tokens, for stats["cost_usd"].
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 max_retries: int = 6, backoff: float = 0.5, timeout: float = 60.0,
                 cache_dir: str | os.PathLike | None = None, price_in_per_mtok: float = 0.0,
                 price_out_per_mtok: float = 0.0, max_backoff: float = 60.0, max_retry_after: float = 300.0,
                 seed: int | None = None):
        if not base_url or not model:
            raise SmolthinkError("APITeacher needs a base_url and a model")
        if concurrency < 1 or max_retries < 0 or backoff < 0 or timeout <= 0:
            raise SmolthinkError("APITeacher: concurrency >= 1, max_retries >= 0, backoff >= 0, timeout > 0")
        base = base_url.rstrip("/")
        if urlparse(base).path in ("", "/"):
            base += "/v1"
        self.base_url = base
        self.url = base + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or None
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_retry_after = float(max_retry_after)
        self.timeout = float(timeout)
        self.price_in = float(price_in_per_mtok)
        self.price_out = float(price_out_per_mtok)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(base, model)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._clean_stale_tmp()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()  # set by Ctrl-C or a fatal error: workers stop retrying / starting
        self._fatal: str | None = None
        self.last_error: str | None = None  # why the last failed request failed
        self.stats: dict[str, Any] = {
            "requests": 0, "retries": 0, "cache_hits": 0, "completed": 0, "failed": 0, "aborted": 0,
            "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "errors": {},
        }

    # -- public ------------------------------------------------------------------------------------------------
    def complete_many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        """Answer each request -> the API's response object (choices, usage, ...) or None when it failed.

        A request is {"key": stable cache key, "messages": [...], plus any chat-completions parameters
        (temperature, max_tokens, n, top_p, seed, ...)}. Cached keys are answered from disk without a call;
        duplicate keys are asked once. Results keep the order of `requests`.
        """
        results: list[dict[str, Any] | None] = [None] * len(requests)
        pending: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = req.get("key") if isinstance(req, dict) else None
            if not isinstance(key, str) or not key:
                raise SmolthinkError(f"request {i} has no 'key' (a stable, non-empty string)")
            if not isinstance(req.get("messages"), list) or not req["messages"]:
                raise SmolthinkError(f"request {i} ({key}) has no messages")
            if key in pending:
                pending[key].append(i)
                continue
            cached = self._cache_get(key)
            if cached is not None:
                results[i] = cached
                self._count(cache_hits=1)
            else:
                pending[key] = [i]
        if not pending:
            return results
        self._stop.clear()
        self._fatal = None
        start, done, total = time.monotonic(), 0, len(pending)
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, total), thread_name_prefix="api-teacher")
        try:
            futures = {pool.submit(self._complete_one, requests[idx[0]]): key for key, idx in pending.items()}
            for fut in as_completed(futures):
                resp = fut.result()
                first, *rest = pending[futures[fut]]
                results[first] = resp
                for i in rest:
                    results[i] = copy.deepcopy(resp)
                done += 1
                if total >= 20 and done % max(1, total // 10) == 0:
                    log.info("teacher: %d/%d requests done (%.0fs, %d retries, %d failed)", done, total,
                             time.monotonic() - start, self.stats["retries"], self.stats["failed"])
        except BaseException:
            self._stop.set()  # Ctrl-C: stop retries, drop queued requests; finished ones are already cached
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        log.info("teacher: %d requests (%d cached), %d HTTP calls, %d retries, %d failed, %d prompt + %d "
                 "completion tokens, $%.4f", len(requests), len(requests) - total, self.stats["requests"],
                 self.stats["retries"], self.stats["failed"], self.stats["prompt_tokens"],
                 self.stats["completion_tokens"], self.stats["cost_usd"])
        return results

    # -- one request -------------------------------------------------------------------------------------------
    def _complete_one(self, req: dict[str, Any]) -> dict[str, Any] | None:
        key = req["key"]
        body = {"model": self.model, **{k: v for k, v in req.items() if k != "key"}}
        data = json.dumps(body, ensure_ascii=False).encode()
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                self._count(aborted=1)
                return None
            if attempt:
                self._count(retries=1)
            try:
                resp = self._post(data)
            except _Retryable as e:
                last = str(e)
                if attempt >= (min(self.max_retries, REFUSED_RETRIES) if e.refused else self.max_retries):
                    break
                delay = self._delay(attempt, e.retry_after)
                log.debug("teacher: %s: %s; retry %d/%d in %.2fs", key, last, attempt + 1, self.max_retries,
                          delay)
                if self._sleep(delay):
                    self._count(aborted=1)
                    return None
                continue
            except _Permanent as e:
                self._count(failed=1)
                self.last_error = f"HTTP {e.status}: {e}"
                if e.status in FATAL_STATUS:
                    with self._lock:
                        first = self._fatal is None
                        self._fatal = self._fatal or str(e)
                    self._stop.set()
                    if first:
                        log.error("teacher: %s (HTTP %d from %s); stopping the remaining requests", e, e.status,
                                  self.url)
                else:
                    log.warning("teacher: request %s failed: HTTP %d: %s", key, e.status, e)
                return None
            self._account(resp)
            self._cache_put(key, body, resp)
            return resp
        self._count(failed=1)
        self.last_error = last
        log.warning("teacher: request %s failed after %d attempts: %s", key, attempt + 1, last)
        return None

    def _post(self, data: bytes) -> dict[str, Any]:
        """One HTTP attempt -> the parsed response; raises _Retryable or _Permanent."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        self._count(requests=1)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            try:
                raw = e.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            finally:
                e.close()
            self._count_error(str(e.code))
            reason = _error_message(raw)
            if e.code in RETRY_STATUS or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {reason}", parse_retry_after(e.headers)) from None
            raise _Permanent(e.code, reason) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timeout
            self._count_error(type(e).__name__)
            refused = isinstance(getattr(e, "reason", e), ConnectionRefusedError)
            raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', None) or e}", refused=refused) from None
        try:
            resp = json.loads(raw)
        except ValueError:
            resp = None
        if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list) or not resp["choices"]:
            self._count_error("malformed")
            raise _Retryable(f"malformed response: {raw[:120]!r}")
        return resp

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry number attempt+1: the server's Retry-After when given (capped), else
        exponential backoff with jitter in [base/2, base]."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        base = min(self.max_backoff, self.backoff * (2 ** attempt))
        return base / 2 + self._rng.uniform(0, base / 2)

    def _sleep(self, seconds: float) -> bool:
        """Wait; True when the batch was stopped meanwhile (a seam for tests)."""
        return self._stop.wait(seconds) if seconds > 0 else self._stop.is_set()

    # -- accounting --------------------------------------------------------------------------------------------
    def _count(self, **delta: int) -> None:
        with self._lock:
            for k, v in delta.items():
                self.stats[k] += v

    def _count_error(self, name: str) -> None:
        with self._lock:
            self.stats["errors"][name] = self.stats["errors"].get(name, 0) + 1

    def _account(self, resp: dict[str, Any]) -> None:
        usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
        p = usage.get("prompt_tokens") or 0
        c = usage.get("completion_tokens") or 0
        p = p if isinstance(p, int) else 0
        c = c if isinstance(c, int) else 0
        with self._lock:
            self.stats["completed"] += 1
            self.stats["prompt_tokens"] += p
            self.stats["completion_tokens"] += c
            self.stats["cost_usd"] += (p * self.price_in + c * self.price_out) / 1e6

    # -- cache -------------------------------------------------------------------------------------------------
    def cache_path(self, key: str) -> Path:
        """<cache_dir>/<key>.json for plain keys, else <cache_dir>/<sha256(key)>.json."""
        name = key if _SAFE_KEY.fullmatch(key) else hashlib.sha256(key.encode()).hexdigest()
        return self.cache_dir / f"{name}.json"

    def _cache_get(self, key: str) -> dict[str, Any] | None:
        path = self.cache_path(key)
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # truncated or corrupt: ask again (the rewrite replaces it)
            log.warning("teacher: ignoring unreadable cache file %s (%s)", path, type(e).__name__)
            return None
        if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("response"), dict):
            log.warning("teacher: ignoring cache file %s (not an entry for this key)", path)
            return None
        return entry["response"]

    def _cache_put(self, key: str, body: dict[str, Any], resp: dict[str, Any]) -> None:
        path = self.cache_path(key)
        entry = {"key": key, "time": time.time(), "url": self.url, "request": body, "response": resp}
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=self.cache_dir)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as e:  # a full disk must not lose the answer we already paid for in this run
            log.warning("teacher: could not cache %s: %s", key, e)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def _clean_stale_tmp(self) -> None:
        """Delete temp files left by a crashed run (older than an hour, so a live writer is never disturbed)."""
        now = time.time()
        for tmp in self.cache_dir.glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_S:
                    tmp.unlink()
            except OSError:
                pass
