"""A real HTTP server on 127.0.0.1 for the staging tests (Range requests, ETag, chosen headers)."""

from __future__ import annotations

import http.server
import re
import threading
from typing import Any


class Server:
    """Serves ``files`` with Range support; ``cut`` makes the next full GETs stop half-way.

    ``headers`` adds response headers per path (a Content-Encoding, a Content-Type). Use it
    as a context manager: the server runs on 127.0.0.1 inside the ``with``.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.requests: list[dict[str, str]] = []
        self.cut = 0
        self.etag = '"v1"'
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append({"path": self.path, **{k: v for k, v in self.headers.items()}})
                path = self.path.split("?")[0]
                body = outer.files.get(path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                ranged = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if ranged and (if_range is None or if_range == outer.etag):
                    start = int(re.match(r"bytes=(\d+)-", ranged).group(1))  # type: ignore[union-attr]
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("ETag", outer.etag)
                for key, value in outer.headers.get(path, {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if outer.cut and not ranged:
                    outer.cut -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
