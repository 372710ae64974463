"""An attacker's review of the server layer, each finding proved on a real `tilecrate serve` process
on 127.0.0.1 (issues 9 and 14): what a cheap request could get past, and that it no longer does."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_auth_support import PASSWORDS, secured_config
from test_server_support import Server, free_port

TOKENS = "/arcgis/tokens/generateToken"


@pytest.fixture(scope="module")
def site(tmp_path_factory, sample_v2):
    root = tmp_path_factory.mktemp("reviewsite")
    data = root / "data"
    cfg = secured_config(root / "tilecrate.toml", data, {"S": {"source": sample_v2}},
                         auth={"max_failed_signins": 3, "signin_window": 60})
    srv = Server(cfg, data, free_port()).start()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text()


def _details(body: bytes) -> str:
    return json.loads(body)["error"]["details"][0]


def test_a_concurrent_burst_of_wrong_passwords_gets_no_more_guesses_than_a_sequential_one(site):
    # Every sign-in used to check the lockout before its (slow) password check and count its failure
    # after it: 24 guesses sent at once all passed the check, so a burst got 24 password checks where
    # max_failed_signins allows 3. A guess now takes its place in the count before it is checked.
    srv = site
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda i: srv.post(TOKENS, {"username": "alice", "password": f"guess{i}",
                                                            "f": "json"}), range(24)))
    details = [_details(a.body) for a in answers]
    checked = [d for d in details if d == "Invalid username or password."]
    refused = [d for d in details if d.startswith("Too many failed sign-ins")
               or d.startswith("Too many sign-ins at once")]
    assert len(checked) <= 3, details
    assert len(checked) + len(refused) == 24, details
    # the right password is refused while the lockout lasts: no guess got through
    r = srv.post(TOKENS, {"username": "alice", "password": PASSWORDS["alice"], "f": "json"})
    assert _details(r.body).startswith("Too many failed sign-ins")
