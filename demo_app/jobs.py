"""The worker side: ``powerhose.target = demo_app.jobs:issue_token``.

Job data is the JSON request body; the result is JSON: the token, or the
rejection the view turns into a 400/401.  The key, secret, issuer and
audience come from ``powerhose.params.*`` (``get_params()``), read once
per worker process.
"""

from __future__ import annotations

import functools
import json
import logging

from pyramid_powerhose import get_params

from . import tokens

log = logging.getLogger(__name__)


def issue_token(job) -> bytes:
    """The worker target: check the assertion in ``job.data``, issue a token."""
    return run(job.data, config_from(get_params()))


def run(data: bytes, config: tokens.TokenConfig) -> bytes:
    """What the target does, for callers that already hold a config."""
    result = tokens.handle(data, config)
    if result["status"] != 200:
        log.info("assertion rejected: %s", result["error"])
    return json.dumps(result).encode()


def config_from(params: dict) -> tokens.TokenConfig:
    return _cached_config(tuple(sorted(params.items())))


@functools.lru_cache(maxsize=4)
def _cached_config(items) -> tokens.TokenConfig:
    # Loading the key parses PEM and ASN.1: once per worker, not per job.
    return tokens.TokenConfig.from_params(dict(items))
