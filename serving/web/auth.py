"""API keys: `Authorization: Bearer <key>`, or `token <key>` as AI Studio's gateway sends access tokens."""

from __future__ import annotations

import hmac

from serving.errors import AuthenticationError

SCHEMES = ("bearer", "token")


def check_api_key(header: str, keys) -> None:
    """Raise AuthenticationError unless the Authorization header carries one of `keys`."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() not in SCHEMES or not token:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    token_bytes = token.strip().encode()
    # compare against every key, in constant time, so timing tells nothing about which was close
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token_bytes, key.encode())
    if not matched:
        raise AuthenticationError("invalid API key", code="invalid_api_key")
