"""UrlSigner: the signature covers every field of the transfer and expires."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import parse_qsl

from hf_optim.hub_server.signing import UrlSigner

OID = "ab" * 32


def test_signature_is_the_documented_hmac_and_binds_every_field() -> None:
    secret = b"k" * 32
    signer = UrlSigner(secret, ttl=600)
    query = dict(parse_qsl(signer.query("upload", "model", "me/repo", OID, 42)))
    expires = int(query["expires"])
    assert abs(expires - (time.time() + 600)) < 60
    message = f"upload\nmodel\nme/repo\n{OID}\n42\n{expires}".encode()
    assert query["signature"] == hmac.new(secret, message, hashlib.sha256).hexdigest()
    assert signer.verify("upload", "model", "me/repo", OID, 42, query)
    for changed in [
        ("download", "model", "me/repo", OID, 42),
        ("upload", "dataset", "me/repo", OID, 42),
        ("upload", "model", "me/other", OID, 42),
        ("upload", "model", "me/repo", "cd" * 32, 42),
        ("upload", "model", "me/repo", OID, 43),
    ]:
        assert not signer.verify(*changed, query)
    assert not UrlSigner(b"x" * 32).verify("upload", "model", "me/repo", OID, 42, query)  # another server


def test_expired_missing_or_garbled_signatures_are_refused() -> None:
    secret = b"k" * 32
    signer = UrlSigner(secret)
    past = int(time.time()) - 10
    message = f"upload\nmodel\nme/repo\n{OID}\n42\n{past}".encode()
    expired = {"expires": str(past), "signature": hmac.new(secret, message, hashlib.sha256).hexdigest()}
    assert not signer.verify("upload", "model", "me/repo", OID, 42, expired)
    valid = dict(parse_qsl(signer.query("upload", "model", "me/repo", OID, 42)))
    for query in (
        {},
        {"expires": valid["expires"]},
        {"signature": valid["signature"]},
        {**valid, "expires": "\u00b2"},
        {**valid, "expires": "9" * 40},
        {**valid, "signature": "\u00e9" * 64},
    ):
        assert not signer.verify("upload", "model", "me/repo", OID, 42, query)
