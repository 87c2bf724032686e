"""Test-only instrumentation for smolthink.serve: queued failures, a delay and counters around a real ChatServer,
so the API teacher's retry, Retry-After and concurrency handling can be driven over real HTTP."""
import threading
import time

from smolthink.chat_request import error_body
from smolthink.serve import ChatServer


class Faults:
    """Wraps `server.respond` (the one place every POST is answered).

    fail_next: statuses answered, in order, before serving normally; retry_after: the Retry-After header sent
    with an injected 429/503; delay_s: a sleep inside each request, outside the generation lock, so client
    concurrency becomes observable. Counters: calls (POSTs), in_flight, max_concurrent_seen, generations (200s).
    """

    def __init__(self, server: ChatServer):
        self.server, self.url = server, server.url
        self._respond = server.respond
        server.respond = self.respond
        self._lock = threading.Lock()
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """No queued failures, no delay, counters at zero."""
        self.fail_next: list[int] = []
        self.retry_after: float | None = None
        self.delay_s = 0.0
        self.calls = self.max_concurrent_seen = self.generations = 0

    def respond(self, path, body, authorization):
        """An injected failure if one is queued, else the server's own answer after delay_s."""
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.max_concurrent_seen = max(self.max_concurrent_seen, self.in_flight)
            injected = self.fail_next.pop(0) if self.fail_next else None
        try:
            if injected is not None:
                type_ = ("server_error" if injected >= 500 else "rate_limit_error" if injected == 429
                         else "invalid_request_error")
                headers = ({"Retry-After": f"{self.retry_after:g}"}
                           if self.retry_after is not None and injected in (429, 503) else {})
                return injected, error_body(f"injected failure {injected}", type_, code="injected"), headers
            if self.delay_s > 0:
                time.sleep(self.delay_s)
            answer = self._respond(path, body, authorization)
            if answer[0] == 200:
                with self._lock:
                    self.generations += 1
            return answer
        finally:
            # leave before the handler sends the answer: a client that sends its next request as soon as it
            # reads this response must not be counted as overlapping with this one
            with self._lock:
                self.in_flight -= 1
