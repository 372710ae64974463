"""The pieces under the secured site (issue 14): scrypt hashes, signed tokens, the sign-in limiter,
the settings store's precedence and cross-process versioning, `tilecrate passwd`, [users] config."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tilecrate.admin import edits
from tilecrate.admin.limiter import FailureLimiter
from tilecrate.admin.passwords import PasswordHashError, hash_password, parse_hash, verify_password
from tilecrate.admin.settings import ServiceSettings, SiteSettings
from tilecrate.admin.tokens import TokenInvalid, TokenSigner, binding_matches
from tilecrate.admin.users import Principal, permitted
from tilecrate.server.config import ConfigError, load_config


def test_password_hashes_are_salted_and_verify():
    a, b = hash_password("pw", log_n=10), hash_password("pw", log_n=10)
    assert a != b and a.startswith("scrypt$10$8$1$")
    assert verify_password("pw", a) and verify_password("pw", b)
    assert not verify_password("pW", a) and not verify_password("", a) and not verify_password("x" * 5000, a)
    for bad in ("", "plain", "scrypt$99$8$1$AAAA$AAAA", "scrypt$10$8$1$!!$AAAA", "bcrypt$x",
                a.rsplit("$", 1)[0] + "$AAAA", "scrypt$10$64$1$" + a.split("$", 4)[4]):
        with pytest.raises(PasswordHashError):
            parse_hash(bad)
    with pytest.raises(PasswordHashError):
        hash_password("")


def test_tokens_refuse_tampering_expiry_and_other_secrets():
    signer = TokenSigner(b"k" * 32)
    tok = signer.issue("alice", "fp", 2_000_000_000_000, ("referer", "http"))
    claims = signer.verify(tok, now_ms=1_000_000_000_000)
    assert claims.user == "alice" and claims.binding == ("referer", "http")
    with pytest.raises(TokenInvalid):
        signer.verify(tok, now_ms=2_000_000_000_000)
    with pytest.raises(TokenInvalid):
        TokenSigner(b"j" * 32).verify(tok, now_ms=0)
    for i in range(len(tok)):  # every single-character change is caught
        c = "A" if tok[i] != "A" else "B"
        changed = tok[:i] + c + tok[i + 1:]
        try:
            got = signer.verify(changed, now_ms=0)
        except TokenInvalid:
            continue
        assert got == claims  # base64 padding bits may decode to the same bytes
    for junk in ("", ".", "a.b.c", "x" * 2000, "é.é"):
        with pytest.raises(TokenInvalid):
            signer.verify(junk)
    assert binding_matches(("referer", "http"), "http://page", None)
    assert not binding_matches(("referer", "https://a"), "https://b", None)
    assert binding_matches(("ip", "1.2.3.4"), None, "1.2.3.4") and not binding_matches(("ip", "1.2.3.4"), None, "::1")


def test_limiter_locks_out_then_forgets_and_stays_bounded():
    lim = FailureLimiter(max_failures=3, window=10, max_keys=100)
    for t in range(3):
        assert lim.wait(["u"], now=t) == 0
        lim.fail(["u"], now=t)
    assert lim.wait(["u"], now=3) == 7  # the oldest counted failure leaves at 10
    assert lim.wait(["u"], now=10.5) == 0
    for i in range(10000):
        lim.fail([f"name{i}"], now=20)
    assert len(lim) == 100


def test_permissions():
    alice, admin = Principal("alice", "user"), Principal("root", "administrator")
    assert permitted(alice, None) and not permitted(None, None)
    assert permitted(None, ["*"]) and permitted(alice, ["alice"]) and permitted(alice, ["role:user"])
    assert not permitted(alice, ["bob", "role:publisher"]) and permitted(admin, [])


def _other_process(path, code: str) -> None:
    """Run settings calls in another process (a second front end; LMDB opens an env once per process)."""
    prog = ("from tilecrate.admin.settings import ServiceSettings as SS, SiteSettings\n"
            f"site = SiteSettings({str(path)!r})\n" + code + "\nsite.close()\n")
    subprocess.run([sys.executable, "-c", prog], check=True, timeout=60)


def test_settings_precedence_and_versions(tmp_path):
    path = tmp_path / "site.lmdb"
    one = SiteSettings(str(path))
    one.seed({"S": ServiceSettings(True, 10), "T": ServiceSettings(True, 20)}, {}, -1)
    v = one.version()
    assert one.snapshot().services["S"] == ServiceSettings(True, 10)
    _other_process(path, "site.set_service('S', SS(False, 5))")
    assert one.version() == v + 1 and one.snapshot().services["S"] == ServiceSettings(False, 5)
    # a new TOML: the edited service keeps its edit, the other takes the new value
    seed = "site.seed({'S': SS(True, 99), 'T': SS(True, 30)}, {}, 4)"
    _other_process(path, seed)
    snap = one.snapshot()
    assert snap.services == {"S": ServiceSettings(False, 5), "T": ServiceSettings(True, 30)}
    assert snap.maximum_outstanding_jobs == 4
    version = one.version()
    _other_process(path, seed)
    assert one.version() == version  # nothing changed, nothing bumped
    secret = one.secret()
    _other_process(path, f"assert site.secret() == {secret!r}")
    assert len(secret) == 32
    one.close()


def test_edit_parsing():
    assert edits.service_edit('{"properties":{"exportTilesAllowed":"True","maxExportTilesCount":"7"}}',
                              "S", "MapServer") == ServiceSettings(True, 7)
    assert edits.service_edit('{"properties":{}}', "S", "MapServer") == ServiceSettings(False, 100000)
    assert edits.caching_edit('{"properties":{"maximumOutstandingJobs":"-1"}}') == -1
    for bad in ('{"properties":{"maxExportTilesCount":"1e5"}}', '{"properties":{"maxExportTilesCount":NaN}}',
                '{"properties":{"maxExportTilesCount":"٣"}}', '{"type":"GPServer"}'):
        with pytest.raises(edits.EditError):
            edits.service_edit(bad, "S", "MapServer")


def _passwd(stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tilecrate.cli", "passwd", *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_passwd_command_prints_a_hash_line_that_verifies(tmp_path, sample_v2):
    r = _passwd("correct horse\n", "--user", "alice", "--role", "administrator")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "[users.alice]" and lines[2] == 'role = "administrator"'
    stored = lines[1].split('"')[1]
    assert verify_password("correct horse", stored) and "correct horse" not in r.stdout
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[services.S]\nsource = "{sample_v2}"\n\n' + r.stdout)
    assert load_config(str(cfg)).users["alice"].role == "administrator"
    empty = _passwd("\n")
    assert empty.returncode == 1 and len(empty.stderr.strip().splitlines()) == 1 and "empty" in empty.stderr


@pytest.mark.parametrize("extra, message", [
    ('[users.a]\npassword_hash = "x"\n', "password_hash must look like"),
    ('[users.a]\npassword_hash = "HASH"\nrole = "root"\n', "role must be one of"),
    ('[users."a b"]\npassword_hash = "HASH"\n', "no spaces"),
    ('[users.a]\nrole = "user"\n', "password_hash is required"),
    ('[auth]\ntoken_expiration = 0\n', "token_expiration"),
])
def test_config_refuses_bad_users(tmp_path, sample_v2, extra, message):
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[services.S]\nsource = "{sample_v2}"\n\n' + extra.replace("HASH", hash_password("p", log_n=10)))
    with pytest.raises(ConfigError, match=message):
        load_config(str(cfg))
    cfg.write_text(f'[services.S]\nsource = "{sample_v2}"\nview = ["nobody"]\n')
    with pytest.raises(ConfigError, match="not a configured user"):
        load_config(str(cfg))


def test_a_full_settings_store_refuses_the_write_and_keeps_the_old_values(tmp_path, monkeypatch):
    from tilecrate.admin import settings as mod

    monkeypatch.setattr(mod, "_MAP_SIZE", 256 << 10)  # a store that fills up, as a full disk does
    site = SiteSettings(str(tmp_path / "site.lmdb"))
    site.seed({"S": ServiceSettings(True, 10)}, {}, -1)
    version = site.version()
    with pytest.raises(mod.SettingsError, match="cannot write"):
        site.set_system({"x": "a" * (1 << 20)})
    assert site.version() == version and site.snapshot().system == {}
    site.set_service("S", ServiceSettings(False, 3))  # the store still works
    assert site.snapshot().services["S"] == ServiceSettings(False, 3)
    site.close()
