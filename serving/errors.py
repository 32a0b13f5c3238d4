"""Errors a client can cause, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations


class APIError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    """400: the request is malformed or asks for something impossible."""

    def __init__(self, message: str, *, code: str | None = "invalid_value", **kwargs):
        super().__init__(message, code=code, **kwargs)


class ImageError(APIError):
    """400: an image could not be read; `param` names where it was in the request."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_image"):
        super().__init__(message, param=param, code=code)


class AuthenticationError(APIError):
    status = 401
    type = "authentication_error"


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"


class InternalError(APIError):
    status = 500
    type = "server_error"


class ServerBusy(APIError):
    """429: the wait queue is full; the client should retry after `Retry-After` seconds."""
    status = 429
    type = "rate_limit_error"


class RequestTimeout(APIError):
    """504: the request ran past the server's time limit and was cancelled."""
    status = 504
    type = "timeout_error"
