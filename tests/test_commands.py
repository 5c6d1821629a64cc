"""powerhose-broker, powerhose-worker and powerhose as a user runs them."""

import os
import shutil
import signal
import socket
import stat
import subprocess

import psutil
import pytest
from circus import config as circus_config

from pyramid_powerhose import Client, exc
from pyramid_powerhose import endpoints as endpoints_module
from pyramid_powerhose.settings import Settings
from tests.conftest import (REPO, all_gone, command, mentioning, read_log, wait_for,
                            worker_count)


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


# -- where the broker binds: powerhose-broker --print-endpoint ------------------------------

def env_without_xdg(tmpdir, **extra):
    """The environment of a root shell, a container or a CI job: no XDG_RUNTIME_DIR.

    TMPDIR moves the fallback directory (/tmp/powerhose-$UID) into ``tmpdir``.
    """
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    return dict(env, TMPDIR=tmpdir, **extra)


@pytest.mark.parametrize("xdg", [True, False], ids=["XDG_RUNTIME_DIR set", "unset"])
@pytest.mark.parametrize("name", ["frontend", "backend"])
def test_print_endpoint_resolves_the_default_as_the_broker_does(run_dir, xdg, name):
    """One line, the private default endpoint, and no broker started."""
    if xdg:
        runtime = os.path.join(run_dir, "xdg")
        os.mkdir(runtime, 0o700)
        env, private = dict(os.environ, XDG_RUNTIME_DIR=runtime), os.path.join(runtime, "powerhose")
    else:
        env, private = env_without_xdg(run_dir), os.path.join(run_dir, f"powerhose-{os.getuid()}")
    result = run(command("powerhose-broker") + ["--print-endpoint", name], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"ipc://{private}/{name}.sock"]
    assert os.listdir(private) == []  # nothing bound, nothing locked


def test_print_endpoint_of_an_explicit_endpoint_is_that_endpoint(run_dir):
    tcp = free_tcp_endpoint()
    result = run(command("powerhose-broker") + ["--frontend", tcp, "--print-endpoint",
                                                "frontend"], env=env_without_xdg(run_dir))
    assert result.returncode == 0 and result.stdout.splitlines() == [tcp]
    assert os.listdir(run_dir) == []  # the default directory was not even made



# -- a bad target: one line and exit 1 --------------------------------------------------------

BAD_TARGETS = {
    "not importable": "no_such_module:job",
    "no such function": "targets_here:nothing",
    "not callable": "targets_here:NUMBER",
    "raises on import": "raising_module:job",
}


@pytest.mark.parametrize("program", ["powerhose-worker", "powerhose"])
@pytest.mark.parametrize("target", BAD_TARGETS.values(), ids=BAD_TARGETS.keys())
def test_bad_target_says_one_line_and_exits_1(run_dir, endpoints, program, target):
    """As on a typo in a shell: a sentence on stderr, no traceback, nothing started."""
    with open(os.path.join(run_dir, "targets_here.py"), "w") as f:
        f.write("NUMBER = 1\n")
    with open(os.path.join(run_dir, "raising_module.py"), "w") as f:
        f.write("import json\njson.loads('{')\n")
    flags = ["--backend", endpoints.backend]
    if program == "powerhose":
        flags += ["--frontend", endpoints.frontend]
    result = run(command(program) + [target, *flags], cwd=run_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not os.path.exists(endpoints.backend[len("ipc://"):])  # no broker was started


# -- powerhose TARGET --print-circus-ini, run by a real circusd -----------------------------

def test_printed_circus_ini_runs_under_circusd(procs, run_dir, endpoints):
    """The file alone is enough: circusd runs the broker and the workers, jobs go
    through, and SIGTERM to circusd leaves nothing behind."""
    shutil.copy(os.path.join(REPO, "examples", "echo_worker.py"), run_dir)
    printed = run(command("powerhose") + [
        "echo_worker.echo", "--frontend", endpoints.frontend, "--backend", endpoints.backend,
        "--numprocesses", "2", "--heartbeat", "0.2", "--print-circus-ini"], cwd=run_dir)
    assert printed.returncode == 0, printed.stderr
    assert sorted(os.listdir(run_dir)) == ["echo_worker.py"]  # nothing started
    ini = os.path.join(run_dir, "circus.ini")
    with open(ini, "w") as f:
        f.write(printed.stdout)

    config = circus_config.get_config(ini)
    assert config["endpoint"].startswith(f"ipc://{run_dir}/")  # not circus's tcp default
    assert {w["name"]: (w["numprocesses"], w["copy_env"]) for w in config["watchers"]} == {
        "broker": (1, True), "workers": (2, True)}

    circusd = procs.start(command("circusd") + [ini], "circusd", cwd="/")
    with Client(frontend=endpoints.frontend, timeout=10) as client:
        wait_for(lambda: circusd.poll() is not None or (
                     client.ping(timeout=0.2) and worker_count(client) == 2),
                 timeout=60, what="circusd's broker and 2 workers")
        assert circusd.poll() is None, read_log(circusd)
        payloads = [b"circus-%d" % i for i in range(20)]
        assert client.map(payloads) == payloads
    processes = psutil.Process(circusd.pid).children(recursive=True)
    assert len(processes) == 3, [p.cmdline() for p in processes]

    circusd.send_signal(signal.SIGTERM)
    assert circusd.wait(60) == 0, read_log(circusd)
    wait_for(lambda: all_gone(processes), what="the broker and workers to exit")
    assert mentioning(run_dir) == []


def test_printed_circus_ini_for_a_tcp_frontend_keeps_circus_private(run_dir):
    """With no ipc frontend to sit beside, circus's sockets go to the private
    default directory, not to circus's default tcp://127.0.0.1:5555."""
    runtime = os.path.join(run_dir, "xdg")
    os.mkdir(runtime, 0o700)
    ini = os.path.join(run_dir, "circus.ini")
    with open(ini, "w") as f:
        printed = subprocess.run(command("powerhose") + [
            "tests.targets:echo", "--frontend", free_tcp_endpoint(), "--print-circus-ini"],
            stdout=f, stderr=subprocess.PIPE, text=True, timeout=30,
            env=dict(os.environ, XDG_RUNTIME_DIR=runtime))
    assert printed.returncode == 0, printed.stderr
    config = circus_config.get_config(ini)
    private = os.path.join(runtime, "powerhose")
    assert config["endpoint"].startswith(f"ipc://{private}/")
    assert config["pubsub_endpoint"].startswith(f"ipc://{private}/")
    assert config["endpoint"] != config["pubsub_endpoint"]


def test_circus_ini_refuses_what_circus_would_cut(endpoints):
    """circus's parser ends a value at ' ;' (a comment): such a setting cannot be
    written, and the command says so in one line rather than print a broken file."""
    result = run(command("powerhose") + [
        "tests.targets:echo", "--backend", endpoints.backend, "--frontend", endpoints.frontend,
        "--service", "one ;two", "--print-circus-ini"])
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_circus_ini_keeps_params_off_command_lines(endpoints, run_dir):
    """Params one by one would be on the workers' command lines: refused; a
    params file is passed by its path only."""
    base = command("powerhose") + ["tests.targets:echo", "--backend", endpoints.backend,
                                   "--frontend", endpoints.frontend, "--print-circus-ini"]
    refused = run(base + ["--params", "secret:s3cr3t"])
    assert refused.returncode == 1 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1
    path = os.path.join(run_dir, "params.json")
    with open(path, "w") as f:
        f.write('{"secret": "s3cr3t"}')
    printed = run(base + ["--params-file", path])
    assert printed.returncode == 0, printed.stderr
    assert path in printed.stdout and "s3cr3t" not in printed.stdout


@pytest.mark.parametrize("path", ["examples/circus.ini", "examples/cpp_worker/circus.ini",
                                  "demo_app/circus.ini"])
def test_shipped_circus_files_pass_the_environment_on(path, run_dir, monkeypatch):
    """Without copy_env circus starts commands with an empty environment: no PATH,
    so ``powerhose-broker`` is not found in a virtualenv (what circus reads, not the text)."""
    monkeypatch.setenv("POWERHOSE_DIR", run_dir)  # examples/cpp_worker/circus.ini's
    watchers = circus_config.get_config(os.path.join(REPO, path))["watchers"]
    assert watchers and all(w["copy_env"] or w.get("virtualenv") for w in watchers)
