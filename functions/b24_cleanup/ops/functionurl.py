"""A loopback stand-in for a Lambda Function URL: HTTP in, payload-2.0 event to a handler, HTTP out.

With it the emulator's portals POST their `ONAPPINSTALL` / `ONAPPUNINSTALL` bodies over real
HTTP to the real endpoint handler, the way Bitrix24 reaches the deployed Function URL. Used by
the demo and the tests; never deployed.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]


class FakeContext:
    """The parts of LambdaContext that Powertools reads."""

    def __init__(self, name: str = "b24-cleanup-local") -> None:
        self.function_name = name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = 256
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{name}"
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{name}"
        self.log_stream_name = "local"

    def get_remaining_time_in_millis(self) -> int:
        return 120_000  # the worker's timeout in template.yaml


def function_url_event(method: str, path: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The event a Function URL hands to Lambda (payload 2.0); bodies arrive base64-encoded."""
    parts = urlsplit(path)
    request_id = str(uuid.uuid4())
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": parts.path or "/",
        "rawQueryString": parts.query,
        "headers": {k.lower(): v for k, v in headers.items()},
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "local",
            "domainName": "localhost",
            "http": {
                "method": method,
                "path": parts.path or "/",
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": headers.get("User-Agent", ""),
            },
            "requestId": request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime()),
            "timeEpoch": int(time.time() * 1000),
        },
        "body": base64.b64encode(body).decode() if body else None,
        "isBase64Encoded": bool(body),
    }


class FunctionUrl:
    """Serve `handler` on http://127.0.0.1:PORT/ until stopped."""

    def __init__(self, handler: Handler, *, name: str = "b24-cleanup-endpoint") -> None:
        self.handler = handler
        self.name = name
        self.calls: list[int] = []  # status codes answered, in order
        outer = self

        class _Request(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                event = function_url_event(self.command, self.path, dict(self.headers.items()), body)
                answer = outer.handler(event, FakeContext(outer.name))
                status = int(answer.get("statusCode", 200))
                payload = answer.get("body") or ""
                data = base64.b64decode(payload) if answer.get("isBase64Encoded") else str(payload).encode()
                outer.calls.append(status)
                self.send_response(status)
                for key, value in (answer.get("headers") or {}).items():
                    self.send_header(key, str(value))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Request)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def __enter__(self) -> FunctionUrl:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
