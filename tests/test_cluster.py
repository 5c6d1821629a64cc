"""get_cluster: circus really runs the broker and workers, and nothing outlives the cluster."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import psutil
import pytest

from pyramid_powerhose import Client, exc, get_cluster
from pyramid_powerhose.watchers import broker_argv, worker_argv
from pyramid_powerhose.exc import ClusterError
from pyramid_powerhose.settings import Settings

from .conftest import REPO, alive, command, mentioning, read_log, wait_for

HEARTBEAT = 0.2


@pytest.fixture
def clusters(endpoints):
    """Makes background clusters on the test's private endpoints; stops them all."""
    made = []

    def make(target="tests.targets:echo", **options):
        options = {"frontend": endpoints.frontend, "backend": endpoints.backend,
                   "heartbeat": HEARTBEAT, "numprocesses": 2, "working_dir": REPO,
                   "background": True, **options}
        cluster = get_cluster(target, **options)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


def tree(pid):
    """A process and all its descendants (psutil objects survive pid reuse)."""
    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def kill(processes, run_dir):
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    shutil.rmtree(run_dir, ignore_errors=True)


def assert_gone(processes, timeout=15.0):
    wait_for(lambda: not [p for p in processes if alive(p)], timeout=timeout,
             what=f"processes {[p.pid for p in processes if alive(p)]} to exit")


def test_start_execute_stop_leaves_nothing(clusters, client):
    cluster = clusters()
    cluster.start()
    assert cluster.running
    assert client.execute(b"hello") == b"hello"

    pids = cluster.pids()
    assert client.ping() == pids["broker"][0]
    assert len(pids["workers"]) == 2
    processes = tree(pids["circus"])
    assert {p.pid for p in processes} >= {pids["circus"], *pids["broker"], *pids["workers"]}
    # Workers give way to the broker and the web threads; the broker keeps our priority.
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids["workers"]] == \
        [min(19, ours + Settings.nice)] * 2
    assert os.getpriority(os.PRIO_PROCESS, pids["broker"][0]) == ours
    run_dir = cluster.run_dir
    assert os.stat(run_dir).st_mode & 0o077 == 0  # private: circus's socket lives there

    cluster.stop()
    assert not cluster.running
    assert not [p for p in processes if alive(p)]  # stop() returns once all are gone
    assert not os.path.exists(run_dir)
    cluster.stop()  # idempotent
    with pytest.raises(exc.BrokerLostError):  # the client saw the broker go
        client.execute(b"nobody there", timeout=5)


def test_unimportable_target_fails_start_with_its_error(clusters, endpoints):
    cluster = clusters("tests.no_such_module:echo")
    with pytest.raises(ClusterError) as info:
        cluster.start(timeout=60)
    message = str(info.value)
    # Failed on the worker's exit, not on the 60 s timeout, and quotes its error.
    assert "exited while the cluster was starting" in message
    assert "No module named 'tests.no_such_module'" in message
    assert not cluster.running
    assert not mentioning(endpoints.dir, cluster.run_dir)  # no broker, worker or circus
    assert not os.path.exists(cluster.run_dir)


def test_scale_up_and_down_while_jobs_flow(clusters, client, wait_workers):
    cluster = clusters("tests.targets:sleep")
    cluster.start()
    done, failures, stop = [], [], threading.Event()

    def run_jobs():
        with Client(frontend=cluster.frontend, timeout=10.0) as c:
            while not stop.is_set():
                try:
                    c.execute(b"0.05")
                    done.append(1)
                except Exception as exc:  # every failure is a test failure
                    failures.append(repr(exc))

    threads = [threading.Thread(target=run_jobs) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(done) > 10, what="jobs flowing")
        started_with = cluster.settings
        cluster.scale(4)
        assert started_with.numprocesses == 2  # scale() replaces the settings
        wait_workers(client, 4, timeout=30)
        cluster.wait_ready(timeout=30)
        before = len(done)
        cluster.scale(1)
        wait_workers(client, 1, timeout=30)
        wait_for(lambda: len(cluster.pids()["workers"]) == 1, timeout=30,
                 what="circus to run one worker")
        wait_for(lambda: len(done) > before + 10, what="jobs flowing on one worker")
        cluster.scale(3)
        wait_workers(client, 3, timeout=30)
        before = len(done)
        wait_for(lambda: len(done) > before + 10, what="jobs flowing on three workers")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert cluster.settings.numprocesses == 3
    assert client.stats()["services"]["default"]["failed"] == 0


def test_circusctl_incr_workers(clusters, client, wait_workers):
    cluster = clusters()
    cluster.start()
    result = subprocess.run(command("circusctl") + ["--endpoint", cluster.endpoint,
                                                    "incr", "workers"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"
    wait_workers(client, 3, timeout=30)
    cluster.wait_ready(timeout=30)  # follows circus's count, not the one it started with
    assert len(cluster.pids()["workers"]) == 3


def test_params_reach_the_workers(clusters, client):
    cluster = clusters("tests.targets:params", worker_params={"color": "blue", "size": 3})
    cluster.start()
    assert client.execute(b"") == b"color=blue|size=3"


def test_seed_example_runs_as_written(run_dir, monkeypatch):
    # The seed's README, literally: default endpoints (here in a private
    # XDG_RUNTIME_DIR), the target importable from the working directory.
    runtime = os.path.join(run_dir, "xdg")
    os.mkdir(runtime, 0o700)
    workdir = os.path.join(run_dir, "app")
    os.mkdir(workdir)
    with open(os.path.join(workdir, "example.py"), "w") as f:
        f.write("def echo(job):\n    return job.data\n")
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    monkeypatch.chdir(workdir)

    cluster = get_cluster('example.echo', background=True)
    try:
        cluster.start()
        processes = tree(cluster.pids()["circus"])
        with Client() as client:
            assert client.execute(b"seed") == b"seed"
        assert cluster.frontend == f"ipc://{runtime}/powerhose/frontend.sock"
        assert len(cluster.pids()["workers"]) == 5
    finally:
        cluster.stop()
    assert not [p for p in processes if alive(p)]


def test_broker_and_workers_exit_when_circus_is_killed(clusters):
    cluster = clusters()
    cluster.start()
    pids = cluster.pids()
    processes = tree(pids["circus"])
    assert len(processes) == 1 + 1 + len(pids["workers"])
    os.kill(pids["circus"], signal.SIGKILL)
    wait_for(lambda: not cluster.running, what="circus to die")
    # Circus can no longer stop them: they notice their parent is gone.
    assert_gone(processes, timeout=15)
    cluster.stop()  # still harmless


OWNER = """
import json, sys, time
from pyramid_powerhose import get_cluster
cluster = get_cluster("tests.targets:echo", frontend=sys.argv[1], backend=sys.argv[2],
                      heartbeat=0.2, numprocesses=2, working_dir=sys.argv[3], background=True)
cluster.start()
print(json.dumps({"pids": cluster.pids(), "run_dir": cluster.run_dir}), flush=True)
if sys.argv[4] == "sleep":
    time.sleep(120)
"""


def start_owner(procs, endpoints, then):
    argv = [sys.executable, "-c", OWNER, endpoints.frontend, endpoints.backend, REPO, then]
    owner = procs.start(argv, "owner")

    def started():
        for line in read_log(owner).splitlines():
            if line.startswith("{"):
                return json.loads(line)
        assert owner.poll() is None, read_log(owner)
    info = wait_for(started, timeout=60, what="the owner's cluster")
    return owner, info


def test_cluster_dies_with_its_owner_even_by_sigkill(procs, endpoints, client):
    owner, info = start_owner(procs, endpoints, "sleep")
    processes = tree(info["pids"]["circus"])
    assert len(processes) >= 4  # circus, broker, two workers
    assert client.execute(b"alive") == b"alive"

    try:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        assert_gone(processes, timeout=20)
        wait_for(lambda: not os.path.exists(info["run_dir"]), timeout=10,
                 what="the cluster's temp dir to be removed")
    finally:
        kill(processes, info["run_dir"])  # only if the test failed


def test_interpreter_exit_stops_the_cluster(procs, endpoints):
    owner, info = start_owner(procs, endpoints, "exit")
    processes = tree(info["pids"]["circus"])
    try:
        assert owner.wait(60) == 0, read_log(owner)
        # atexit ran stop(): nothing was left to the supervisor's own watch.
        assert not [p for p in processes if alive(p)]
        assert not os.path.exists(info["run_dir"])
    finally:
        kill(processes, info["run_dir"])  # only if the test failed


def test_settings_map_onto_the_command_lines(endpoints):
    base = Settings(frontend=endpoints.frontend, backend=endpoints.backend, numprocesses=3,
                    grace=4.0, liveness=5, nice=9)
    cluster = get_cluster("tests.targets:echo", settings=base, timeout=7,
                          heartbeat="ipc:///tmp/heartbeat", worker_params="a:b|c:d",
                          max_age=30, max_age_delta=5, service="echo", debug=True)
    settings = cluster.settings
    assert (settings.numprocesses, settings.grace, settings.worker_timeout) == (3, 4.0, 7)
    assert settings.heartbeat == Settings.heartbeat  # an endpoint keeps the default
    assert settings.params == {"a": "b", "c": "d"}
    assert settings.working_dir == os.getcwd()
    assert base.numprocesses == 3 and base.params == {}  # the caller's copy is untouched

    worker = worker_argv(settings)
    assert worker[1:4] == ["-m", "pyramid_powerhose.cli.worker", "tests.targets:echo"]

    def option(argv, name):
        return argv[argv.index(name) + 1]

    assert option(worker, "--backend") == endpoints.backend
    assert option(worker, "--service") == "echo"
    assert option(worker, "--params") == "a:b|c:d"
    assert float(option(worker, "--timeout")) == 7
    assert float(option(worker, "--max-age")) == 30
    assert float(option(worker, "--max-age-delta")) == 5
    assert float(option(worker, "--heartbeat")) == Settings.heartbeat
    assert option(worker, "--liveness") == "5"
    assert option(worker, "--nice") == "9"
    assert option(broker_argv(settings), "--liveness") == "5"
    assert "--debug" in worker
    broker = broker_argv(settings)
    assert option(broker, "--frontend") == endpoints.frontend
    assert float(option(broker, "--grace")) == 4.0

    explicit = get_cluster("tests.targets:echo", settings=base, numprocesses=1)
    assert explicit.settings.numprocesses == 1
    with pytest.raises(ValueError):
        get_cluster("tests.targets:echo", settings=base, worker_params={"k": "a|b"})


def test_a_cluster_not_started_says_so(endpoints):
    cluster = get_cluster("tests.targets:echo", frontend=endpoints.frontend,
                          backend=endpoints.backend, working_dir=REPO)
    assert not cluster.running and "(stopped)" in repr(cluster)
    with pytest.raises(ClusterError, match="is not running"):
        cluster.pids()
    with pytest.raises(ClusterError, match="is not running"):
        cluster.scale(3)
    with pytest.raises(ClusterError, match="is not running"):
        cluster.wait_ready(timeout=0.1)
    assert cluster.settings.numprocesses == 5
    cluster.stop()  # nothing to stop


def test_the_default_endpoints_are_resolved_once_for_the_whole_cluster(run_dir, monkeypatch):
    # The broker, the workers and the readiness checks get explicit endpoints.
    runtime = os.path.join(run_dir, "xdg")
    os.mkdir(runtime, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    cluster = get_cluster("tests.targets:echo", working_dir=REPO)
    assert cluster.frontend == f"ipc://{runtime}/powerhose/frontend.sock"
    assert cluster.backend == f"ipc://{runtime}/powerhose/backend.sock"
    assert (cluster.settings.frontend, cluster.settings.backend) == \
        (cluster.frontend, cluster.backend)


def test_a_cluster_needs_a_target_and_a_working_dir(endpoints):
    with pytest.raises(exc.SettingsError, match="target is empty"):
        get_cluster("", frontend=endpoints.frontend, backend=endpoints.backend)
    with pytest.raises(exc.SettingsError, match="working_dir /nowhere is not a directory"):
        get_cluster("tests.targets:echo", frontend=endpoints.frontend,
                    backend=endpoints.backend, working_dir="/nowhere")
