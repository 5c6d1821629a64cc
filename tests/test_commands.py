"""powerhose-broker and powerhose-worker as a user runs them."""

import os
import socket
import stat
import subprocess

import pytest

from pyramid_powerhose import Client, exc
from pyramid_powerhose import endpoints as endpoints_module
from pyramid_powerhose.settings import Settings
from tests.conftest import command, read_log, wait_for


def run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, **kwargs)


def test_second_broker_on_a_live_frontend_exits_1(start_broker, endpoints):
    first = start_broker()
    second = run(command("powerhose-broker") + [
        "--frontend", endpoints.frontend, "--backend", endpoints.backend])
    assert second.returncode == 1
    assert f"pid {first.pid}" in second.stderr and "already serves" in second.stderr
    assert first.poll() is None
    with Client(frontend=endpoints.frontend) as client:
        assert client.ping() == first.pid


def test_second_broker_on_a_live_tcp_frontend_exits_1(start_broker, run_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    frontend = f"tcp://127.0.0.1:{port}"
    start_broker(frontend=frontend)
    second = run(command("powerhose-broker") + [
        "--frontend", frontend, "--backend", f"ipc://{run_dir}/other.sock"])
    assert second.returncode == 1
    assert f"the frontend {frontend} is already in use" in second.stderr


def test_check_prints_the_pid_or_says_none(start_broker, endpoints):
    argv = command("powerhose-broker") + ["--frontend", endpoints.frontend, "--check"]
    none = run(argv)
    assert none.returncode == 1 and "no broker answers" in none.stdout
    broker = start_broker()
    found = run(argv)
    assert found.returncode == 0 and found.stdout.strip() == str(broker.pid)


def test_heartbeat_endpoint_of_the_original_is_accepted(start_broker):
    broker = start_broker("--heartbeat", "ipc:///tmp/heartbeat")
    assert broker.poll() is None


@pytest.mark.parametrize("args, message", [
    (["--heartbeat", "-1"], "--heartbeat must be a positive number of seconds"),
    (["--heartbeat", "often"], "--heartbeat must be a positive number of seconds"),
    (["--frontend", "nowhere"], "--frontend must be a ZeroMQ endpoint"),
    (["--max-job-size", "0"], "--max-job-size must be a positive"),
    (["--liveness", "0"], "--liveness must be at least 1"),
])
def test_bad_broker_settings_exit_2_with_a_message(args, message, endpoints):
    result = run(command("powerhose-broker") + ["--backend", endpoints.backend, *args])
    assert result.returncode == 2
    assert message in result.stderr


def test_bad_worker_params_exit_2(endpoints):
    result = run(command("powerhose-worker") + [
        "tests.targets:echo", "--backend", endpoints.backend, "--params", "novalue"])
    assert result.returncode == 2 and "key:value" in result.stderr


@pytest.mark.parametrize("args, added", [([], Settings.nice), (["--nice", "0"], 0),
                                         (["--nice", "11"], 11)])
def test_worker_lowers_its_priority_by_nice(start_broker, start_worker, wait_workers, client,
                                            args, added):
    start_broker()
    worker = start_worker("tests.targets:echo", *args)
    wait_workers(client, 1)
    assert client.execute(b"still serving") == b"still serving"
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, worker.pid) == min(19, ours + added)


@pytest.mark.parametrize("value", ["20", "-1"])
def test_bad_worker_nice_exits_2(endpoints, value):
    result = run(command("powerhose-worker") + [
        "tests.targets:echo", "--backend", endpoints.backend, "--nice", value])
    assert result.returncode == 2 and "nice must be 0 (keep the priority) to 19" in result.stderr


def test_unimportable_target_exits_1_naming_it(endpoints):
    result = run(command("powerhose-worker") + [
        "no_such_module.echo", "--backend", endpoints.backend])
    assert result.returncode == 1
    assert "cannot import 'no_such_module'" in result.stderr


def test_seed_target_form_resolved_from_the_current_directory(start_broker, procs, run_dir,
                                                              endpoints, client, wait_workers):
    workdir = os.path.join(run_dir, "app")
    os.mkdir(workdir)
    with open(os.path.join(workdir, "echo_worker.py"), "w") as f:
        f.write("def echo(job):\n    return job.data\n")
    start_broker()
    procs.start(command("powerhose-worker") + [
        "echo_worker.echo", "--backend", endpoints.backend], "seed-worker", cwd=workdir)
    wait_workers(client, 1)
    assert client.execute(b"seed") == b"seed"


def test_default_endpoints_live_in_a_private_directory(procs, run_dir, monkeypatch):
    runtime = os.path.join(run_dir, "xdg")
    os.mkdir(runtime, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    broker = procs.start(command("powerhose-broker"), "default-broker",
                         env={"XDG_RUNTIME_DIR": runtime})
    worker = procs.start(command("powerhose-worker") + ["tests.targets:echo"],
                         "default-worker", env={"XDG_RUNTIME_DIR": runtime})
    private = os.path.join(runtime, "powerhose")
    with Client() as client:
        assert client.frontend == f"ipc://{private}/frontend.sock"
        wait_for(lambda: client.ping(timeout=0.2) == broker.pid, what="broker")
        wait_for(lambda: client.has_service(), what="worker")
        assert client.execute(b"default") == b"default"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    assert worker.poll() is None, read_log(worker)


def test_default_directory_refused_when_others_can_enter(run_dir, monkeypatch):
    runtime = os.path.join(run_dir, "xdg")
    os.makedirs(os.path.join(runtime, "powerhose"))
    os.chmod(os.path.join(runtime, "powerhose"), 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    with pytest.raises(exc.UnsafeDirectoryError, match="chmod 700"):
        endpoints_module.runtime_dir()


def free_tcp_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_explicit_tcp_endpoints_ignore_a_squatted_default_directory(procs, run_dir,
                                                                   monkeypatch):
    """Another user's /tmp/powerhose-$UID (here: an open XDG dir) must not stop
    a broker, a worker and a client that were given their endpoints."""
    runtime = os.path.join(run_dir, "xdg")
    squatted = os.path.join(runtime, "powerhose")
    os.makedirs(squatted)
    os.chmod(squatted, 0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    frontend, backend = free_tcp_endpoint(), free_tcp_endpoint()
    env = {"XDG_RUNTIME_DIR": runtime}
    broker = procs.start(command("powerhose-broker") + [
        "--frontend", frontend, "--backend", backend], "broker", env=env)
    worker = procs.start(command("powerhose-worker") + [
        "tests.targets:echo", "--backend", backend], "worker", env=env)
    with Client(frontend=frontend) as client:
        wait_for(lambda: client.ping(timeout=0.2) == broker.pid, what="broker")
        wait_for(client.has_service, what="worker")
        assert client.execute(b"over tcp") == b"over tcp"
    assert worker.poll() is None, read_log(worker)
    assert os.listdir(squatted) == []  # nothing was made in it
