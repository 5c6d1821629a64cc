"""Shared fixtures: private endpoints, real broker and worker processes.

Every process is started in its own session (process group) and killed
with its group at teardown; every temp dir is removed.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from pyramid_powerhose import Client

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def command(name):
    """The installed console script, from this interpreter's environment."""
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} is not installed next to {sys.executable}: "
                           "run pip install -e '.[test]'")
    return [path]


def missing(message):
    """A prerequisite the README's set-up provides is missing: a failure in
    CI, where a skipped test would hide it; a skip on a developer's machine."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Processes:
    """Starts processes in their own groups; kills every group at the end."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.procs = []

    def start(self, argv, name, env=None, cwd=REPO):
        log_path = os.path.join(self.run_dir, f"{name}-{len(self.procs)}.log")
        log = open(log_path, "wb")
        full_env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env=full_env, start_new_session=True)
        log.close()
        proc.log_path = log_path
        self.procs.append(proc)
        return proc

    def stop(self, proc, sig=signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def cleanup(self):
        for proc in self.procs:
            self.stop(proc)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def alive(process) -> bool:
    """Running and not a zombie (this VM's init reaps orphans late)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def all_gone(processes) -> bool:
    return not any(alive(process) for process in processes)


def mentioning(*needles):
    """Live processes whose command line mentions one of ``needles`` (private paths)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(needle in cmdline for needle in needles) and alive(process):
            found.append(process)
    return found


def live_children():
    """Pids of this process's live descendants."""
    return {proc.pid for proc in psutil.Process().children(recursive=True) if alive(proc)}


def read_log(proc):
    with open(proc.log_path, errors="replace") as f:
        return f.read()


@pytest.fixture
def run_dir():
    # Short paths: ipc socket paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="ph-", dir="/tmp")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def endpoints(run_dir):
    class Endpoints:
        dir = run_dir
        frontend = f"ipc://{run_dir}/front.sock"
        backend = f"ipc://{run_dir}/back.sock"
    return Endpoints


@pytest.fixture
def procs(run_dir):
    processes = Processes(run_dir)
    yield processes
    processes.cleanup()


HEARTBEAT = "0.2"  # short heartbeats keep failure tests fast


@pytest.fixture
def start_broker(procs, endpoints):
    def start(*args, frontend=None, backend=None, wait=True):
        argv = command("powerhose-broker") + [
            "--frontend", frontend or endpoints.frontend,
            "--backend", backend or endpoints.backend,
            "--heartbeat", HEARTBEAT, *args]
        proc = procs.start(argv, "broker")
        if wait:
            with Client(frontend=frontend or endpoints.frontend) as probe:
                wait_for(lambda: probe.ping(timeout=0.2) == proc.pid or proc.poll() is not None,
                         what="broker ping")
            assert proc.poll() is None, read_log(proc)
        return proc
    return start


# Modules whose tests (those that start workers with the fixtures) run on
# both paths by default: dispatch, failures and the client.  The others run
# on the direct path, the default on ipc, unless --path says otherwise.
BOTH_PATHS = {"test_jobs", "test_failures", "test_broker_lost", "test_watchdog",
              "test_max_memory", "test_limits"}


def pytest_addoption(parser):
    parser.addoption(
        "--path", choices=("direct", "relayed"), default=None,
        help="the path jobs take between the fixtures' clients and workers in every "
        "test: direct (the default on ipc) or relayed through the broker (workers "
        "--no-direct); without it, the modules of conftest.BOTH_PATHS run on both")


def pytest_generate_tests(metafunc):
    if "job_path" not in metafunc.fixturenames:
        return
    chosen = metafunc.config.getoption("--path")
    module = metafunc.module.__name__.rpartition(".")[2]
    pinned = getattr(metafunc.module, "JOB_PATH", None)  # the module tests that path
    if pinned:
        paths = [pinned]
    elif chosen:
        paths = [chosen]
    elif module in BOTH_PATHS:
        paths = ["direct", "relayed"]
    else:
        paths = ["direct"]
    metafunc.parametrize("job_path", paths, ids=paths if len(paths) > 1 else None,
                         scope="session")


@pytest.fixture
def start_worker(procs, endpoints, job_path):
    def start(target="tests.targets:echo", *args, service="default", backend=None):
        argv = command("powerhose-worker") + [
            target, "--backend", backend or endpoints.backend, "--heartbeat", HEARTBEAT,
            "--service", service, *args]
        if job_path == "relayed":
            argv.append("--no-direct")  # never leased: every job crosses the broker
        return procs.start(argv, "worker")
    return start


def worker_count(client, service="default"):
    stats = client.stats(timeout=0.5)
    return stats["services"].get(service, {}).get("workers", 0)


def wait_busy(client, count=1, service="default"):
    """Until ``count`` workers of ``service`` run a job (the broker's stats say so)."""
    wait_for(lambda: client.stats()["services"][service]["busy"] == count,
             what=f"{count} busy workers for {service!r}")


@pytest.fixture
def wait_workers():
    def wait(client, count, service="default", timeout=10.0):
        wait_for(lambda: worker_count(client, service) == count, timeout=timeout,
                 what=f"{count} workers for {service!r}")
    return wait


@pytest.fixture
def client(endpoints):
    with Client(frontend=endpoints.frontend, timeout=5.0) as c:
        yield c


@pytest.fixture
def cluster(start_broker, start_worker, wait_workers, client):
    """A broker and two echo workers, ready."""
    broker = start_broker()
    workers = [start_worker() for _ in range(2)]
    wait_workers(client, 2)
    return broker, workers
