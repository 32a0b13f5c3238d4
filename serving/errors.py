"""The errors the core raises, named by what went wrong and never by HTTP.

Each carries a human message, the request field it is about (`param`) and a machine-readable
`code`. Which HTTP status and OpenAI error type each becomes is decided in one place, the
table of serving.web.http_errors; the engines, the chat service and the notebook widget only raise.
"""

from __future__ import annotations

from typing import Optional


class ServiceError(Exception):
    default_code: Optional[str] = None

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 retry_after: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after  # seconds after which trying again may work


class InvalidRequest(ServiceError):
    """The request is malformed or asks for something impossible."""

    default_code = "invalid_value"


class UnsupportedMediaType(InvalidRequest):
    """The body is not declared as JSON (Content-Type)."""

    default_code = "unsupported_media_type"


class ImageError(InvalidRequest):
    """An image could not be read or used; `param` names where it was in the request."""

    default_code = "invalid_image"


class AuthenticationError(ServiceError):
    """The API key is missing or wrong."""


class NotReady(ServiceError):
    """The service cannot answer yet (the model is loading) or any more (the engine stopped)."""


class ServerBusy(ServiceError):
    """As many requests as the server takes are in already; retry after `retry_after` seconds."""


class RequestTimeout(ServiceError):
    """The request ran past the server's time limit and was cancelled."""


class ClientGone(ServiceError):
    """The client closed its connection before its answer was complete; the answer was cancelled."""

    default_code = "client_closed_request"


class InternalError(ServiceError):
    """A failure of the server itself; the next request is served normally."""


class UpstreamError(ServiceError):
    """An upstream server (--backend openai / fastdeploy) failed: an error of its own (5xx), an answer cut
    off or malformed, or a refusal of this server's own credentials. Not the client's fault."""

    default_code = "upstream_error"
