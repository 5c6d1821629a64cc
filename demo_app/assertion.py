"""Mint assertions signed with the demo key, for trying the demo and for tests.

    python -m demo_app.assertion alice@example.com [--audience ...] [--ttl 300]

The demo identity provider's key is public (see keys/README.txt): anyone
can mint these, which is fine for a demo and nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import jws, tokens

KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keys")
DEMO_SIGNING_KEY = os.path.join(KEYS, "demo-signing-key.pem")  # DEMO KEY, public
DEMO_PUBLIC_KEY = os.path.join(KEYS, "demo-public-key.pem")


def mint(email: str, audience: str = tokens.DEMO_AUDIENCE, ttl: float = 300,
         issuer: str = tokens.DEMO_ISSUER, key_path: str = DEMO_SIGNING_KEY,
         now: float | None = None) -> str:
    """An ES256 assertion that ``email`` may use ``audience`` for ``ttl`` seconds."""
    now = time.time() if now is None else now
    claims = {"iss": issuer, "aud": audience, "email": email,
              "iat": int(now), "exp": int(now + ttl)}
    return jws.sign(claims, _signing_key(key_path))


_keys: dict = {}


def _signing_key(path):
    if path not in _keys:
        _keys[path] = jws.load_signing_key(path)
    return _keys[path]


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python -m demo_app.assertion",
        description="Print an assertion signed with the DEMO identity provider key "
        "(public; never use it in production).")
    parser.add_argument("email")
    parser.add_argument("--audience", default=tokens.DEMO_AUDIENCE,
                        help="the token server it is for (default %(default)s)")
    parser.add_argument("--issuer", default=tokens.DEMO_ISSUER,
                        help="the identity provider (default %(default)s)")
    parser.add_argument("--ttl", type=float, default=300,
                        help="seconds until it expires; negative mints an expired "
                        "one (default %(default)s)")
    parser.add_argument("--key", default=DEMO_SIGNING_KEY,
                        help="PEM P-256 private key (default: the demo key)")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    print(mint(args.email, args.audience, args.ttl, args.issuer, args.key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
