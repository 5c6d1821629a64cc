"""The live status page: its views under a real app and cluster, the
permission that guards them, and the page itself in a real headless
Chromium, whose numbers and chart change as jobs run."""

import base64
import os
import shutil
import socket
import threading
import time

import pytest
import webtest
from pyramid.authorization import ACLHelper, Allow, Authenticated
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError

from pyramid_powerhose import Client
from pyramid_powerhose.plugin import get_powerhose

from .conftest import missing, wait_for

PATH = "/ops/powerhose"


class Policy:
    """Anyone presenting ``X-User: ops`` is authenticated; the root grants
    the status permission to the authenticated."""

    def identity(self, request):
        return request.headers.get("X-User")

    def authenticated_userid(self, request):
        return self.identity(request)

    def permits(self, request, context, permission):
        principals = [Authenticated] if self.identity(request) == "ops" else []
        return ACLHelper().permits(context, principals, permission)


class Root:
    __acl__ = [(Allow, Authenticated, "see-cluster")]

    def __init__(self, request):
        pass


def build(endpoints, secured=False, **extra):
    settings = {"powerhose.frontend": endpoints.frontend, "powerhose.backend": endpoints.backend,
                "powerhose.target": "tests.targets:echo", "powerhose.cluster": "spawn",
                "powerhose.workers": "2", "powerhose.heartbeat": "0.2",
                "powerhose.status_page": "true", "powerhose.status_page_path": PATH,
                "powerhose.status_page_permission": "see-cluster", **extra}
    config = Configurator(settings=settings, root_factory=Root)
    if secured:
        config.set_security_policy(Policy())
    config.include("pyramid_powerhose")
    return config.make_wsgi_app()


@pytest.fixture
def app(endpoints):
    apps = []

    def make(**kwargs):
        wsgi = build(endpoints, **kwargs)
        apps.append(wsgi)
        return wsgi
    yield make
    for wsgi in apps:
        get_powerhose(wsgi.registry).close()


def test_the_json_view_gives_the_stats_with_percentiles(app, endpoints):
    test_app = webtest.TestApp(app())
    with Client(frontend=endpoints.frontend) as client:
        wait_for(lambda: client.stats()["services"].get("default", {}).get("workers") == 2,
                 what="the spawned workers")
        for i in range(20):
            client.execute(b"%d" % i)
    # Direct jobs reach the stats with their worker's FREE, a few ms after the last.
    stats = wait_for(lambda: (s := test_app.get(PATH + "/stats.json").json)
                     ["services"]["default"]["done"] == 20 and s, what="the 20 jobs counted")
    svc = stats["services"]["default"]
    assert len(stats["workers"]) == 2
    assert svc["percentiles_ms"]["run_p50"] is not None
    assert svc["percentiles_ms"]["run_p50"] <= svc["percentiles_ms"]["run_p99"]
    page = test_app.get(PATH)
    assert page.content_type == "text/html"
    assert test_app.get(PATH + "/static/uplot/uPlot.iife.min.js").content_length > 10_000


def test_the_page_needs_the_permission(app):
    test_app = webtest.TestApp(app(secured=True))
    for path in (PATH, PATH + "/stats.json", PATH + "/static/status_page.js"):
        assert test_app.get(path, status=403).status_int == 403
        assert test_app.get(path, headers={"X-User": "ops"}).status_int == 200


def test_off_by_default_and_never_without_a_permission(endpoints):
    config = Configurator(settings={"powerhose.frontend": endpoints.frontend,
                                    "powerhose.cluster": "attach"})
    config.include("pyramid_powerhose")
    wsgi = config.make_wsgi_app()
    webtest.TestApp(wsgi).get("/_powerhose/status", status=404)
    get_powerhose(wsgi.registry).close()
    with pytest.raises(ConfigurationError, match="status_page_permission"):
        build(endpoints, **{"powerhose.status_page_permission": ""})


# -- in a real browser ---------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def browser(run_dir):
    """Debian's headless Chromium, driven by Selenium through chromedriver."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed: pip install -e '.[test]'")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        missing("chromium and chromedriver are not installed: "
                "apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                 f"--user-data-dir={run_dir}/chromium"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def chart(driver, name):
    """The pixels of one chart's canvas, as a data URL."""
    return driver.execute_script(
        f"return document.querySelector('#chart-{name} canvas').toDataURL();")


def done_cell(driver):
    cells = driver.execute_script(
        "return Array.from(document.querySelectorAll('#services tbody tr td'))"
        ".map(td => td.textContent);")
    return int(cells[9]) if cells and cells[0] == "default" else None


def test_the_page_in_chromium_moves_as_jobs_run(app, endpoints, browser):
    from waitress.server import create_server
    port = free_port()
    server = create_server(app(), host="127.0.0.1", port=port, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{port}{PATH}")
        wait_for(lambda: done_cell(browser) is not None, timeout=30, what="the first poll")
        before_done, before_rate = done_cell(browser), chart(browser, "rate")
        with Client(frontend=endpoints.frontend) as client:
            for _ in range(20):  # a few seconds of jobs, so that jobs/s moves
                client.map([b"x"] * 50)
                time.sleep(0.1)
        wait_for(lambda: (done_cell(browser) or 0) >= before_done + 1000, timeout=30,
                 what="the page to count the jobs")
        wait_for(lambda: chart(browser, "rate") != before_rate, timeout=30,
                 what="the jobs/s chart to move")
        shot = os.environ.get("POWERHOSE_STATUS_SCREENSHOT")
        if shot:  # how docs/status_page.png is made
            with open(shot, "wb") as f:
                f.write(base64.b64decode(browser.get_screenshot_as_base64()))
    finally:
        server.close()
        thread.join(10)
