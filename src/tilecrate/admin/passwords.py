"""Salted password hashes with scrypt (hashlib), in one self-describing text field.

`scrypt$<log2 N>$<r>$<p>$<salt, base64>$<hash, base64>`: the parameters travel with the hash, so
they can be raised later without invalidating stored hashes. Verification is constant-time.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os

from tilecrate.errors import TilecrateError

LOG_N, R, P = 14, 8, 1          # 16 MiB of memory, ~50 ms per hash on this machine's cores
_MAX_LOG_N, _MAX_R, _MAX_P = 20, 16, 4  # what a stored hash may ask for (a hostile config must not cost minutes)
_MAX_PASSWORD = 1024            # characters: longer ones are refused before any hashing
_DKLEN = 32


class PasswordHashError(TilecrateError):
    """A stored password hash cannot be read."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, n=1 << log_n, r=r, p=p,
                          maxmem=(128 * r * (1 << log_n) * p) + (64 << 20), dklen=_DKLEN)


def hash_password(password: str, *, log_n: int = LOG_N, r: int = R, p: int = P) -> str:
    """The stored form of a password: scrypt with a fresh 16-byte salt."""
    if not password:
        raise PasswordHashError("the password is empty")
    if len(password) > _MAX_PASSWORD:
        raise PasswordHashError(f"the password is longer than {_MAX_PASSWORD} characters")
    salt = os.urandom(16)
    return f"scrypt${log_n}${r}${p}${_b64(salt)}${_b64(_scrypt(password, salt, log_n, r, p))}"


def parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """(log2 N, r, p, salt, hash) of a stored hash, or PasswordHashError saying what is wrong."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise PasswordHashError("a password_hash must look like scrypt$14$8$1$<salt>$<hash> "
                                "(make one with `tilecrate passwd`)")
    try:
        log_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise PasswordHashError("a password_hash has unreadable numbers or base64") from None
    if not (1 <= log_n <= _MAX_LOG_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise PasswordHashError(f"a password_hash asks for scrypt N=2^{log_n}, r={r}, p={p}: at most "
                                f"2^{_MAX_LOG_N}, {_MAX_R}, {_MAX_P}")
    if len(salt) < 8 or len(digest) != _DKLEN:
        raise PasswordHashError("a password_hash has a salt under 8 bytes or a hash that is not 32 bytes")
    return log_n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    """Whether password matches the stored hash (constant-time comparison of the digests)."""
    log_n, r, p, salt, digest = parse_hash(stored)
    if not password or len(password) > _MAX_PASSWORD:
        return False
    return hmac.compare_digest(_scrypt(password, salt, log_n, r, p), digest)


# hashed against when the user name is unknown, so both answers take the same time
_DUMMY = hash_password("tilecrate: no such user")


def dummy_verify(password: str) -> bool:
    """Spend what a real verification costs, for a user that does not exist; always False."""
    verify_password(password or "x", _DUMMY)
    return False
