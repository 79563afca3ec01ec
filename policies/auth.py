"""Which proxy API key a request presented.

Every configured key is compared, with `hmac.compare_digest`, whatever the outcome, so
the time taken does not tell which key, or how much of one, was right.
"""

from __future__ import annotations

import hmac

from policies.config import Config


def bearer_token(authorization_header: str | None) -> str | None:
    """The token of `Bearer <token>` (scheme case-insensitive), else None."""
    if not authorization_header:
        return None
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def authenticate(config: Config, authorization_header: str | None) -> str | None:
    """The name of the API key presented, or None when none matched.

    None does not mean "reject" by itself: when `config.server.auth_required` is false
    (no keys configured) every request is served, with api_key_name None.
    """
    token = bearer_token(authorization_header)
    presented = (token or "").encode("utf-8")
    found = None
    for entry in config.server.api_keys:
        if hmac.compare_digest(presented, entry.key.encode("utf-8")) and token is not None:
            found = entry.name
    return found
