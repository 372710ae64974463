"""Signed, expiring tokens: HMAC-SHA256 over a small JSON payload, with the site secret.

`<payload, base64url>.<mac, base64url>`; the payload names the user, the expiry (ms since the
epoch), an optional binding (a Referer prefix or an address) and a fingerprint of the user's
password hash, so a changed password ends that user's tokens. Nothing is stored per token: every
front-end process verifies any token with the secret kept in the settings store.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass

MAX_TOKEN_CHARS = 2048  # longer strings are refused before any decoding (a 500-character referer binding fits)
_CACHE = 4096  # verified tokens remembered (a client sends the same one on every request)


class TokenInvalid(Exception):
    """The token is malformed, tampered with, expired, or bound to another client."""


@dataclass(frozen=True)
class Claims:
    """What a verified token says."""

    user: str
    expires_ms: int
    binding: tuple[str, str] | None
    fingerprint: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Issues and verifies tokens with one secret (at least 32 bytes)."""

    def __init__(self, secret: bytes):
        if len(secret) < 32:
            raise ValueError("the token secret must be at least 32 bytes")
        self._secret = secret
        self._verified: dict[str, Claims] = {}  # token -> claims; only tokens whose MAC checked out
        self._fingerprints: dict[tuple[str, str], str] = {}

    def fingerprint(self, user: str, password_hash: str) -> str:
        """A short keyed digest of the user's password hash (no secret of its own)."""
        key = (user, password_hash)
        fp = self._fingerprints.get(key)
        if fp is None:
            mac = hmac.new(self._secret, b"pw\0" + user.encode() + b"\0" + password_hash.encode(), hashlib.sha256)
            fp = _b64(mac.digest()[:9])
            if len(self._fingerprints) < _CACHE:
                self._fingerprints[key] = fp
        return fp

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, b"tok\0" + payload, hashlib.sha256).digest()

    def issue(self, user: str, fingerprint: str, expires_ms: int, binding: tuple[str, str] | None = None) -> str:
        """A token for `user` valid until `expires_ms`."""
        body = {"u": user, "e": int(expires_ms), "f": fingerprint, "n": _b64(os.urandom(6))}
        if binding is not None:
            body["b"] = list(binding)
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        token = f"{_b64(payload)}.{_b64(self._mac(payload))}"
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError("the user name and binding make a token too long to be accepted")
        return token

    def verify(self, token: str, now_ms: int | None = None) -> Claims:
        """The claims of a genuine, unexpired token; TokenInvalid otherwise (binding is the caller's)."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        known = self._verified.get(token) if isinstance(token, str) else None
        if known is not None:
            if known.expires_ms <= now:
                raise TokenInvalid("expired")
            return known
        if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1 or not token.isascii():
            raise TokenInvalid("malformed")
        head, mac = token.split(".")
        try:
            payload, sent = _unb64(head), _unb64(mac)
        except (binascii.Error, ValueError):
            raise TokenInvalid("malformed") from None
        if not hmac.compare_digest(self._mac(payload), sent):
            raise TokenInvalid("bad signature")
        try:
            body = json.loads(payload)
            user, expires, fp = body["u"], body["e"], body["f"]
            binding = body.get("b")
            if not (isinstance(user, str) and isinstance(expires, int) and isinstance(fp, str)):
                raise TypeError
            if binding is not None:
                if not (isinstance(binding, list) and len(binding) == 2 and all(isinstance(x, str) for x in binding)):
                    raise TypeError
                binding = (binding[0], binding[1])
        except (ValueError, KeyError, TypeError):  # signed by us, so this is a bug or an old format
            raise TokenInvalid("unreadable payload") from None
        if expires <= now:
            raise TokenInvalid("expired")
        claims = Claims(user, expires, binding, fp)
        if len(self._verified) >= _CACHE:  # the oldest remembered goes first
            del self._verified[next(iter(self._verified))]
        self._verified[token] = claims
        return claims


def binding_matches(binding: tuple[str, str] | None, referer: str | None, address: str | None) -> bool:
    """Whether a request may use a token with this binding: a Referer starting with the bound
    value (the Python API binds "http" and sends `Referer: http`), or the bound address."""
    if binding is None:
        return True
    kind, value = binding
    if kind == "referer":
        if not referer or not referer.startswith(value):
            return False
        # a bound URL matches its own pages only: by bare prefix, a token bound to
        # https://app.example.com was accepted from https://app.example.com.attacker.net/
        rest = referer[len(value):]
        return "://" not in value or not rest or value.endswith(("/", "?", "#")) or rest[0] in "/?#"
    if kind == "ip":
        return bool(address) and hmac.compare_digest(address.encode(), value.encode())
    return False
