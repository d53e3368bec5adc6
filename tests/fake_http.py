"""A JSON HTTP server on 127.0.0.1 for the tests' fakes of remote APIs (Kubeflow Pipelines, Kubernetes):
each request goes to ``handle(method, path, query, body, headers) -> (status, payload)``; the server
is shut down when the ``with`` block ends."""

from __future__ import annotations

import contextlib
import email
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Handle = Callable[[str, str, dict, "dict | None", dict], "tuple[int, dict]"]


def _form_fields(content_type: str, raw: bytes) -> dict[str, str]:
    """A multipart/form-data body (a file upload) as {field name: its text}."""
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True).decode("utf-8")
        for part in message.get_payload()
    }


@contextlib.contextmanager
def serve(handle: Handle) -> Iterator[str]:
    """Serve ``handle``; yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            kind = self.headers.get("Content-Type", "")
            body = (
                _form_fields(kind, raw)
                if kind.startswith("multipart/form-data")
                else json.loads(raw)
                if raw
                else None
            )
            status, payload = handle(
                method, url.path, urllib.parse.parse_qs(url.query), body, dict(self.headers)
            )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_POST(self):  # noqa: N802
            self._serve("POST")

        def do_DELETE(self):  # noqa: N802
            self._serve("DELETE")

        def log_message(self, *args):  # keep the test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
