"""A local HTTP server that answers like the model hubs' download endpoints, for ``underpaint pull`` tests.

- ``/hf/<owner>/<repo>/resolve/<rev>/<file>``: 302 to ``/cdn/<file>`` with ``X-Linked-Etag`` (the sha256, quoted)
  and ``X-Linked-Size``, as huggingface.co does for LFS files;
- ``/civitai/api/download/models/<id>``: 307 to a signed ``/cdn/<file>?sig=...``, the file named only in the CDN
  answer's ``Content-Disposition``, as civitai.com does;
- ``/cdn/<file>``: the bytes, honouring ``Range`` (206 + ``Content-Range``); ``truncate_next`` makes the next answer
  announce the full length and stop half-way; ``ignore_range`` answers 200 with the whole file to a range request;
  ``hold_at`` makes the next answer send that many bytes and then wait (``holding`` is set) until ``release``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Hub:
    files: dict[str, bytes] = field(default_factory=dict)
    civitai: dict[str, str] = field(default_factory=dict)  # version id -> file name
    wrong_etag: set[str] = field(default_factory=set)  # files whose announced sha256 is wrong
    truncate_next: bool = False
    ignore_range: bool = False
    hold_at: int | None = None
    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    base: str = ""


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            hub.requests.append((self.path, self.headers.get("Range")))
            path = self.path.split("?", 1)[0]
            if path.startswith("/hf/") and "/resolve/" in path:
                name = path.rsplit("/", 1)[-1]
                data = hub.files.get(name)
                if data is None:
                    return self._plain(404, b"Entry not found")
                digest = hashlib.sha256(b"other" if name in hub.wrong_etag else data).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"{hub.base}/cdn/{name}")
                self.send_header("X-Linked-Etag", f'"{digest}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if path.startswith("/civitai/api/download/models/"):
                blob = hub.civitai.get(path.rsplit("/", 1)[-1])
                if blob is None:
                    return self._plain(404, b"not found")
                self.send_response(307)
                self.send_header("Location", f"{hub.base}/cdn/blob-{blob}?sig=abc&name={blob}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if path.startswith("/cdn/"):
                return self._file(path[len("/cdn/") :])
            return self._plain(404, b"no such endpoint")

        def _file(self, key: str) -> None:
            named = key.removeprefix("blob-")
            data = hub.files.get(named)
            if data is None:
                return self._plain(404, b"gone")
            start = 0
            wanted = self.headers.get("Range")
            if wanted and not hub.ignore_range:
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            if key.startswith("blob-"):  # civitai's CDN names the file only here
                self.send_header("Content-Disposition", f'attachment; filename="{named}"')
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if hub.hold_at is not None and start < hub.hold_at:
                held, hub.hold_at = hub.hold_at - start, None
                self.wfile.write(body[:held])
                self.wfile.flush()
                hub.holding.set()
                hub.release.wait(60)
                body = body[held:]
            if hub.truncate_next:
                hub.truncate_next = False
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return None
            self.wfile.write(body)
            return None

        def _plain(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextmanager
def running_hub(hub: Hub) -> Iterator[Hub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.release.set()
        server.shutdown()
        server.server_close()
