"""S3 endpoints for tests: a moto server on 127.0.0.1, and a proxy that makes it unreliable.

`FaultyS3Proxy` sits between boto3 and moto. For a seeded share of requests it fails the request
*before* forwarding it, alternating the two failures S3 clients must survive: a `503 SlowDown`
with S3's XML error body (a throttle), or a connection reset (SO_LINGER 0, no answer). Every other
request goes to moto intact, each over a fresh upstream connection with `Connection: close`, and
moto's response is relayed back on the client's keep-alive connection with its own framing
(Content-Length). `lose_next_responses = N` makes it forward the next N requests and then reset
instead of answering: the "it happened, but the client never heard" case that makes clients retry
requests which already succeeded.
"""

from __future__ import annotations

import io
import logging
import random
import socket
import struct
import threading
import uuid
from urllib.parse import urlsplit

from moto.server import ThreadedMotoServer

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect",
               "content-length"}


def start_moto_server() -> tuple[ThreadedMotoServer, str]:
    """Start moto on a free loopback port; returns (server, endpoint URL)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _read_head(rfile) -> tuple[bytes, list[tuple[str, str]]] | None:
    """The start line and headers of the next HTTP message; None at a clean end of stream."""
    line = rfile.readline(65537)
    while line in (b"\r\n", b"\n"):
        line = rfile.readline(65537)
    if not line:
        return None
    headers = []
    while (header := rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return line.rstrip(b"\r\n"), headers


def _header(headers, name: str, default: str = "") -> str:
    return next((v for k, v in headers if k.lower() == name), default)


def _read_body(rfile, headers) -> bytes:
    if "chunked" in _header(headers, "transfer-encoding").lower():
        chunks = []
        while size := int(rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(rfile.read(size))
            rfile.readline()  # the CRLF after each chunk
        while rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers: dropped
            pass
        return b"".join(chunks)
    return rfile.read(int(_header(headers, "content-length", "0")))


def _message(start_line: bytes, headers, body: bytes = b"") -> bytes:
    head = b"\r\n".join([start_line] + [f"{k}: {v}".encode("latin-1") for k, v in headers])
    return head + b"\r\n\r\n" + body


def _reset(sock: socket.socket) -> None:
    """Close so that the peer gets a TCP RST rather than an orderly FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _slowdown_response(method: bytes) -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    body = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
            "<Message>Please reduce your request rate.</Message>"
            f"<RequestId>{request_id}</RequestId><HostId>faulty-proxy</HostId></Error>").encode()
    headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body))),
               ("x-amz-request-id", request_id)]
    return _message(b"HTTP/1.1 503 Slow Down", headers, b"" if method == b"HEAD" else body)


class FaultyS3Proxy:
    def __init__(self, upstream_url: str, fail_rate: float = 0.3, seed: int = 0):
        upstream = urlsplit(upstream_url)
        self._upstream = (upstream.hostname, upstream.port)
        self.fail_rate = fail_rate
        self.lose_next_responses = 0
        self.num_requests = 0
        self.num_forwarded = 0
        self.num_slowdowns = 0
        self.num_resets = 0
        self.num_lost_responses = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._open_sockets: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # lets the accept loop notice stop()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def num_faults(self) -> int:
        return self.num_slowdowns + self.num_resets

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._listener.close()
        with self._lock:
            for sock in self._open_sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes its thread's blocking read
                except OSError:  # already closed by the peer
                    pass

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(None)
            with self._lock:
                self._open_sockets.add(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _next_action(self) -> str:
        with self._lock:
            self.num_requests += 1
            if self._rng.random() >= self.fail_rate:
                self.num_forwarded += 1
                if self.lose_next_responses > 0:
                    self.lose_next_responses -= 1
                    self.num_lost_responses += 1
                    return "forward-then-reset"
                return "forward"
            if self.num_faults % 2 == 0:
                self.num_slowdowns += 1
                return "slowdown"
            self.num_resets += 1
            return "reset"

    def _serve(self, sock: socket.socket) -> None:
        try:
            rfile = sock.makefile("rb")
            while (head := _read_head(rfile)) is not None:
                start_line, headers = head
                if _header(headers, "expect").lower() == "100-continue":
                    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(rfile, headers)
                action = self._next_action()
                if action == "reset":
                    return _reset(sock)
                if action == "slowdown":
                    sock.sendall(_slowdown_response(start_line.split(b" ")[0]))
                    continue
                response = self._forward(start_line, headers, body)
                if action == "forward-then-reset":
                    return _reset(sock)
                sock.sendall(response)
                if _header(headers, "connection").lower() == "close":
                    return
        except OSError:  # the client went away, or stop() shut the socket
            pass
        finally:
            with self._lock:
                self._open_sockets.discard(sock)
            sock.close()

    def _forward(self, start_line: bytes, headers, body: bytes) -> bytes:
        """Send one request to moto on a fresh connection; return the response re-framed."""
        headers = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
        headers += [("Content-Length", str(len(body))), ("Connection", "close")]
        with socket.create_connection(self._upstream, timeout=30) as upstream:
            upstream.sendall(_message(start_line, headers, body))
            raw = upstream.makefile("rb").read()  # until moto closes: Connection: close
        rfile = io.BytesIO(raw)
        status_line, response_headers = _read_head(rfile)
        status = int(status_line.split(b" ")[1])
        has_body = not start_line.startswith(b"HEAD") and status not in (204, 304)
        if "chunked" in _header(response_headers, "transfer-encoding").lower():
            response_body = _read_body(rfile, response_headers)
        else:
            response_body = rfile.read() if has_body else b""
        kept = [(k, v) for k, v in response_headers if k.lower() not in _HOP_BY_HOP]
        if has_body:
            kept.append(("Content-Length", str(len(response_body))))
        else:  # HEAD: Content-Length describes the object, keep moto's
            kept += [(k, v) for k, v in response_headers if k.lower() == "content-length"]
        # Reframed for the client's keep-alive connection, whatever moto's HTTP version was.
        return _message(b"HTTP/1.1" + status_line[status_line.index(b" "):], kept, response_body)
