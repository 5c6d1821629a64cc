"""Compact JWS signed with ES256 (RFC 7515, RFC 7518 section 3.4).

Just what assertions need: ``header.payload.signature``, each part
base64url without padding, the signature raw ``r || s`` (64 bytes) over
ECDSA P-256 with SHA-256.  Pure Python on purpose: ``ecdsa`` holds the GIL
for the whole verification, the CPU-bound work that pyramid_powerhose
moves out of the web process.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re

import ecdsa
from ecdsa.util import sigdecode_string, sigencode_string

ALGORITHM = "ES256"
CURVE = ecdsa.NIST256p
SIGNATURE_SIZE = 64  # r || s, 32 bytes each
MAX_SIZE = 8192  # characters; assertions are a few hundred

_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*$")


class MalformedError(ValueError):
    """Not a compact ES256 JWS: wrong shape, encoding or algorithm."""


class SignatureError(ValueError):
    """Well formed, but the signature does not match the key."""


def b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii") \
        .rstrip("=").replace("+", "-").replace("/", "_")


def b64decode(text: str) -> bytes:
    """Strict base64url: only the URL-safe alphabet, no padding, canonical.

    Canonical: the unused low bits of the last character are zero, so each
    byte string has exactly one encoding and a token cannot be altered
    without changing what it decodes to.
    """
    if not _BASE64URL.match(text) or len(text) % 4 == 1:
        raise MalformedError("a part is not base64url without padding")
    padded = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
    try:
        data = binascii.a2b_base64(padded, strict_mode=True)
    except binascii.Error as exc:
        raise MalformedError(f"a part is not valid base64url: {exc}") from None
    if b64encode(data) != text:
        raise MalformedError("a part is not canonical base64url")
    return data


def sign(claims: dict, signing_key: ecdsa.SigningKey) -> str:
    header = b64encode(_compact({"alg": ALGORITHM, "typ": "JWT"}))
    payload = b64encode(_compact(claims))
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = signing_key.sign_deterministic(signing_input, hashfunc=hashlib.sha256,
                                               sigencode=sigencode_string)
    return f"{header}.{payload}.{b64encode(signature)}"


def verify(token: str, verifying_key: ecdsa.VerifyingKey) -> dict:
    """The payload's claims, once the signature checks out.

    Raises MalformedError or SignatureError.  The payload is parsed only
    after its signature is verified: nothing unsigned is trusted.
    """
    if not isinstance(token, str) or len(token) > MAX_SIZE:
        raise MalformedError(f"an assertion is a string of at most {MAX_SIZE} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedError("an assertion has three dot-separated parts")
    header = _json_object(b64decode(parts[0]), "header")
    if header.get("alg") != ALGORITHM:
        # Never let the token choose: this is how "alg": "none" attacks work.
        raise MalformedError(f"the assertion's algorithm must be {ALGORITHM}, "
                             f"got {header.get('alg')!r}")
    payload = b64decode(parts[1])  # also checks the signing input is ASCII
    signature = b64decode(parts[2])
    if len(signature) != SIGNATURE_SIZE:
        raise MalformedError(f"an {ALGORITHM} signature is {SIGNATURE_SIZE} bytes, "
                             f"got {len(signature)}")
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    try:
        verifying_key.verify(signature, signing_input, hashfunc=hashlib.sha256,
                             sigdecode=sigdecode_string)
    except ecdsa.BadSignatureError:
        raise SignatureError("the assertion's signature does not match the "
                             "identity provider's key") from None
    return _json_object(payload, "payload")


def _compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _json_object(data: bytes, what: str) -> dict:
    try:
        value = json.loads(data)
    except ValueError:
        raise MalformedError(f"the assertion's {what} is not JSON") from None
    if not isinstance(value, dict):
        raise MalformedError(f"the assertion's {what} is not a JSON object")
    return value


def load_signing_key(path: str) -> ecdsa.SigningKey:
    return ecdsa.SigningKey.from_pem(_read_pem(path))


def load_verifying_key(path: str) -> ecdsa.VerifyingKey:
    key = ecdsa.VerifyingKey.from_pem(_read_pem(path))
    if key.curve != CURVE:
        raise ValueError(f"{path}: {ALGORITHM} needs a P-256 key, got {key.curve.name}")
    return key


def _read_pem(path: str) -> str:
    """The PEM block, without the comment lines our demo keys start with."""
    with open(path) as f:
        text = f.read()
    start = text.find("-----BEGIN")
    if start < 0:
        raise ValueError(f"{path} holds no PEM key")
    return text[start:]
