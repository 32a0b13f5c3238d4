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
    try:  # WSGI gives header values as latin-1 text: that gives back the bytes sent (a UTF-8 key's bytes)
        token_bytes = token.strip().encode("latin-1")
    except UnicodeEncodeError:  # not from a WSGI header (a caller's own str): its UTF-8
        token_bytes = token.strip().encode()
    # compare against every key, in constant time, so timing tells nothing about which was close
    matched = False
    for key in keys:
        for form in _encodings(key):
            matched |= hmac.compare_digest(token_bytes, form)
    if not matched:
        raise AuthenticationError("invalid API key", code="invalid_api_key")


def _encodings(key: str) -> list:
    """The bytes a client may send for `key`: UTF-8 (curl, browsers), and latin-1 where it can be written so
    (Python's http.client encodes header text as latin-1). A non-ASCII key used to work from neither."""
    forms = [key.encode()]
    try:
        if not key.isascii():
            forms.append(key.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return forms
