"""The demo as deployed: ``pserve development.ini``, and circusd + production.ini.

Real processes all the way: pserve (waitress and, through the plugin, a
spawned cluster), or circusd running demo_app/circus.ini; requests over
real HTTP or through the real client; and nothing may be left running
once the owner is stopped.
"""

import configparser
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import urllib.error
import urllib.request

import psutil
import pytest
import tokenlib
import webtest
from pyramid.paster import get_app

from demo_app import assertion, tokens
from pyramid_powerhose.plugin import get_powerhose
from tests.conftest import REPO, all_gone, command, mentioning, read_log, wait_for

DEMO = os.path.join(REPO, "demo_app")
DEMO_SECRET = "DEMO-SECRET-public-never-use-in-production"  # as in the ini files
STARTUP = 90.0  # seconds: a cluster on a loaded 2-core machine can be slow to come up


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url, body=None):
    """(status, JSON body) of a GET, or a POST of ``body``."""
    request = urllib.request.Request(url, data=body, headers={
        "Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def check_token(body, email):
    data = tokenlib.parse_token(body["id"], secret=DEMO_SECRET)
    assert data["uid"] == body["uid"] == tokens.user_id(email)
    assert body["key"] == tokenlib.get_derived_secret(body["id"], secret=DEMO_SECRET)
    assert body["api_endpoint"].endswith(f"/{body['uid']}")


def family(pid):
    """The process and all its descendants, as psutil.Process objects."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@contextlib.contextmanager
def sigint_not_ignored():
    """Children inherit an ignored SIGINT (pytest run as a shell's background
    job): pserve would then ignore Ctrl-C.  A handler is reset at exec instead."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous == signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)


@pytest.fixture
def leftovers(run_dir):
    """Kills, at the end, any process a test saw that is still alive."""
    seen = []
    yield seen
    for proc in seen:
        try:
            proc.kill()
        except psutil.Error:
            pass


# -- pserve development.ini --------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_pserve_development_ini(procs, endpoints, leftovers, stop_signal):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with sigint_not_ignored():
        pserve = procs.start(command("pserve") + [
            os.path.join(DEMO, "development.ini"), f"http_port={port}",
            f"frontend={endpoints.frontend}", f"backend={endpoints.backend}"], "pserve")

    def ready():
        assert pserve.poll() is None, read_log(pserve)
        try:
            status, body = http(base + "/__heartbeat__")
        except OSError:
            return False
        return status == 200 and body["workers"] == 2 and body

    heartbeat = wait_for(ready, timeout=STARTUP, interval=0.2, what="pserve and 2 workers")
    cluster = family(pserve.pid) + mentioning(endpoints.dir)
    leftovers.extend(cluster)
    # The broker and the workers are ours, on our private endpoints.
    broker = psutil.Process(heartbeat["broker_pid"])
    assert broker in cluster and endpoints.frontend in broker.cmdline()

    status, body = http(base + "/token", json.dumps(
        {"assertion": assertion.mint("alice@example.com")}).encode())
    assert status == 200, body
    check_token(body, "alice@example.com")
    assert body["duration"] == 3600

    status, body = http(base + "/token", json.dumps(
        {"assertion": assertion.mint("alice@example.com", ttl=-1)}).encode())
    assert (status, body["error"]) == (401, "expired-assertion")
    status, body = http(base + "/token", b"{not json")
    assert (status, body["error"]) == (400, "invalid-json")

    os.kill(pserve.pid, stop_signal)
    pserve.wait(30)
    wait_for(lambda: all_gone(cluster) and not mentioning(endpoints.dir), timeout=30,
             interval=0.2, what="the cluster to stop with pserve")
    with pytest.raises(OSError):
        http(base + "/__heartbeat__")


def test_pserve_with_an_unsafe_socket_directory_names_the_setting(procs, run_dir):
    # development.ini's empty endpoints: the defaults, in a private directory
    # that someone made world-writable.
    runtime = os.path.join(run_dir, "xdg")
    os.mkdir(runtime, 0o700)
    os.mkdir(os.path.join(runtime, "powerhose"))
    os.chmod(os.path.join(runtime, "powerhose"), 0o777)
    pserve = procs.start(command("pserve") + [
        os.path.join(DEMO, "development.ini"), f"http_port={free_port()}"], "pserve",
        env={"XDG_RUNTIME_DIR": runtime})
    assert pserve.wait(STARTUP) != 0
    log = read_log(pserve)
    assert "pyramid.exceptions.ConfigurationError" in log and "chmod 700" in log, log
    assert "powerhose.frontend and powerhose.backend are not set" in log, log
    assert "UnsafeDirectoryError" not in log, log
    assert os.listdir(os.path.join(runtime, "powerhose")) == []  # no socket, no lock file


# -- circusd circus.ini + production.ini --------------------------------------


def private_circus_ini(endpoints):
    """demo_app/circus.ini with every endpoint in our run dir and absolute commands."""
    ini = configparser.RawConfigParser(strict=False)
    ini.optionxform = str
    ini.read(os.path.join(DEMO, "circus.ini"))
    ini["circus"]["endpoint"] = f"ipc://{endpoints.dir}/circus.sock"
    ini["circus"]["pubsub_endpoint"] = f"ipc://{endpoints.dir}/circus-pub.sock"
    assert ini["circus"]["multicast_endpoint"] == ""
    broker, workers = ini["watcher:broker"], ini["watcher:workers"]
    assert shlex.split(workers["args"])[0] == "demo_app.jobs:issue_token"
    broker["cmd"] = command("powerhose-broker")[0]
    broker["args"] += f" --frontend {endpoints.frontend} --backend {endpoints.backend}"
    workers["cmd"] = command("powerhose-worker")[0]
    workers["args"] += f" --backend {endpoints.backend}"
    path = os.path.join(endpoints.dir, "circus.ini")
    with open(path, "w") as f:
        ini.write(f)
    return path


def test_circus_ini_with_production_ini(procs, endpoints, leftovers, client, wait_workers):
    circusd = procs.start(command("circusd") + [private_circus_ini(endpoints)], "circusd")
    try:
        wait_for(lambda: client.ping(timeout=0.5) or circusd.poll() is not None,
                 timeout=STARTUP, what="the broker under circusd")
        assert circusd.poll() is None, read_log(circusd)
        wait_workers(client, 2, timeout=STARTUP)
        cluster = family(circusd.pid)
        leftovers.extend(cluster)
        assert len(cluster) >= 4  # circusd, broker, 2 workers

        ours = {p.pid for p in psutil.Process().children(recursive=True)}
        app = get_app(os.path.join(DEMO, "production.ini"),
                      options={"frontend": endpoints.frontend})
        powerhose = get_powerhose(app.registry)
        assert powerhose.settings.cluster == "attach" and powerhose.cluster is None
        test_app = webtest.TestApp(app)
        try:
            res = test_app.post("/token", json.dumps(
                {"assertion": assertion.mint("bob@example.com")}))
            check_token(res.json, "bob@example.com")
            assert test_app.get("/__heartbeat__").json["workers"] == 2
        finally:
            powerhose.close()
        # attach started nothing: no new process here or under circusd
        assert {p.pid for p in psutil.Process().children(recursive=True)} == ours
        assert {p.pid for p in family(circusd.pid)} == {p.pid for p in cluster}
    finally:
        circusd.send_signal(signal.SIGTERM)
        try:
            circusd.wait(30)
        except subprocess.TimeoutExpired:
            pass
    wait_for(lambda: all_gone(leftovers) and not mentioning(endpoints.dir), timeout=30,
             interval=0.2, what="circusd to stop its broker and workers")
