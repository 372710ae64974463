"""What security costs per request and per sign-in (issue 14), in this process, paired rounds, medians.

Per request: the site middleware's settings version check (one LMDB read transaction) plus the
verification of a signed token (HMAC-SHA256, the user's password fingerprint, the binding), vs the
shared static token's constant-time comparison every request made before users existed. Per
sign-in: one scrypt verification at the default cost (N=2^14, r=8), the price a password guess pays.

Run: `.venv/bin/python -m pytest benchmarks/bench_auth.py --benchmark-enable`
"""
from __future__ import annotations

import hmac
import statistics
import time

from conftest import report
from tilecrate.admin.passwords import hash_password, verify_password
from tilecrate.admin.settings import ServiceSettings, SiteSettings
from tilecrate.admin.tokens import TokenSigner, binding_matches

ROUNDS = 15
CALLS = 2000


def _per_call(fn, calls: int = CALLS) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def test_request_security_vs_static_token(benchmark, request, tmp_path):
    """Settings check + signed token verification vs the static token comparison (seconds per request)."""
    site = SiteSettings(str(tmp_path / "site.lmdb"))
    site.seed({f"S{i}": ServiceSettings(True, 100000) for i in range(8)}, {}, -1)
    signer = TokenSigner(site.secret())
    pw_hash = hash_password("pw", log_n=10)
    token = signer.issue("alice", signer.fingerprint("alice", pw_hash), int(time.time() * 1000) + 3600000,
                         ("referer", "http"))
    static = b"change-me-static-token-of-32-bytes"
    sent = bytes(static)

    def static_check() -> None:
        hmac.compare_digest(sent, static)

    def signed_check() -> None:
        site.snapshot()
        claims = signer.verify(token)
        hmac.compare_digest(claims.fingerprint, signer.fingerprint("alice", pw_hash))
        binding_matches(claims.binding, "http", "127.0.0.1")

    times: dict[str, list[float]] = {"static": [], "signed": []}
    for _ in range(ROUNDS):
        times["static"].append(_per_call(static_check))
        times["signed"].append(_per_call(signed_check))
    med = {k: statistics.median(v) for k, v in times.items()}
    benchmark.pedantic(signed_check, rounds=50, iterations=20)
    site.close()
    report(request, "auth: per request", static_us=med["static"] * 1e6, signed_us=med["signed"] * 1e6,
           signed_vs_static=med["signed"] / med["static"])


def test_sign_in_hash_cost(benchmark, request):
    """One scrypt verification at the default cost vs one at the tests' cheap cost (N=2^10)."""
    default, cheap = hash_password("pw"), hash_password("pw", log_n=10)
    times: dict[str, list[float]] = {"default": [], "cheap": []}
    for _ in range(5):
        times["default"].append(_per_call(lambda: verify_password("pw", default), 3))
        times["cheap"].append(_per_call(lambda: verify_password("pw", cheap), 3))
    med = {k: statistics.median(v) for k, v in times.items()}
    benchmark.pedantic(verify_password, args=("pw", default), rounds=3, iterations=1)
    report(request, "auth: sign-in hash", default_ms=med["default"] * 1e3, cheap_ms=med["cheap"] * 1e3,
           default_vs_cheap=med["default"] / med["cheap"])
