"""A local HTTP server on 127.0.0.1 standing in for NIST's, and a network that resolves nothing else.

The fixtures `server` and `offline_network` in conftest.py use these.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------- local server

# A stalled server stays silent far longer than the client's stall timeout, which leaves a loaded 2-core
# machine seconds of slack to deliver the data sent before the stall: the client times out on the stall,
# never on a slow moment before it, and well before the stall ends.
STALL_SECONDS = 60
STALL_TIMEOUT = 3


class FakeServer:
    """State shared with the handler: files to serve, failure switches and a request log."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ignore_range = False
        self.stall_headers = False  # stall before sending the status line
        self.stall_after: int | None = None  # send this many body bytes, then stall
        self.cut_after: int | None = None  # send this many body bytes, then close
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.release = threading.Event()  # ends every stall (set when the test ends)
        self.stalled = threading.Event()  # set when a handler starts stalling
        self.url = ""

    def ranges(self) -> list[str | None]:
        return [r for _, r in self.requests]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self):  # noqa: N802
        srv: FakeServer = self.server.state
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        if srv.stall_headers:
            srv.stalled.set()
            srv.release.wait(STALL_SECONDS)
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.stall_after is not None:
            self.wfile.write(body[: srv.stall_after])
            self.wfile.flush()
            srv.stalled.set()
            srv.release.wait(STALL_SECONDS)
            return
        if srv.cut_after is not None:
            self.wfile.write(body[: srv.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # don't wait for stalled handlers on close

    def handle_error(self, request, client_address):
        pass  # the client hanging up on a stalled handler is expected


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()
