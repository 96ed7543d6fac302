"""Signed, short-lived LFS transfer URLs, so that a PUT or GET needs no token but only what the server handed out.

The git-LFS batch endpoint (which needs the token) answers with hrefs carrying ``expires`` and ``signature``
query parameters: an HMAC-SHA256, under a secret drawn when the server starts, of the action, repo, object
id, size and expiry time. huggingface_hub PUTs to that href without credentials, as it would to S3.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from urllib.parse import urlencode

__all__ = ["DEFAULT_TTL", "UrlSigner"]

DEFAULT_TTL = 3600  # seconds a signed URL stays valid


class UrlSigner:
    """Signs and checks LFS transfer URLs with a secret known only to this server process."""

    def __init__(self, secret: bytes | None = None, ttl: int = DEFAULT_TTL) -> None:
        self._secret = secret if secret is not None else os.urandom(32)
        self.ttl = ttl

    def _digest(self, action: str, repo_type: str, repo_id: str, oid: str, size: int, expires: int) -> str:
        message = "\n".join((action, repo_type, repo_id, oid, str(size), str(expires))).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def query(self, action: str, repo_type: str, repo_id: str, oid: str, size: int) -> str:
        """The ``expires=...&signature=...`` query string that authorises this one transfer."""
        expires = int(time.time()) + self.ttl
        signature = self._digest(action, repo_type, repo_id, oid, size, expires)
        return urlencode({"expires": expires, "signature": signature})

    def verify(
        self, action: str, repo_type: str, repo_id: str, oid: str, size: int, query: Mapping[str, str]
    ) -> bool:
        """Whether ``query`` holds an unexpired signature of exactly this transfer."""
        expires, signature = query.get("expires", ""), query.get("signature", "")
        if not expires.isascii() or not expires.isdigit() or len(expires) > 12 or int(expires) < time.time():
            return False
        expected = self._digest(action, repo_type, repo_id, oid, size, int(expires))
        return hmac.compare_digest(expected, signature.encode("ascii", "replace").decode())
