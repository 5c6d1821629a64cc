"""The token server's business: check an assertion, issue a token for it.

An identity provider (``iss``) signs an assertion that a user (``email``)
wants to use this service (``aud``) until ``exp``.  If the signature,
issuer, audience and expiry check out, we issue a tokenlib token and its
derived secret, as Mozilla's tokenserver did for Firefox Sync.

Rejections are values (:class:`Rejected`), not crashes: the worker
returns them as a normal result and the view turns them into a 4xx.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import ecdsa
import tokenlib
from pyramid.path import AssetResolver

from . import jws

# The values the demo's ini files and ``python -m demo_app.assertion`` agree on.
DEMO_ISSUER = "https://accounts.example.com"
DEMO_AUDIENCE = "https://token.example.com"
DEFAULT_DURATION = 3600
DEFAULT_API_ENDPOINT = "https://storage.example.com/1.5/{uid}"
MAX_EMAIL = 255


class Rejected(Exception):
    """The request or its assertion is not acceptable; 400 or 401."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message

    def as_result(self) -> dict:
        return {"status": self.status, "error": self.error, "message": self.message}


@dataclass(frozen=True)
class TokenConfig:
    """What checking assertions and issuing tokens needs."""

    verifying_key: ecdsa.VerifyingKey
    issuer: str
    audience: str
    secret: str = field(repr=False)
    duration: int = DEFAULT_DURATION
    api_endpoint: str = DEFAULT_API_ENDPOINT  # {uid} is replaced

    REQUIRED = ("public_key", "issuer", "audience")

    @classmethod
    def from_params(cls, params: dict) -> "TokenConfig":
        """From ``powerhose.params.*`` (strings); ValueError names what is wrong.

        ``secret_file`` (a path) may stand for ``secret``: command lines,
        where ``--params`` travel, are visible to every local user.
        """
        missing = [name for name in cls.REQUIRED if not params.get(name)]
        if not params.get("secret") and not params.get("secret_file"):
            missing.append("secret (or secret_file)")
        if missing:
            raise ValueError("the token server needs "
                             + ", ".join(f"powerhose.params.{name}" for name in missing))
        try:
            duration = int(params.get("duration") or DEFAULT_DURATION)
        except ValueError:
            raise ValueError("powerhose.params.duration must be whole seconds, "
                             f"got {params['duration']!r}") from None
        if duration <= 0:
            raise ValueError(f"powerhose.params.duration must be positive, got {duration}")
        return cls(verifying_key=_load_key(params["public_key"]), issuer=params["issuer"],
                   audience=params["audience"], secret=_secret(params), duration=duration,
                   api_endpoint=params.get("api_endpoint") or DEFAULT_API_ENDPOINT)


def _load_key(spec: str) -> ecdsa.VerifyingKey:
    try:
        # A path, or an asset spec such as demo_app:keys/demo-public-key.pem
        # that works whatever the worker's current directory.
        return jws.load_verifying_key(AssetResolver().resolve(spec).abspath())
    except (OSError, ValueError) as exc:
        raise ValueError(f"powerhose.params.public_key: cannot load {spec!r}: {exc}") from None


def _secret(params: dict) -> str:
    if params.get("secret"):
        return params["secret"]
    try:
        with open(params["secret_file"]) as f:
            secret = f.read().strip()
    except OSError as exc:
        raise ValueError(f"powerhose.params.secret_file: {exc}") from None
    if not secret:
        raise ValueError(f"powerhose.params.secret_file: {params['secret_file']} is empty")
    return secret


def verify_assertion(assertion: str, config: TokenConfig, now: float | None = None) -> dict:
    """The assertion's claims if it is valid for us now; raises Rejected (401)."""
    try:
        claims = jws.verify(assertion, config.verifying_key)
    except jws.MalformedError as exc:
        raise Rejected(401, "malformed-assertion", str(exc)) from None
    except jws.SignatureError as exc:
        raise Rejected(401, "invalid-signature", str(exc)) from None
    if claims.get("iss") != config.issuer:
        raise Rejected(401, "invalid-issuer",
                       f"assertions must be issued by {config.issuer!r}, "
                       f"got {claims.get('iss')!r}")
    if claims.get("aud") != config.audience:
        raise Rejected(401, "invalid-audience",
                       f"this server's audience is {config.audience!r}, "
                       f"the assertion is for {claims.get('aud')!r}")
    expires = claims.get("exp")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        raise Rejected(401, "malformed-assertion", "the assertion has no numeric 'exp'")
    if expires <= (time.time() if now is None else now):
        raise Rejected(401, "expired-assertion", "the assertion has expired; get a new one")
    email = claims.get("email")
    if not isinstance(email, str) or "@" not in email or len(email) > MAX_EMAIL:
        raise Rejected(401, "invalid-email", "the assertion has no valid 'email'")
    return claims


def issue_token(email: str, config: TokenConfig) -> dict:
    """A tokenlib token and its derived secret for ``email``."""
    uid = user_id(email)
    endpoint = config.api_endpoint.replace("{uid}", str(uid))
    token = tokenlib.make_token({"uid": uid, "node": endpoint}, secret=config.secret,
                                timeout=config.duration)
    key = tokenlib.get_derived_secret(token, secret=config.secret)
    return {"id": token, "key": key, "uid": uid, "api_endpoint": endpoint,
            "duration": config.duration}


def user_id(email: str) -> int:
    """A stable numeric user id; a real server would look it up in its user table."""
    return int.from_bytes(hashlib.sha256(email.lower().encode()).digest()[:6], "big")


def handle(data: bytes, config: TokenConfig, now: float | None = None) -> dict:
    """One job: ``{"assertion": ...}`` -> ``{"status": 200, "token": {...}}``
    or ``{"status": 400|401, "error": ..., "message": ...}``."""
    try:
        assertion = parse_request(data)
        claims = verify_assertion(assertion, config, now)
    except Rejected as rejected:
        return rejected.as_result()
    return {"status": 200, "token": issue_token(claims["email"], config)}


def parse_request(data) -> str:
    """The assertion out of a request body; raises Rejected (400)."""
    try:
        body = json.loads(data)
    except (ValueError, TypeError):
        raise Rejected(400, "invalid-json", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise Rejected(400, "invalid-json", "the body must be a JSON object")
    assertion = body.get("assertion")
    if not isinstance(assertion, str) or not assertion:
        raise Rejected(400, "missing-assertion", "the body needs an 'assertion' string")
    if len(assertion) > jws.MAX_SIZE:
        raise Rejected(400, "assertion-too-large",
                       f"assertions are at most {jws.MAX_SIZE} characters")
    return assertion
