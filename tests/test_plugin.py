"""The Pyramid plugin: a real app, real broker and workers, real circusd.

Every app is built with ``Configurator`` + ``config.include`` and driven
through ``webtest.TestApp``; the jobs go over real sockets.
"""

import logging
import os
import threading
import time

import psutil
import pytest
import webtest
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.response import Response

from pyramid_powerhose import Client
from pyramid_powerhose.exc import NoWorkerError, TimeoutError
from pyramid_powerhose.plugin import get_powerhose
from pyramid_powerhose.settings import Settings

from .conftest import REPO, all_gone, live_children, wait_for

HEARTBEAT = "0.2"


def job_view(request):
    data = request.params.get("data", "")
    service = request.params.get("service") or None
    return Response(body=request.powerhose.execute(data, service=service))


def submit_view(request):
    future = request.powerhose.submit(request.params.get("data", ""))
    return Response(body=future.result())


def client_view(request):
    # reify: the same object for the whole request
    assert request.powerhose is request.powerhose
    return Response(str(id(request.powerhose.client)))


def build(settings, commit=True):
    config = Configurator(settings=settings)
    config.include("pyramid_powerhose")
    config.add_route("job", "/job")
    config.add_view(job_view, route_name="job")
    config.add_route("submit", "/submit")
    config.add_view(submit_view, route_name="submit")
    config.add_route("client", "/client")
    config.add_view(client_view, route_name="client")
    if commit:
        return config.make_wsgi_app()
    return config


@pytest.fixture
def make_app(endpoints):
    """Builds a TestApp on the test's private endpoints; closes it afterwards."""
    built = []

    def make(raw=False, **settings):
        full = {"powerhose.frontend": endpoints.frontend,
                "powerhose.backend": endpoints.backend,
                "powerhose.heartbeat": HEARTBEAT,
                "powerhose.cluster": "attach"}
        full.update({f"powerhose.{k}": v for k, v in settings.items()})
        app = build(full)
        built.append(app)
        return app if raw else webtest.TestApp(app)

    yield make
    for app in built:
        get_powerhose(app.registry).close()


def configure(endpoints, **settings):
    """The Settings the plugin reads from ``powerhose.*`` settings."""
    full = {"powerhose.frontend": endpoints.frontend, "powerhose.backend": endpoints.backend,
            "powerhose.cluster": "attach", "some.other.setting": "ignored"}
    full.update(settings)
    config = Configurator(settings=full)
    config.include("pyramid_powerhose")
    config.commit()
    return get_powerhose(config.registry).settings


# -- settings -------------------------------------------------------------------------

def test_defaults_are_the_settings_dataclass_defaults(endpoints):
    settings = configure(endpoints)
    assert settings == Settings(frontend=endpoints.frontend, backend=endpoints.backend,
                                cluster="attach")
    assert settings.numprocesses == 5 and settings.http_errors is True


def test_every_setting_is_read(endpoints):
    settings = configure(endpoints, **{
        "powerhose.target": " tests.targets:echo ",
        "powerhose.workers": "3",
        "powerhose.cluster": "Attach",
        "powerhose.service": "resize",
        "powerhose.heartbeat": "0.5",
        "powerhose.liveness": "4",
        "powerhose.timeout": "2.5",
        "powerhose.worker_timeout": "30",
        "powerhose.max_age": "600",
        "powerhose.max_age_delta": "60",
        "powerhose.broker_timeout": "20",
        "powerhose.prefetch": "3",
        "powerhose.nice": "0",
        "powerhose.no_worker_timeout": "2",
        "powerhose.max_job_size": "1024",
        "powerhose.grace": "3",
        "powerhose.working_dir": "/srv/app",
        "powerhose.http_errors": "false",
        "powerhose.logfile": "stderr",
        "powerhose.debug": "true",
        "powerhose.params.region": "eu",
        "powerhose.params.key": "a:b|c",
    })
    assert settings == Settings(
        target="tests.targets:echo", frontend=endpoints.frontend, backend=endpoints.backend,
        service="resize", heartbeat=0.5, liveness=4, timeout=2.5, worker_timeout=30.0,
        max_age=600.0, max_age_delta=60.0, broker_timeout=20.0, prefetch=3, nice=0,
        no_worker_timeout=2.0,
        max_job_size=1024, grace=3.0, numprocesses=3, working_dir="/srv/app",
        cluster="attach", http_errors=False, params={"region": "eu", "key": "a:b|c"},
        logfile="stderr", debug=True)


def test_cluster_mode_is_case_insensitive(endpoints):
    assert configure(endpoints, **{"powerhose.cluster": " ATTACH "}).cluster == "attach"


def test_python_values_are_accepted(endpoints):
    settings = configure(endpoints, **{
        "powerhose.workers": 2, "powerhose.timeout": 3, "powerhose.heartbeat": 0.2,
        "powerhose.http_errors": False, "powerhose.service": None})
    assert (settings.numprocesses, settings.timeout, settings.heartbeat) == (2, 3.0, 0.2)
    assert settings.http_errors is False and settings.service == "default"


def test_old_heartbeat_endpoint_is_ignored(endpoints):
    # The 2012 Powerhose took a heartbeat *endpoint*; MDP needs none.
    settings = configure(endpoints, **{"powerhose.heartbeat": "ipc:///tmp/heartbeat"})
    assert settings.heartbeat == Settings.heartbeat


@pytest.mark.parametrize("key, value, message", [
    ("workers", "five", "powerhose.workers must be a whole number, got 'five'"),
    ("workers", "2.5", "powerhose.workers must be a whole number, got '2.5'"),
    ("workers", True, "powerhose.workers must be a whole number"),
    ("workers", "-1", "powerhose.workers must be 0 or more"),
    ("cluster", "sometimes", "powerhose.cluster must be one of auto, spawn, attach, "
                             "got 'sometimes'"),
    ("heartbeat", "fast", "powerhose.heartbeat must be a positive number of seconds"),
    ("heartbeat", "0", "powerhose.heartbeat must be a positive number of seconds"),
    ("liveness", "0", "powerhose.liveness must be at least 1"),
    ("timeout", "soon", "powerhose.timeout must be a number of seconds, got 'soon'"),
    ("timeout", "0", "powerhose.timeout must be positive"),
    ("worker_timeout", "-1", "powerhose.worker_timeout must be >= 0"),
    ("max_age", "0", "powerhose.max_age must be -1 (never) or positive"),
    ("max_age_delta", "lots", "powerhose.max_age_delta must be a number of seconds"),
    ("broker_timeout", "-5", "powerhose.broker_timeout must be >= 0"),
    ("no_worker_timeout", "0", "powerhose.no_worker_timeout must be positive"),
    ("max_job_size", "0", "powerhose.max_job_size must be a positive number of bytes"),
    ("max_job_size", "16M", "powerhose.max_job_size must be a whole number, got '16M'"),
    ("grace", "0", "powerhose.grace must be positive"),
    ("frontend", "localhost:5555", "powerhose.frontend must be a ZeroMQ endpoint"),
    ("backend", "/tmp/back.sock", "powerhose.backend must be a ZeroMQ endpoint"),
    ("service", "mmi.stats", "powerhose.service names starting with 'mmi.' are reserved"),
    ("service", "", "powerhose.service must be 1 to 255 bytes"),
    ("http_errors", "maybe", "powerhose.http_errors must be true or false, got 'maybe'"),
    ("debug", "loud", "powerhose.debug must be true or false, got 'loud'"),
    ("target", 42, "powerhose.target must be text, got 42"),
    ("params.", "x", "powerhose.params. needs a parameter name"),
])
def test_bad_value_is_a_configuration_error_naming_it(endpoints, key, value, message):
    with pytest.raises(ConfigurationError) as info:
        configure(endpoints, **{f"powerhose.{key}": value})
    assert message in str(info.value)


def test_same_frontend_and_backend_is_an_error(endpoints):
    with pytest.raises(ConfigurationError, match="powerhose.frontend and powerhose.backend "
                                                 "must be different"):
        configure(endpoints, **{"powerhose.backend": endpoints.frontend})


def test_unknown_key_is_an_error(endpoints):
    with pytest.raises(ConfigurationError) as info:
        configure(endpoints, **{"powerhose.worker": "2"})
    assert "unknown setting powerhose.worker; did you mean powerhose.workers?" \
        in str(info.value)


@pytest.mark.parametrize("mode", ["spawn", "auto"])
def test_spawning_needs_a_target(endpoints, mode):
    before = live_children()
    with pytest.raises(ConfigurationError, match=f"powerhose.cluster = {mode} needs "
                                                 "powerhose.target"):
        configure(endpoints, **{"powerhose.cluster": mode})
    assert live_children() <= before


@pytest.mark.parametrize("mode", ["spawn", "auto"])
def test_unsafe_default_socket_directory_names_the_setting(run_dir, monkeypatch, mode):
    runtime = os.path.join(run_dir, "xdg")
    os.mkdir(runtime, 0o700)
    os.mkdir(os.path.join(runtime, "powerhose"))
    os.chmod(os.path.join(runtime, "powerhose"), 0o777)  # anyone could squat the sockets
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    before = live_children()
    config = Configurator(settings={"powerhose.cluster": mode,
                                    "powerhose.target": "tests.targets:echo"})
    config.include("pyramid_powerhose")
    with pytest.raises(ConfigurationError) as info:
        config.commit()
    message = str(info.value)
    assert "powerhose.frontend" in message and "chmod 700" in message
    assert "UnsafeDirectoryError" not in message  # a sentence, not a traceback
    assert live_children() <= before


def test_working_dir_that_is_not_a_directory_names_the_setting(endpoints):
    before = live_children()
    with pytest.raises(ConfigurationError, match="powerhose.working_dir /nowhere/at/all "
                                                 "is not a directory"):
        configure(endpoints, **{"powerhose.cluster": "spawn",
                                "powerhose.target": "tests.targets:echo",
                                "powerhose.working_dir": "/nowhere/at/all"})
    assert live_children() <= before


def test_auto_without_a_place_for_its_spawn_lock_names_the_frontend(run_dir):
    frontend = f"ipc://{run_dir}/missing/front.sock"
    before = live_children()
    with pytest.raises(ConfigurationError) as info:
        configure(type("Endpoints", (), {"frontend": frontend,
                                         "backend": f"ipc://{run_dir}/back.sock"}),
                  **{"powerhose.cluster": "auto", "powerhose.target": "tests.targets:echo"})
    message = str(info.value)
    assert f"powerhose.frontend = {frontend}" in message
    assert f"cannot create {run_dir}/missing/front.sock.spawn.lock" in message
    assert live_children() <= before


def test_settings_are_read_when_the_configuration_is_committed(endpoints):
    """Settings added after the include still count: reading them is deferred."""
    config = build({"powerhose.frontend": endpoints.frontend,
                    "powerhose.backend": endpoints.backend,
                    "powerhose.cluster": "attach"}, commit=False)
    config.add_settings({"powerhose.workers": "7", "powerhose.service": "late"})
    config.commit()
    settings = get_powerhose(config.registry).settings
    assert (settings.numprocesses, settings.service) == (7, "late")


# -- request.powerhose, on a real broker and workers (attach) ---------------------

def test_view_runs_a_job_on_the_cluster(cluster, make_app, client):
    app = make_app()
    assert app.get("/job", {"data": "hello"}).body == b"hello"
    assert app.get("/submit", {"data": "later"}).body == b"later"
    # Counted by the broker (on the direct path once the worker is idle).
    wait_for(lambda: client.stats()["services"]["default"]["done"] == 2,
             what="the broker to count both jobs")


def test_one_shared_client_per_registry(cluster, make_app, endpoints):
    raw = make_app(raw=True)
    app = webtest.TestApp(raw)
    powerhose = get_powerhose(raw.registry)
    assert powerhose._client is None  # created on first use, not at start-up
    ids = [app.get("/client").text for _ in range(3)]
    threads = [threading.Thread(target=lambda: ids.append(app.get("/client").text))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 7 and set(ids) == {str(id(powerhose.client))}
    assert isinstance(powerhose.client, Client)
    assert powerhose.client.frontend == endpoints.frontend
    assert app.get("/job", {"data": "x"}).body == b"x"
    other = make_app()  # another application, another client
    assert other.get("/client").text != str(id(powerhose.client))


def test_attach_starts_without_a_broker_and_requests_fail(make_app):
    before = live_children()
    app = make_app(timeout="0.3")
    assert live_children() <= before  # nothing spawned
    response = app.get("/job", {"data": "x"}, status=504)
    assert response.json["error"] == "timeout"


def test_auto_attaches_to_a_running_broker(cluster, make_app):
    broker, _ = cluster
    before = live_children()
    raw = make_app(raw=True, cluster="auto", target="tests.targets:echo")
    powerhose = get_powerhose(raw.registry)
    assert powerhose.cluster is None
    assert powerhose.client.ping() == broker.pid
    assert live_children() <= before  # nothing new
    assert webtest.TestApp(raw).get("/job", {"data": "hi"}).body == b"hi"


# -- exception views ------------------------------------------------------------------

def test_no_worker_is_503_with_retry_after(cluster, make_app):
    response = make_app().get("/job", {"data": "x", "service": "nobody"}, status=503)
    assert response.headers["Retry-After"] == "1"  # heartbeat 0.2 x liveness 3
    assert response.content_type == "application/json"
    assert response.json["error"] == "no-worker"
    assert response.json["message"]


def test_timeout_is_504(start_broker, start_worker, wait_workers, client, make_app):
    start_broker()
    start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    response = make_app(timeout="0.5").get("/job", {"data": "3"}, status=504)
    assert response.json["error"] == "timeout"
    assert "Retry-After" not in response.headers


def test_worker_killed_mid_job_is_503(start_broker, start_worker, wait_workers, client,
                                      procs, make_app):
    start_broker()
    worker = start_worker("tests.targets:sleep")
    wait_workers(client, 1)

    def kill_when_busy():
        wait_for(lambda: client.stats()["services"]["default"]["busy"] == 1,
                 what="the job to start")
        procs.stop(worker)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    try:
        response = make_app(timeout="20").get("/job", {"data": "30"}, status=503)
    finally:
        killer.join()
    assert worker.wait(5) is not None
    assert response.json["error"] == "worker-lost"
    assert response.headers["Retry-After"] == "1"


def test_without_http_errors_the_errors_are_left_to_the_app(cluster, make_app, endpoints):
    app = make_app(http_errors="false")
    with pytest.raises(NoWorkerError):
        app.get("/job", {"data": "x", "service": "nobody"})
    with pytest.raises(TimeoutError):
        make_app(http_errors="false", timeout="0.3",
                 frontend=endpoints.frontend + ".none").get("/job")


# -- spawn: a real cluster under circus -------------------------------------------------

def test_spawn_starts_a_cluster_with_the_app_and_stops_it(make_app, client):
    before = live_children()
    raw = make_app(raw=True, cluster="spawn", target="tests.targets:pid", workers="2",
                   working_dir=REPO)
    powerhose = get_powerhose(raw.registry)
    assert powerhose.cluster is not None and powerhose.cluster.running
    # Started with the app, before any request: the broker answers, both
    # workers are registered, and they are this process's descendants.
    processes = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    ours = {p.pid for p in processes}
    assert client.ping() in ours
    assert client.stats()["services"]["default"]["workers"] == 2
    app = webtest.TestApp(raw)
    worker_pid = int(app.get("/job").text)
    assert worker_pid in ours and worker_pid != client.ping()

    powerhose.close()
    assert powerhose.cluster is None
    wait_for(lambda: all_gone(processes), timeout=20, what="the cluster to stop")
    assert client.ping(timeout=0.3) is None
    assert live_children() <= before


def test_no_broker_is_503_at_once(make_app, endpoints):
    """attach with nothing listening: 503 within about a second, not 504 at the timeout."""
    app = make_app(timeout="30", frontend=endpoints.frontend + ".none")
    started = time.monotonic()
    response = app.get("/job", {"data": "x"}, status=503)
    assert time.monotonic() - started < 2.5
    assert response.json["error"] == "broker-lost"
    assert response.headers["Retry-After"] == "1"


@pytest.fixture
def overloaded_broker(endpoints):
    """A stand-in broker whose every service is full: OverloadedError at once."""
    import zmq
    from pyramid_powerhose import protocol

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(endpoints.frontend)
    stop = threading.Event()

    def answer():
        while not stop.is_set():
            if router.poll(50):
                address, *frames = router.recv_multipart()
                if protocol.is_lease_control([address, *frames]):
                    continue  # a client process's wish for leases: none granted here
                request = protocol.parse_frontend([address, *frames])
                reply = protocol.Reply.error(request.request.job_id, protocol.ERR_OVERLOADED,
                                             "queue full")
                router.send_multipart(protocol.frontend_reply(request, reply))

    thread = threading.Thread(target=answer)
    thread.start()
    yield
    stop.set()
    thread.join()
    context.destroy(linger=0)


def test_overloaded_is_503_with_retry_after(overloaded_broker, make_app):
    response = make_app().get("/job", {"data": "x"}, status=503)
    assert response.json["error"] == "overloaded"
    assert response.headers["Retry-After"] == "1"


def test_a_storm_of_errors_logs_a_bounded_amount(overloaded_broker, make_app, caplog):
    app = make_app()
    with caplog.at_level(logging.WARNING, logger="pyramid_powerhose.plugin"):
        for _ in range(100):
            app.get("/job", {"data": "x"}, status=503)
    warnings = [r for r in caplog.records if r.name == "pyramid_powerhose.plugin"]
    assert len(warnings) <= 20  # of 100, whatever earlier tests logged
