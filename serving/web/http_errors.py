"""The one table from the core's errors to HTTP: each domain error's status and OpenAI error type.

Every error a client sees has OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
`problem(exc)` turns any exception into that answer: a domain error (serving.errors) through the
table, one of Flask's own routing errors (404, 405, 413) as such, anything else as a 500 whose
message names only the exception's type (the details go to the log).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Optional

from flask import request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serving import errors

log = logging.getLogger(__name__)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """`text` from a request (its path) with control characters escaped (\\x0a), for the log and for messages:
    `%0a` in a URL path decodes to a newline, which wrote a forged line in the server's own format into the log."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                        text)

# domain error -> (HTTP status, OpenAI error type)
TABLE = {
    errors.InvalidRequest: (400, "invalid_request_error"),
    errors.ImageError: (400, "invalid_request_error"),
    errors.UnsupportedMediaType: (415, "invalid_request_error"),
    errors.AuthenticationError: (401, "authentication_error"),
    errors.ServerBusy: (429, "rate_limit_error"),
    errors.InternalError: (500, "server_error"),
    errors.UpstreamError: (502, "server_error"),
    errors.NotReady: (503, "service_unavailable"),
    errors.RequestTimeout: (504, "timeout_error"),
    errors.ClientGone: (499, "client_closed_request"),  # nginx's status: logged, never read by the client
}


@dataclass
class Problem:
    """An error as the HTTP layer answers it."""

    status: int
    type: str
    message: str
    param: Optional[str] = None
    code: Optional[str] = None
    headers: dict = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @property
    def reason(self) -> str:
        """The label of the rejected-requests metric."""
        return self.code or self.type


def problem(exc: BaseException, request_id=None, max_request_bytes: Optional[int] = None) -> Problem:
    if isinstance(exc, errors.ServiceError):
        return _domain(exc)
    if isinstance(exc, RequestEntityTooLarge):
        limit = f" of {max_request_bytes} bytes" if max_request_bytes else ""
        return Problem(413, "invalid_request_error", f"the request body is larger than this server's limit{limit}",
                       code="request_too_large")
    if isinstance(exc, HTTPException):
        kind = "not_found" if exc.code == 404 else "invalid_request_error"
        # werkzeug's own headers of the answer, e.g. a 405's Allow (which methods the path takes)
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return Problem(exc.code, kind, f"{exc.name}: {request.method} {printable(request.path)}",
                       code=exc.name.lower().replace(" ", "_"), headers=headers)
    log.error("request %s: internal error", request_id, exc_info=exc)
    return _domain(errors.InternalError(f"internal error ({type(exc).__name__}); the server is still up"))


def _domain(exc: errors.ServiceError) -> Problem:
    status, kind = next((TABLE[c] for c in type(exc).__mro__ if c in TABLE), TABLE[errors.InternalError])
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
    return Problem(status, kind, exc.message, exc.param, exc.code, headers)
