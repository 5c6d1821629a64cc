"""A live status page of the cluster, off by default (``powerhose.status_page``).

What ``powerhose status`` shows, in the browser: the broker, a line per
service and per worker, and charts of jobs/s, queue depth and run time
that move as jobs run.  The page polls a JSON view every second and keeps
the last minutes of points itself, so the server keeps no history; the
chart library (uPlot, MIT) is served from this package, never from a CDN.
Both views require ``powerhose.status_page_permission``: the application's
security policy decides who may look.
"""

from __future__ import annotations

import html
import os

from pyramid.response import Response

from .exc import PowerhoseError, SettingsError
from .settings import settings_from_mapping
from .status import quantile

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATS_TIMEOUT = 1.0  # seconds: the page asks every second


def includeme(config):
    """Add the page's routes and views when ``powerhose.status_page`` is true."""
    try:
        settings = settings_from_mapping(config.get_settings())
    except SettingsError:
        return  # pyramid_powerhose's own configuration step says what is wrong
    if not settings.status_page:
        return
    path = settings.status_page_path.rstrip("/")
    config.add_route("powerhose.status", path)
    config.add_route("powerhose.status.json", path + "/stats.json")
    config.add_view(page, route_name="powerhose.status",
                    permission=settings.status_page_permission)
    config.add_view(stats, route_name="powerhose.status.json", renderer="json",
                    permission=settings.status_page_permission)
    config.add_static_view(path + "/static", STATIC, permission=settings.status_page_permission)


def stats(request):
    """The broker's statistics, with each service's percentiles worked out."""
    from .plugin import get_powerhose
    try:
        data = get_powerhose(request.registry).client.stats(timeout=STATS_TIMEOUT)
    except PowerhoseError as error:
        request.response.status = 503
        return {"error": type(error).__name__, "message": str(error)}
    for svc in data["services"].values():
        svc["percentiles_ms"] = {
            f"{name}_p{int(q * 100)}": None if value is None else round(value * 1000, 3)
            for name in ("wait", "run", "total")
            for q in (0.5, 0.99)
            for value in [quantile(q, svc[f"{name}_seconds"])]}
    return data


def page(request):
    base = html.escape(request.route_path("powerhose.status"))
    return Response(PAGE.replace("{base}", base), content_type="text/html", charset="utf-8")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>powerhose status</title>
<link rel="stylesheet" href="{base}/static/uplot/uPlot.min.css">
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
 h1 { font-size: 1.3em; margin: 0 0 .3em; }
 #broker { color: #555; margin-bottom: 1em; }
 table { border-collapse: collapse; margin: .5em 0 1.5em; }
 th, td { padding: .25em .8em; border-bottom: 1px solid #ddd; text-align: right; }
 th:first-child, td:first-child { text-align: left; }
 .charts { display: flex; flex-wrap: wrap; gap: 1em; }
 .chart h2 { font-size: 1em; margin: 0; }
 #error { color: #b00; }
</style>
</head>
<body>
<h1>powerhose status</h1>
<div id="broker">waiting for the broker...</div>
<div id="error"></div>
<table id="services"><thead><tr><th>service</th><th>idle</th><th>busy</th><th>queued</th>
<th>jobs/s</th><th>wait p50 ms</th><th>wait p99 ms</th><th>run p50 ms</th><th>run p99 ms</th>
<th>done</th><th>failed</th></tr></thead><tbody></tbody></table>
<div class="charts">
 <div class="chart"><h2>jobs/s</h2><div id="chart-rate"></div></div>
 <div class="chart"><h2>queued jobs</h2><div id="chart-queue"></div></div>
 <div class="chart"><h2>run time, ms (p50, p99)</h2><div id="chart-run"></div></div>
</div>
<table id="workers"><thead><tr><th>worker</th><th>pid</th><th>host</th><th>service</th>
<th>state</th><th>jobs</th>
<th>age s</th><th>last job ms</th></tr></thead><tbody></tbody></table>
<script src="{base}/static/uplot/uPlot.iife.min.js"></script>
<script src="{base}/static/status_page.js" data-stats="{base}/stats.json"></script>
</body>
</html>
"""
