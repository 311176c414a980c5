"""A real HTTP webhook receiver on 127.0.0.1 that records requests and can fail or hang on purpose.

A module with its own name (not conftest) so that test files can import the helpers unambiguously.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


def signature_ok(body: bytes, headers: dict[str, str], secret: str) -> bool:
    """Whether the Standard Webhooks reference library (``standardwebhooks``) accepts this delivery with
    ``secret`` (``whsec_<base64>`` or bare base64, as a receiver would be given it), timestamp tolerance included."""
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except WebhookVerificationError:
        return False
    return True


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float


@dataclass
class Receiver:
    port: int = 0
    fail_first: int = 0  # answer 500 to this many requests
    hang_first: int = 0  # sleep ``hang_seconds`` before answering this many requests
    hang_seconds: float = 0.0
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.requests)

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("content-length") or 0))
        with self.lock:
            index = len(self.requests)
            self.requests.append(
                Received(handler.path, {k.lower(): v for k, v in handler.headers.items()}, body, time.time())
            )
        if index < self.hang_first:
            time.sleep(self.hang_seconds)
        code = 500 if index < self.fail_first else 200
        try:
            handler.send_response(code)
            handler.send_header("content-length", "2")
            handler.end_headers()
            handler.wfile.write(b"ok")
        except OSError:
            pass  # the sender gave up (timeout) and closed the connection


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state._answer(self)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)
