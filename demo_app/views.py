"""HTTP: ``POST /token`` and ``GET /__heartbeat__``.

The view only checks that the body names an assertion; the expensive
part, verifying its signature, runs in a worker (or in this thread, for
the benchmark's in-process variant), and comes back as a JSON result the
view turns into the response.
"""

from __future__ import annotations

import json
import logging

from pyramid.view import view_config

from pyramid_powerhose.exc import PowerhoseError

from . import jobs, tokens

log = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT = 1.0  # seconds for each broker query


@view_config(route_name="token", request_method="POST", renderer="json")
def token(request):
    """200 and a token for a valid assertion; 400/401 and a JSON error otherwise."""
    try:
        assertion = tokens.parse_request(request.body)
    except tokens.Rejected as rejected:
        return _error(request, rejected.as_result())
    data = json.dumps({"assertion": assertion}).encode()
    if request.registry.settings["demo.offload"]:
        result = request.powerhose.execute(data)  # powerhose errors: the plugin's views
    else:
        result = jobs.run(data, request.registry.token_config)
    result = json.loads(result)
    if result.get("status") != 200:
        return _error(request, result)
    return result["token"]


def _error(request, result):
    request.response.status_int = result["status"]
    return {"status": result["status"], "error": result["error"],
            "message": result["message"]}


@view_config(route_name="heartbeat", request_method="GET", renderer="json")
def heartbeat(request):
    """200 with the broker's pid and its workers for our service; 503 without a broker."""
    if not request.registry.settings["demo.offload"]:
        return {"broker_pid": None, "workers": 0, "mode": "in-process"}
    powerhose = request.powerhose
    pid = powerhose.client.ping(timeout=HEARTBEAT_TIMEOUT)
    if pid is None:
        return _unavailable(request, f"no broker answers on {powerhose.settings.frontend}")
    try:
        stats = powerhose.client.stats(timeout=HEARTBEAT_TIMEOUT)
    except PowerhoseError as exc:  # the broker went away between the two queries
        return _unavailable(request, str(exc), pid)
    service = stats["services"].get(powerhose.settings.service, {})
    return {"broker_pid": pid, "workers": service.get("workers", 0),
            "idle": service.get("idle", 0), "queued": service.get("queued", 0)}


def _unavailable(request, reason, pid=None):
    log.warning("heartbeat: %s", reason)
    request.response.status_int = 503
    return {"broker_pid": pid, "workers": 0, "error": "broker-unavailable"}
