"""``config.include('pyramid_powerhose.testing')``: in-process jobs for app tests."""

import os
import socket
import threading

import pytest
import webtest
from pyramid.config import Configurator
from pyramid.response import Response

from pyramid_powerhose.exc import ExecutionError, JobTooLargeError, NoWorkerError
from pyramid_powerhose.job import Job
from pyramid_powerhose.plugin import get_powerhose
from pyramid_powerhose.testing import DummyClient
from tests.conftest import live_children


def where(job):
    """Target: which process and thread ran the job, and what it saw."""
    return (f"{os.getpid()} {threading.get_ident()} {job.service} "
            f"{job.headers.get('lang', '-')} {job.time_left is not None}")


def job_view(request):
    headers = {"lang": request.params["lang"]} if "lang" in request.params else None
    result = request.powerhose.execute(request.params.get("data", ""), headers=headers,
                                       service=request.params.get("service") or None)
    return Response(body=result)


@pytest.fixture
def listener(run_dir):
    """A real unix socket where the frontend would be: it sees any connection."""
    path = os.path.join(run_dir, "front.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    sock.setblocking(False)
    yield "ipc://" + path, sock
    sock.close()


def connections(sock):
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def make_app(frontend, settings=None, includes=("pyramid_powerhose.testing",)):
    full = {"powerhose.frontend": frontend,
            "powerhose.backend": frontend.replace("front", "back"),
            "powerhose.target": f"{__name__}:where",
            "powerhose.cluster": "spawn"}
    full.update(settings or {})
    config = Configurator(settings=full)
    for include in includes:
        config.include(include)
    config.add_route("job", "/job")
    config.add_view(job_view, route_name="job")
    return webtest.TestApp(config.make_wsgi_app())


def dummy(app) -> DummyClient:
    return get_powerhose(app.app.registry).client


@pytest.mark.parametrize("mode", ["spawn", "auto", "attach"])
def test_runs_the_target_in_process_and_never_contacts_a_broker(listener, mode):
    frontend, sock = listener
    before = live_children()
    app = make_app(frontend, {"powerhose.cluster": mode})
    body = app.get("/job", {"data": "x", "lang": "fr"}).text
    pid, thread, service, lang, has_deadline = body.split()
    assert int(pid) == os.getpid()  # in this very process
    assert (service, lang, has_deadline) == ("default", "fr", "True")
    assert isinstance(dummy(app), DummyClient)
    assert live_children() <= before  # no cluster spawned
    assert connections(sock) == 0  # nobody pinged or connected to the frontend


def test_records_the_jobs_it_ran(listener):
    app = make_app(listener[0])
    app.get("/job", {"data": "one"})
    app.get("/job", {"data": "two", "lang": "de"})
    client = dummy(app)
    assert [job.data for job in client.jobs] == [b"one", b"two"]
    assert [job.headers for job in client.jobs] == [{}, {"lang": "de"}]
    assert all(isinstance(job, Job) and job.service == "default" for job in client.jobs)
    assert len({job.id for job in client.jobs}) == 2
    future = client.submit(b"three")
    assert future.done() and future.result().split()[0] == str(os.getpid()).encode()
    assert client.map([b"four", b"five"])[1].startswith(str(os.getpid()).encode())
    assert [job.data for job in client.jobs][2:] == [b"three", b"four", b"five"]


def test_str_results_become_bytes(listener):
    app = make_app(listener[0], {"powerhose.target": "tests.targets:echo"})
    client = dummy(app)
    assert client.execute("héllo") == "héllo".encode()
    assert app.get("/job", {"data": "abc"}).body == b"abc"
    client.targets["default"] = lambda job: bytearray(b"ba")
    assert client.execute(b"") == b"ba"


def test_target_exceptions_become_execution_errors(listener):
    app = make_app(listener[0], {"powerhose.target": "tests.targets:boom"})
    with pytest.raises(ExecutionError) as info:
        app.get("/job", {"data": "bad"})  # not an HTTP error: the app's own bug
    assert info.value.exc_type == "ValueError"
    assert "ValueError: boom: bad" in str(info.value)
    assert "tests/targets.py" in info.value.traceback and "boom" in info.value.traceback
    future = dummy(app).submit(b"later")
    assert isinstance(future.exception(), ExecutionError)
    assert len(dummy(app).jobs) == 2  # failed jobs are recorded too


def test_non_bytes_results_are_execution_errors(listener):
    app = make_app(listener[0], {"powerhose.target": "tests.targets:wrong_type"})
    with pytest.raises(ExecutionError) as info:
        dummy(app).execute(b"x")
    assert info.value.exc_type == "TypeError"
    assert "target returned int" in str(info.value)


def test_checks_jobs_like_the_real_client(listener):
    app = make_app(listener[0], {"powerhose.max_job_size": "4"})
    client = dummy(app)
    with pytest.raises(JobTooLargeError):
        client.execute(b"12345")
    with pytest.raises(TypeError):
        client.execute(b"x", headers={"n": 1})
    with pytest.raises(ValueError):
        client.execute(b"x", timeout=0)
    with pytest.raises(TypeError):
        client.execute(42)
    assert client.jobs == []


def test_service_without_a_target_is_no_worker(listener):
    app = make_app(listener[0])
    response = app.get("/job", {"service": "resize"}, status=503)  # the real error view
    assert response.json["error"] == "no-worker"
    client = dummy(app)
    with pytest.raises(NoWorkerError, match="no target for service 'resize'"):
        client.execute(b"x", service="resize")
    client.targets["resize"] = lambda job: b"resized " + job.data
    assert app.get("/job", {"service": "resize", "data": "img"}).body == b"resized img"
    assert client.jobs[-1].service == "resize"


def test_wins_over_the_real_plugin_whatever_the_order(listener):
    frontend, sock = listener
    before = live_children()
    after = make_app(frontend, includes=("pyramid_powerhose.testing", "pyramid_powerhose"))
    assert isinstance(dummy(after), DummyClient)
    via_ini = make_app(frontend, {"pyramid.includes": "pyramid_powerhose.testing"},
                       includes=("pyramid_powerhose",))
    assert isinstance(dummy(via_ini), DummyClient)
    assert via_ini.get("/job", {"data": "x"}).text.split()[0] == str(os.getpid())
    assert live_children() <= before
    assert connections(sock) == 0


def test_settings_are_still_checked(listener):
    from pyramid.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="powerhose.workers must be a whole number"):
        make_app(listener[0], {"powerhose.workers": "many"})


def test_view_unit_tests_with_pyramid_testing(listener):
    """The usual unit-test set-up: testing.setUp (autocommit) and a DummyRequest."""
    from pyramid import testing
    from pyramid.request import apply_request_extensions

    frontend, sock = listener
    config = testing.setUp(settings={
        "powerhose.frontend": frontend, "powerhose.backend": frontend + ".back",
        "powerhose.target": "tests.targets:echo"})
    try:
        config.include("pyramid_powerhose.testing")
        request = testing.DummyRequest()
        apply_request_extensions(request)
        assert request.powerhose.execute("unit") == b"unit"
        assert [job.data for job in request.powerhose.client.jobs] == [b"unit"]
    finally:
        testing.tearDown()
    assert connections(sock) == 0


def test_target_sees_the_params_as_in_a_worker(listener):
    from pyramid_powerhose import get_params

    before = get_params()
    app = make_app(listener[0], {"powerhose.target": "tests.targets:params",
                                 "powerhose.params.region": "eu",
                                 "powerhose.params.size": "2"})
    assert app.get("/job").body == b"region=eu|size=2"
    assert get_params() == before  # only during the job
