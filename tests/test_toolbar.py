"""The debug toolbar's Powerhose panel, in a real app with pyramid_debugtoolbar,
a real cluster and real jobs: the toolbar's page for a request lists its jobs,
their outcomes and the remote traceback of one that raised."""

import re

import pytest
import webtest
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.response import Response

from pyramid_powerhose import exc
from pyramid_powerhose.plugin import get_powerhose

from .conftest import wait_for

LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


def jobs_view(request):
    request.powerhose.execute(b"hello", service="default")
    request.powerhose.map([b"a", b"bb", b"ccc"])
    try:
        request.powerhose.execute(b"x", service="boom")
    except exc.ExecutionError:
        pass
    return Response("<html><body>done</body></html>", content_type="text/html")


def quiet_view(request):
    return Response("<html><body>nothing</body></html>", content_type="text/html")


def make_app(endpoints):
    config = Configurator(settings={
        "powerhose.frontend": endpoints.frontend, "powerhose.backend": endpoints.backend,
        "powerhose.target": "tests.targets:echo", "powerhose.cluster": "spawn",
        "powerhose.workers": "1", "powerhose.heartbeat": "0.2",
        "debugtoolbar.hosts": "127.0.0.1", "debugtoolbar.show_on_exc_only": "false",
        "debugtoolbar.includes": "pyramid_powerhose.toolbar"})
    config.include("pyramid_debugtoolbar")
    config.include("pyramid_powerhose")
    config.add_route("jobs", "/jobs")
    config.add_view(jobs_view, route_name="jobs")
    config.add_route("quiet", "/quiet")
    config.add_view(quiet_view, route_name="quiet")
    return config.make_wsgi_app()


def toolbar_page(app, response):
    (url,) = re.findall(r'href="https?://[^/"]+(/_debug_toolbar/[0-9a-f]+)"', response.text)
    return app.get(url, extra_environ=LOCAL).text


def rows(page):
    table = re.search(r'<table[^>]*id="powerhose-jobs".*?</table>', page, re.S)
    if table is None:
        return []
    return [[re.sub(r"<[^>]+>", "", cell).strip().split("\n")[0] for cell in
             re.findall(r"<td>(.*?)</td>", row, re.S)]
            for row in re.findall(r'<tr class="powerhose-job">(.*?)</tr>', table.group(0), re.S)]


def test_the_panel_lists_the_jobs_of_the_request(endpoints, procs):
    from .conftest import command
    wsgi = make_app(endpoints)
    try:
        procs.start(command("powerhose-worker") + ["tests.targets:boom", "--backend",
                                                   endpoints.backend, "--service", "boom",
                                                   "--heartbeat", "0.2"], "boom-worker")
        client = get_powerhose(wsgi.registry).client
        wait_for(lambda: client.has_service("boom") and client.has_service("default"),
                 what="both services' workers")
        app = webtest.TestApp(wsgi)
        page = toolbar_page(app, app.get("/jobs", extra_environ=LOCAL))
        listed = rows(page)
        assert [(r[0], r[1], r[2], r[3]) for r in listed] == [
            ("execute", "default", "1", "5"), ("map", "default", "3", "6"),
            ("execute", "boom", "1", "1")]
        assert [r[5].split()[0] for r in listed] == ["OK", "OK", "ExecutionError"]
        assert all(float(r[4]) > 0 for r in listed)
        assert "Traceback" in page and "tests/targets.py" in page  # the remote one
        assert rows(toolbar_page(app, app.get("/quiet", extra_environ=LOCAL))) == []
    finally:
        get_powerhose(wsgi.registry).close()


def test_the_panel_needs_the_toolbar(endpoints):
    config = Configurator(settings={"powerhose.frontend": endpoints.frontend,
                                    "powerhose.cluster": "attach"})
    config.include("pyramid_powerhose")
    with pytest.raises(ConfigurationError, match="pyramid_debugtoolbar"):
        config.include("pyramid_powerhose.toolbar")
