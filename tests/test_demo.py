"""The demo token server: assertions, tokens, the worker target and the views."""

import hashlib
import json
import os
import random
import subprocess
import sys
import time

import ecdsa
import psutil
import pytest
import tokenlib
import webtest
from pyramid.exceptions import ConfigurationError
from pyramid.paster import get_app

from demo_app import assertion, jws, main, tokens
from pyramid_powerhose.plugin import IPowerhose, get_powerhose
from tests.conftest import REPO

SECRET = "DEMO-SECRET-for-tests-only"
PARAMS = {
    "public_key": "demo_app:keys/demo-public-key.pem",
    "secret": SECRET,
    "issuer": tokens.DEMO_ISSUER,
    "audience": tokens.DEMO_AUDIENCE,
    "duration": "600",
}


@pytest.fixture(scope="module")
def config():
    return tokens.TokenConfig.from_params(PARAMS)


@pytest.fixture(scope="module")
def other_key():
    return ecdsa.SigningKey.generate(curve=ecdsa.NIST256p)


def replace_part(token, index, value):
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


def encode_json(value):
    return jws.b64encode(json.dumps(value).encode())


def check_token(body, email="alice@example.com", duration=600):
    """The token parses with the server's secret, and ``key`` is its derived secret."""
    assert set(body) == {"id", "key", "uid", "api_endpoint", "duration"}
    data = tokenlib.parse_token(body["id"], secret=SECRET)
    assert data["uid"] == body["uid"] == tokens.user_id(email)
    assert data["node"] == body["api_endpoint"] == f"https://storage.example.com/1.5/{body['uid']}"
    assert body["key"] == tokenlib.get_derived_secret(body["id"], secret=SECRET)
    assert body["duration"] == duration
    with pytest.raises(ValueError):
        tokenlib.parse_token(body["id"], secret="not-the-secret")


# -- compact JWS --------------------------------------------------------------


def test_jws_round_trip(config):
    token = assertion.mint("alice@example.com")
    claims = jws.verify(token, config.verifying_key)
    assert claims["email"] == "alice@example.com"
    header = json.loads(jws.b64decode(token.split(".")[0]))
    assert header == {"alg": "ES256", "typ": "JWT"}
    assert len(jws.b64decode(token.split(".")[2])) == 64  # raw r || s, not DER


@pytest.mark.parametrize("size", range(0, 8))
def test_base64url_round_trip(size):
    data = bytes(range(250, 256))[:size] + b"\xfb\xff"
    text = jws.b64encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert jws.b64decode(text) == data


@pytest.mark.parametrize("text", ["ab+c", "ab/c", "abc=", "a", "ab c", "é",
                                  "AB", "AAF"])  # non-zero unused bits: "AA", "AAE"
def test_base64url_is_strict(text):
    with pytest.raises(jws.MalformedError):
        jws.b64decode(text)


def test_signature_from_another_key_is_rejected(config, other_key):
    forged = jws.sign({"iss": tokens.DEMO_ISSUER, "aud": tokens.DEMO_AUDIENCE,
                       "email": "mallory@example.com", "exp": time.time() + 60}, other_key)
    with pytest.raises(jws.SignatureError):
        jws.verify(forged, config.verifying_key)


def test_tampered_payload_is_rejected(config):
    token = assertion.mint("alice@example.com")
    claims = json.loads(jws.b64decode(token.split(".")[1]))
    claims["email"] = "mallory@example.com"
    with pytest.raises(jws.SignatureError):
        jws.verify(replace_part(token, 1, encode_json(claims)), config.verifying_key)


@pytest.mark.parametrize("signature", [b"\x00" * 64, b"\xff" * 64])
def test_out_of_range_signature_is_rejected(config, signature):
    token = replace_part(assertion.mint("alice@example.com"), 2, jws.b64encode(signature))
    with pytest.raises(jws.SignatureError):
        jws.verify(token, config.verifying_key)


@pytest.mark.parametrize("mangle", [
    lambda t: t.rsplit(".", 1)[0],  # two parts
    lambda t: t + ".extra",  # four parts
    lambda t: replace_part(t, 0, encode_json({"alg": "none"})),
    lambda t: replace_part(t, 0, encode_json({"alg": "HS256"})),
    lambda t: replace_part(t, 0, encode_json(["ES256"])),
    lambda t: replace_part(t, 0, jws.b64encode(b"not json")),
    lambda t: replace_part(t, 2, jws.b64encode(b"\x01" * 70)),  # DER-sized
    lambda t: replace_part(t, 2, "!!!!"),
    lambda t: replace_part(t, 1, "é" + t.split(".")[1]),
    lambda t: t + "x" * jws.MAX_SIZE,
], ids=["two-parts", "four-parts", "alg-none", "alg-hs256", "header-list",
        "header-not-json", "signature-size", "signature-alphabet", "payload-not-ascii",
        "too-long"])
def test_malformed_assertions_are_rejected(config, mangle):
    with pytest.raises(jws.MalformedError):
        jws.verify(mangle(assertion.mint("alice@example.com")), config.verifying_key)


def test_payload_must_be_an_object(config):
    signing_key = jws.load_signing_key(assertion.DEMO_SIGNING_KEY)
    header = jws.b64encode(b'{"alg":"ES256"}')
    payload = jws.b64encode(b'["not", "an", "object"]')
    signature = signing_key.sign_deterministic(f"{header}.{payload}".encode(),
                                               hashfunc=hashlib.sha256,
                                               sigencode=ecdsa.util.sigencode_string)
    with pytest.raises(jws.MalformedError, match="payload"):
        jws.verify(f"{header}.{payload}.{jws.b64encode(signature)}", config.verifying_key)


# -- checking assertions, issuing tokens ------------------------------------------


def test_valid_assertion_gives_its_claims(config):
    claims = tokens.verify_assertion(assertion.mint("alice@example.com"), config)
    assert (claims["iss"], claims["aud"], claims["email"]) == (
        tokens.DEMO_ISSUER, tokens.DEMO_AUDIENCE, "alice@example.com")


@pytest.mark.parametrize("kwargs, error", [
    ({"audience": "https://elsewhere.example.com"}, "invalid-audience"),
    ({"issuer": "https://evil.example.com"}, "invalid-issuer"),
    ({"ttl": -1}, "expired-assertion"),
], ids=["audience", "issuer", "expired"])
def test_wrong_claims_are_401(config, kwargs, error):
    with pytest.raises(tokens.Rejected) as info:
        tokens.verify_assertion(assertion.mint("alice@example.com", **kwargs), config)
    assert (info.value.status, info.value.error) == (401, error)


def test_expiry_is_checked_against_now(config):
    token = assertion.mint("alice@example.com", ttl=60, now=1000)
    assert tokens.verify_assertion(token, config, now=1059)["exp"] == 1060
    with pytest.raises(tokens.Rejected, match="expired"):
        tokens.verify_assertion(token, config, now=1060)


@pytest.mark.parametrize("claims, error", [
    ({"exp": "tomorrow"}, "malformed-assertion"),
    ({"exp": True}, "malformed-assertion"),
    ({"exp": None}, "malformed-assertion"),
    ({"email": None}, "invalid-email"),
    ({"email": "no-at-sign"}, "invalid-email"),
    ({"email": ["alice@example.com"]}, "invalid-email"),
])
def test_bad_claim_types_are_401(config, claims, error):
    signing_key = jws.load_signing_key(assertion.DEMO_SIGNING_KEY)
    base = {"iss": tokens.DEMO_ISSUER, "aud": tokens.DEMO_AUDIENCE,
            "email": "alice@example.com", "exp": time.time() + 60}
    token = jws.sign({**base, **claims}, signing_key)
    with pytest.raises(tokens.Rejected) as info:
        tokens.verify_assertion(token, config)
    assert (info.value.status, info.value.error) == (401, error)


def test_issued_token_checks_out(config):
    check_token(tokens.issue_token("alice@example.com", config))


def test_user_id_is_stable_and_distinct():
    assert tokens.user_id("Alice@Example.com") == tokens.user_id("alice@example.com")
    assert tokens.user_id("alice@example.com") != tokens.user_id("bob@example.com")


@pytest.mark.parametrize("body, status, error", [
    (b"not json", 400, "invalid-json"),
    (b"\xff\xfe", 400, "invalid-json"),
    (b"[1, 2]", 400, "invalid-json"),
    (b"{}", 400, "missing-assertion"),
    (b'{"assertion": 42}', 400, "missing-assertion"),
    (b'{"assertion": ""}', 400, "missing-assertion"),
    (json.dumps({"assertion": "x" * (jws.MAX_SIZE + 1)}).encode(), 400, "assertion-too-large"),
    (b'{"assertion": "a.b.c"}', 401, "malformed-assertion"),
])
def test_handle_reports_rejections_as_results(config, body, status, error):
    result = tokens.handle(body, config)
    assert (result["status"], result["error"]) == (status, error)
    assert result["message"]


def test_mangled_assertions_are_always_rejected_never_crash(config):
    """Random one-character edits: always a 401 result, never an exception."""
    good = assertion.mint("alice@example.com")
    rng = random.Random(1234)
    alphabet = "AZaz09-_.=+/ é\x00\"\\"
    for _ in range(150):
        index = rng.randrange(len(good))
        replacement = rng.choice([c for c in alphabet if c != good[index]])
        mangled = good[:index] + replacement + good[index + 1:]
        result = tokens.handle(json.dumps({"assertion": mangled}).encode(), config)
        assert result["status"] == 401, (mangled, result)


def test_handle_issues_a_token(config):
    body = json.dumps({"assertion": assertion.mint("alice@example.com")}).encode()
    result = tokens.handle(body, config)
    assert result["status"] == 200
    check_token(result["token"])


def test_config_names_what_is_missing():
    with pytest.raises(ValueError, match="powerhose.params.secret"):
        tokens.TokenConfig.from_params({**PARAMS, "secret": ""})
    with pytest.raises(ValueError, match="duration"):
        tokens.TokenConfig.from_params({**PARAMS, "duration": "soon"})
    with pytest.raises(ValueError, match="public_key.*nowhere.pem"):
        tokens.TokenConfig.from_params({**PARAMS, "public_key": "/nowhere.pem"})


def test_config_accepts_a_plain_path(config):
    loaded = tokens.TokenConfig.from_params({**PARAMS, "public_key": assertion.DEMO_PUBLIC_KEY})
    assert loaded.verifying_key == config.verifying_key


def test_demo_keys_are_marked_as_demo_keys():
    for path in (assertion.DEMO_SIGNING_KEY, assertion.DEMO_PUBLIC_KEY):
        with open(path) as f:
            assert "DEMO KEY" in f.read().split("-----BEGIN")[0]


def test_assertion_command_prints_a_valid_assertion(config):
    out = subprocess.run(
        [sys.executable, "-m", "demo_app.assertion", "carol@example.com", "--ttl", "30"],
        check=True, capture_output=True, text=True).stdout.strip()
    claims = tokens.verify_assertion(out, config)
    assert claims["email"] == "carol@example.com"
    assert claims["exp"] - claims["iat"] == 30
    other = subprocess.run(
        [sys.executable, "-m", "demo_app.assertion", "carol@example.com",
         "--audience", "https://elsewhere.example.com"],
        check=True, capture_output=True, text=True).stdout.strip()
    with pytest.raises(tokens.Rejected, match="audience"):
        tokens.verify_assertion(other, config)


# -- the worker target ---------------------------------------------------------


def test_target_in_a_real_worker(start_broker, start_worker, wait_workers, client):
    """demo_app.jobs:issue_token under powerhose-worker, params from --params."""
    start_broker()
    params = "|".join(f"{key}:{value}" for key, value in PARAMS.items())
    start_worker("demo_app.jobs:issue_token", "--params", params)
    wait_workers(client, 1)
    good = json.dumps({"assertion": assertion.mint("alice@example.com")})
    result = json.loads(client.execute(good))
    assert result["status"] == 200
    check_token(result["token"])
    bad = json.dumps({"assertion": assertion.mint("alice@example.com", ttl=-5)})
    assert json.loads(client.execute(bad))["error"] == "expired-assertion"


# -- the app ------------------------------------------------------------------------


def app_settings(**extra):
    settings = {"powerhose.target": "demo_app.jobs:issue_token"}
    settings.update({f"powerhose.params.{key}": value for key, value in PARAMS.items()})
    settings.update(extra)
    return settings


@pytest.fixture
def testing_app():
    """The app with jobs run in this process by pyramid_powerhose.testing,
    whose get_params() answers powerhose.params.* as in a worker."""
    return webtest.TestApp(main({}, **app_settings(**{
        "pyramid.includes": "pyramid_powerhose.testing"})))


@pytest.fixture
def inprocess_app():
    """The benchmark's baseline: the view calls the job's code itself."""
    return webtest.TestApp(main({}, **app_settings(**{"demo.offload": "false"})))


BAD_REQUESTS = [
    # (body, status, error)
    (b"not json", 400, "invalid-json"),
    (b'["assertion"]', 400, "invalid-json"),
    (b"{}", 400, "missing-assertion"),
    (b'{"assertion": null}', 400, "missing-assertion"),
    (json.dumps({"assertion": "x" * (jws.MAX_SIZE + 1)}).encode(), 400, "assertion-too-large"),
    (b'{"assertion": "not.an.assertion"}', 401, "malformed-assertion"),
    (lambda: replace_part(assertion.mint("alice@example.com"), 2,
                          jws.b64encode(b"\x01" * 64)), 401, "invalid-signature"),
    (lambda: assertion.mint("alice@example.com", audience="https://elsewhere.example.com"),
     401, "invalid-audience"),
    (lambda: assertion.mint("alice@example.com", ttl=-10), 401, "expired-assertion"),
    (lambda: assertion.mint("alice@example.com", issuer="https://evil.example.com"),
     401, "invalid-issuer"),
]
BAD_IDS = ["not-json", "not-object", "no-assertion", "null-assertion", "too-large",
           "malformed", "bad-signature", "wrong-audience", "expired", "wrong-issuer"]


def bad_body(body):
    if callable(body):
        return json.dumps({"assertion": body()}).encode()
    return body


def test_token_through_powerhose(testing_app):
    good = assertion.mint("alice@example.com")
    res = testing_app.post("/token", json.dumps({"assertion": good}),
                           content_type="application/json")
    assert res.status_int == 200 and res.content_type == "application/json"
    check_token(res.json)
    jobs = get_powerhose(testing_app.app.registry).client.jobs
    assert [json.loads(job.data)["assertion"] for job in jobs] == [good]


@pytest.mark.parametrize("body, status, error", BAD_REQUESTS, ids=BAD_IDS)
def test_bad_requests_are_4xx_json(testing_app, body, status, error):
    res = testing_app.post("/token", bad_body(body), content_type="application/json",
                           expect_errors=True)
    assert res.status_int == status, res.text
    assert res.content_type == "application/json"
    assert res.json["error"] == error and res.json["status"] == status
    assert res.json["message"]


def test_bad_requests_never_reach_a_worker_if_the_body_is_wrong(testing_app):
    testing_app.post("/token", b"{}", content_type="application/json", expect_errors=True)
    assert get_powerhose(testing_app.app.registry).client.jobs == []


@pytest.mark.parametrize("body, status, error", BAD_REQUESTS[-4:], ids=BAD_IDS[-4:])
def test_inprocess_variant_answers_the_same(inprocess_app, body, status, error):
    res = inprocess_app.post("/token", bad_body(body), expect_errors=True)
    assert (res.status_int, res.json["error"]) == (status, error)
    good = assertion.mint("alice@example.com")
    check_token(inprocess_app.post("/token", json.dumps({"assertion": good})).json)


def test_app_refuses_to_start_without_a_secret():
    with pytest.raises(ConfigurationError, match="powerhose.params.secret"):
        main({}, **app_settings(**{"powerhose.params.secret": "",
                                   "pyramid.includes": "pyramid_powerhose.testing"}))


def test_heartbeat_is_503_without_a_broker(endpoints):
    app = webtest.TestApp(main({}, **app_settings(**{
        "powerhose.cluster": "attach", "powerhose.frontend": endpoints.frontend,
        "powerhose.backend": endpoints.backend})))
    try:
        res = app.get("/__heartbeat__", expect_errors=True)
        assert res.status_int == 503
        assert res.json == {"broker_pid": None, "workers": 0, "error": "broker-unavailable"}
        assert endpoints.frontend not in res.text  # details go to the log only
    finally:
        get_powerhose(app.app.registry).close()


@pytest.fixture
def attached_app(endpoints):
    app = webtest.TestApp(main({}, **app_settings(**{
        "powerhose.cluster": "attach", "powerhose.frontend": endpoints.frontend,
        "powerhose.backend": endpoints.backend})))
    yield app
    get_powerhose(app.app.registry).close()


def test_attached_to_a_real_broker(attached_app, start_broker, start_worker, wait_workers,
                                   client):
    broker = start_broker()
    params = "|".join(f"{key}:{value}" for key, value in PARAMS.items())
    start_worker("demo_app.jobs:issue_token", "--params", params)
    wait_workers(client, 1)
    assert attached_app.get("/__heartbeat__").json["broker_pid"] == broker.pid
    assert attached_app.get("/__heartbeat__").json["workers"] == 1
    good = json.dumps({"assertion": assertion.mint("alice@example.com")})
    check_token(attached_app.post("/token", good).json)
    expired = json.dumps({"assertion": assertion.mint("alice@example.com", ttl=-1)})
    assert attached_app.post("/token", expired, expect_errors=True).status_int == 401


def test_no_worker_is_503_not_500(attached_app, start_broker):
    start_broker("--no-worker-timeout", "0.3")
    good = json.dumps({"assertion": assertion.mint("alice@example.com")})
    res = attached_app.post("/token", good, expect_errors=True)
    assert res.status_int == 503 and res.json["error"] == "no-worker"
    assert attached_app.get("/__heartbeat__").json["workers"] == 0


def test_secret_file_stands_for_secret(tmp_path, config):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    params = {**PARAMS, "secret": "", "secret_file": str(path)}
    loaded = tokens.TokenConfig.from_params(params)
    assert loaded.secret == SECRET
    assert SECRET not in repr(loaded)  # a config in a log line does not leak it
    check_token(tokens.issue_token("alice@example.com", loaded))
    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        tokens.TokenConfig.from_params(params)


def test_development_ini_baseline_runs_in_process():
    """``offload=false`` (bench/web.py's baseline): no plugin, no cluster."""
    before = psutil.Process().children(recursive=True)
    app = get_app(os.path.join(REPO, "demo_app", "development.ini"),
                  options={"offload": "false"})
    assert app.registry.settings["demo.offload"] is False
    assert app.registry.queryUtility(IPowerhose) is None
    test_app = webtest.TestApp(app)
    good = json.dumps({"assertion": assertion.mint("alice@example.com")})
    data = tokenlib.parse_token(test_app.post("/token", good).json["id"],
                                secret="DEMO-SECRET-public-never-use-in-production")
    assert data["uid"] == tokens.user_id("alice@example.com")
    assert test_app.get("/__heartbeat__").json["mode"] == "in-process"
    assert psutil.Process().children(recursive=True) == before
