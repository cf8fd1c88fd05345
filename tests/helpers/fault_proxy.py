"""A fault-injecting HTTP proxy for S3 tests: forwards to a real endpoint (moto_server) and
answers some requests itself with an S3 error (503 SlowDown, 500 InternalError, 403 ...)."""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer"}
_CODES = {503: ("SlowDown", "Please reduce your request rate."),
          500: ("InternalError", "We encountered an internal error. Please try again."),
          403: ("AccessDenied", "Access Denied")}


class FaultProxy:
    """``fail_every=N`` answers every Nth request with an error; ``fail_all`` answers all of them;
    ``fail_after=K`` lets the first K (matching) requests through and fails every later one.

    Errors cycle through ``statuses`` (503 SlowDown, 500 InternalError, 403 AccessDenied).
    ``methods`` limits the faults to those HTTP methods (e.g. {"GET", "HEAD"}). Counters:
    ``requests``, ``matching``, ``injected``. A context manager; give ``endpoint`` to the S3 client.
    """

    def __init__(self, target: str, fail_every: int = 0, statuses: tuple[int, ...] = (503,),
                 methods: set[str] | None = None, fail_after: int | None = None):
        self.target = urlsplit(target)
        self.fail_every, self.statuses, self.methods, self.fail_after = fail_every, statuses, methods, fail_after
        self.fail_all = False
        self.requests = self.matching = self.injected = 0
        self.trace: list[tuple] = []  # (method, path, upstream status, body head) of forwarded requests
        self._lock = threading.Lock()
        self._just_failed: set[tuple[str, str]] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                body = self._read_body()
                status = proxy._fault_for(self.command, self.path)
                if status:
                    self._send_fault(status)
                else:
                    self._forward(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send_fault(self, status: int) -> None:
                code, message = _CODES.get(status, ("InternalError", "injected"))
                payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _forward(self, body: bytes) -> None:
                upstream = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    proxy.trace.append((self.command, self.path[:80], response.status, data[:300]))
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _fault_for(self, method: str, path: str = "") -> int:
        """0 = forward this request, else the HTTP status to answer with. With ``fail_every``, the
        retry of a request that was just failed gets through (a flaky server, not a broken one):
        otherwise a retry loop whose requests fall in step with every Nth one fails every attempt."""
        with self._lock:
            self.requests += 1
            if self.methods and method not in self.methods:
                return 0
            self.matching += 1
            retry = (method, path) in self._just_failed
            self._just_failed.discard((method, path))
            fail = (self.fail_all or (self.fail_every > 0 and self.matching % self.fail_every == 0 and not retry)
                    or (self.fail_after is not None and self.matching > self.fail_after))
            if not fail:
                return 0
            self._just_failed.add((method, path))
            self.injected += 1
            return self.statuses[(self.injected - 1) % len(self.statuses)]

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
