"""Waitress answers some requests itself, before the app sees them (a body over its size limit, a
malformed request line, oversized headers) with a text/plain page. This makes those answers
OpenAI-shaped JSON too: `use_json_errors(server)` on the server that `create_server` returned.
"""

from __future__ import annotations

import json

from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

_CODES = {413: "request_too_large", 431: "request_header_too_large"}


class JSONErrorTask(ErrorTask):
    def execute(self):
        error = self.request.error
        code = _CODES.get(error.code, error.reason.lower().replace(" ", "_"))
        kind = "server_error" if error.code >= 500 else "invalid_request_error"
        message = ("the request body is larger than this server's limit (MAX_REQUEST_BYTES)" if error.code == 413
                   else f"{error.reason}: {error.body}")
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JSONErrorChannel(HTTPChannel):
    error_task_class = JSONErrorTask


def use_json_errors(server) -> None:
    server.channel_class = JSONErrorChannel
