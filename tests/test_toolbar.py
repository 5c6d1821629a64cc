"""The debug toolbar's Powerhose panel, in a real app with pyramid_debugtoolbar,
a real cluster and real jobs: the toolbar's page for a request lists its jobs,
the workers that ran them, their outcomes and the remote traceback of one that
raised."""

import re
import socket

import pytest
import webtest
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.response import Response

from pyramid_powerhose import exc
from pyramid_powerhose.client import collect_replies
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
    request.powerhose.submit(b"later").result()
    # The headers the job's target saw (not the toolbar's question to the broker).
    seen = request.powerhose.execute(b"", service="headers")
    response = Response("<html><body>done</body></html>", content_type="text/html")
    response.headers["X-Job-Headers"] = seen.decode()
    return response


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
        workers = {}
        for service, target in (("boom", "boom"), ("headers", "headers")):
            workers[service] = procs.start(
                command("powerhose-worker") + [f"tests.targets:{target}", "--backend",
                                               endpoints.backend, "--service", service,
                                               "--heartbeat", "0.2"], f"{service}-worker")
        client = get_powerhose(wsgi.registry).client
        wait_for(lambda: all(client.has_service(s) for s in ("boom", "headers", "default")),
                 what="the services' workers")
        app = webtest.TestApp(wsgi)
        response = app.get("/jobs", extra_environ=LOCAL)
        assert response.headers["X-Job-Headers"] == ""
        page = toolbar_page(app, response)
        listed = rows(page)
        assert [(r[0], r[1], r[2], r[3]) for r in listed] == [
            ("execute", "default", "1", "5"), ("map", "default", "3", "6"),
            ("execute", "boom", "1", "1"), ("submit", "default", "1", "5"),
            ("execute", "headers", "1", "0")]
        assert [r[6].split()[0] for r in listed] == ["OK", "OK", "ExecutionError", "OK", "OK"]
        assert all(float(r[4]) > 0 for r in listed)
        assert "Traceback" in page and "tests/targets.py" in page  # the remote one
        # The worker column: pid@host of the process that ran the jobs, as the
        # broker knows it (the cluster's one default worker) or as we started it.
        (default_pid,) = [w["pid"] for w in client.stats()["workers"]
                          if w["service"] == "default"]
        host = socket.gethostname()
        assert [r[5] for r in listed] == [
            f"{default_pid}@{host}", f"{default_pid}@{host} (3)",
            f"{workers['boom'].pid}@{host}", f"{default_pid}@{host}",
            f"{workers['headers'].pid}@{host}"]
        assert default_pid not in (workers["boom"].pid, workers["headers"].pid)
        assert rows(toolbar_page(app, app.get("/quiet", extra_environ=LOCAL))) == []
    finally:
        get_powerhose(wsgi.registry).close()


def test_replies_say_who_ran_the_job_only_when_asked(cluster, client):
    """collect_replies, which the panel uses, on its own; outside it, jobs do not ask."""
    _, workers = cluster
    ours = {f"{w.pid}@{socket.gethostname()}" for w in workers}
    assert client.execute(b"plain") == b"plain"
    with collect_replies() as replies:
        assert client.execute(b"one") == b"one"
        assert client.map([b"a", b"b"]) == [b"a", b"b"]
        future = client.submit(b"later")
        assert future.result() == b"later"
        with pytest.raises(exc.NoWorkerError):
            client.execute(b"x", service="nobody")
    assert [r.ok for r in replies] == [True] * 4 + [False]
    assert {r.worker for r in replies[:4]} <= ours and replies[4].worker == ""
    assert sorted(r.data for r in replies[:4]) == [b"a", b"b", b"later", b"one"]
    with collect_replies() as replies:
        pass
    client.execute(b"not asked")
    assert replies == []


def test_the_panel_needs_the_toolbar(endpoints):
    config = Configurator(settings={"powerhose.frontend": endpoints.frontend,
                                    "powerhose.cluster": "attach"})
    config.include("pyramid_powerhose")
    with pytest.raises(ConfigurationError, match="pyramid_debugtoolbar"):
        config.include("pyramid_powerhose.toolbar")
