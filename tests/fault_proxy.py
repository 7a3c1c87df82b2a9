"""A fault-injecting HTTP proxy in front of an S3 endpoint (the moto server), for tests.

Every request is forwarded unchanged to the endpoint, except the GETs of the chosen object keys:
the first ``fail_first`` GETs of each such key are answered ``503 SlowDown`` (the error S3 sends
when it throttles) and are not forwarded. Point ``AWS_ENDPOINT_URL`` at :attr:`FaultProxy.url` and
every S3 client of the project (pyarrow's, in this process and in Ray workers) goes through it;
:attr:`FaultProxy.gets` records each GET of a chosen key with the status it got.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"}


class FaultProxy:
    """Forwards to ``endpoint`` (``http://host:port``); :meth:`fail` chooses the keys to fail."""

    def __init__(self, endpoint: str):
        target = urlsplit(endpoint)
        self.target = (target.hostname, target.port)
        self.faults: dict[str, int] = {}  # "bucket/key" -> GETs of it still to fail (-1: all of them)
        self.gets: dict[str, list[int]] = {}  # "bucket/key" -> status of each GET, in order
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fail(self, uri: str, fail_first: int = 1) -> None:
        """Answer the first ``fail_first`` GETs of ``s3://bucket/key`` with 503 (-1: every GET)."""
        key = uri.removeprefix("s3://")
        with self.lock:
            self.faults[key] = fail_first
            self.gets[key] = []

    def statuses(self, uri: str) -> list[int]:
        with self.lock:
            return list(self.gets.get(uri.removeprefix("s3://"), []))

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _injected(self, method: str, path: str) -> bool:
        """Whether this request is answered with the injected error (and records the GET)."""
        key = unquote(urlsplit(path).path).lstrip("/")
        with self.lock:
            if method != "GET" or key not in self.faults:
                return False
            left = self.faults[key]
            if left:
                self.faults[key] = left - 1 if left > 0 else -1
                self.gets[key].append(503)
                return True
            self.gets[key].append(0)  # forwarded: its status is filled in when the answer comes back
            return False

    def _record(self, method: str, path: str, status: int) -> None:
        key = unquote(urlsplit(path).path).lstrip("/")
        with self.lock:
            if method == "GET" and key in self.gets and 0 in self.gets[key]:
                self.gets[key][self.gets[key].index(0)] = status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args) -> None:  # quiet: one line per request otherwise
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                length = next((v for n, v in headers if n.lower() == "content-length"), None)
                self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self) -> None:
                body = self._body()
                if proxy._injected(self.command, self.path):
                    self._answer(503, [("Content-Type", "application/xml")], SLOW_DOWN)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.target, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                    proxy._record(self.command, self.path, answer.status)
                    self._answer(answer.status, answer.getheaders(), data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler
