"""The C++ worker (examples/cpp_worker) in real clusters.

It is built once with make, then run as a real process next to real
brokers, Python workers and circusd, and driven by the Python Client.
"""

import concurrent.futures
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import psutil
import pytest

from pyramid_powerhose import Client, exc
from tests.conftest import BIN, REPO, command, missing, read_log, wait_for

CPP_DIR = os.path.join(REPO, "examples", "cpp_worker")
PACKAGES = "g++ make pkg-config libzmq3-dev libssl-dev"
HEARTBEAT_MS = "200"  # the broker fixture's --heartbeat 0.2
LIVENESS = 0.6  # three heartbeats
MAX_ROUNDS = 1_000_000_000
HEX_DIGEST = re.compile(rb"[0-9a-f]{64}")


@pytest.fixture(scope="module")
def cpp_worker_binary():
    """build/cpp_worker, made once; in CI a failed build fails the tests."""
    try:
        build = subprocess.run(["make", "-C", CPP_DIR], capture_output=True, text=True,
                               timeout=300)
        built, output = build.returncode == 0, build.stdout + build.stderr
    except FileNotFoundError as error:
        built, output = False, str(error)
    if not built:
        message = (f"cannot build examples/cpp_worker; install its tools and libraries "
                   f"with: apt-get install {PACKAGES}\nmake said:\n{output}")
        missing(message)
    return os.path.join(CPP_DIR, "build", "cpp_worker")


@pytest.fixture
def start_cpp_worker(procs, endpoints, cpp_worker_binary):
    def start(*args, service="cpp"):
        argv = [cpp_worker_binary, "--backend", endpoints.backend, "--service", service,
                "--heartbeat-ms", HEARTBEAT_MS, *args]
        return procs.start(argv, "cpp-worker")
    return start


@pytest.fixture
def cpp_cluster(start_broker, start_cpp_worker, wait_workers, client):
    """A broker and one C++ worker serving 'cpp' (echo by default), ready."""
    broker = start_broker()
    worker = start_cpp_worker("--verbose")
    wait_workers(client, 1, service="cpp")
    return broker, worker


def iterated_sha256(seed, rounds):
    """What the sha256 job computes, by hashlib."""
    digest = seed
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex().encode()


def sha256_job(client, seed, rounds, **kwargs):
    headers = {"job": "sha256", "rounds": str(rounds), **kwargs.pop("headers", {})}
    return client.execute(seed, service="cpp", headers=headers, **kwargs)


def rounds_lasting(client, seconds):
    """Rounds the C++ worker needs for about ``seconds`` on this machine."""
    probe, took = 1_000_000, []
    for _ in range(2):  # the faster probe: the other may have shared the CPU
        started = time.monotonic()
        sha256_job(client, b"probe", probe, timeout=60)
        took.append(time.monotonic() - started)
    return min(int(probe * seconds / max(min(took), 0.001)), MAX_ROUNDS)


def service_stats(client, service):
    try:
        return client.stats(timeout=0.5)["services"].get(service, {})
    except exc.TimeoutError:
        return {}  # the broker is restarting


# -- jobs ---------------------------------------------------------------------


def test_echo_is_binary_safe(cpp_cluster, client):
    payloads = [b"hello", bytes(range(256)), b"", b"\0" * 3, os.urandom(1024 * 1024)]
    for data in payloads:
        assert client.execute(data, service="cpp") == data
    log = read_log(cpp_cluster[1])
    assert "(echo) done" in log and "1048576 bytes" in log


def test_the_worker_says_its_pid_and_host(cpp_cluster, client):
    _, worker = cpp_cluster
    wait_for(lambda: [w["pid"] for w in client.stats()["workers"]] == [worker.pid],
             what="the C++ worker's INFO in the broker's stats")
    assert [w["host"] for w in client.stats()["workers"]] == [socket.gethostname()]


def test_sha256_matches_hashlib(cpp_cluster, client):
    for seed, rounds in [(b"seed", 1), (b"", 2), (bytes(range(256)), 1000),
                         (b"\0powerhose\xff", 100_000)]:
        assert sha256_job(client, seed, rounds) == iterated_sha256(seed, rounds)


def test_headers_reach_the_worker(start_broker, start_cpp_worker, wait_workers, client):
    """`job` and `rounds` come from headers; other header pairs do not shift them."""
    start_broker()
    start_cpp_worker("--job", "sha256")
    wait_workers(client, 1, service="cpp")
    seed = b"headers"
    # No header: the worker's --job, one round.
    assert client.execute(seed, service="cpp") == iterated_sha256(seed, 1)
    headers = {"a": "1", "rounds": "3", "z": "", "clé": "été"}
    assert client.execute(seed, service="cpp", headers=headers) == iterated_sha256(seed, 3)
    assert client.execute(seed, service="cpp", headers={"job": "echo", "x": "y"}) == seed


def test_failing_job_raises_execution_error_with_the_cpp_text(cpp_cluster, client):
    with pytest.raises(exc.ExecutionError) as error:
        sha256_job(client, b"x", "many")
    assert "header 'rounds' must be a whole number from 1 to 1000000000, got 'many'" in str(
        error.value)
    assert error.value.exc_type == "std::invalid_argument"

    with pytest.raises(exc.ExecutionError) as error:
        client.execute(b"x", service="cpp", headers={"job": "nope"})
    assert "unknown job 'nope'" in str(error.value)
    assert error.value.exc_type == "jobs::JobError"

    assert client.execute(b"still serving", service="cpp") == b"still serving"


# -- heartbeats, deadlines, restarts ----------------------------------------------


def test_long_job_is_not_expired_by_the_broker(cpp_cluster, client):
    """A job of many heartbeat intervals: only the worker's heartbeats keep it."""
    rounds = rounds_lasting(client, 3.0)
    for _ in range(4):  # a noisy machine may make the calibration short
        started = time.monotonic()
        future = client.submit(b"long", service="cpp", timeout=60,
                               headers={"job": "sha256", "rounds": str(rounds)})
        wait_for(lambda: time.monotonic() - started > 2 * LIVENESS or future.done(),
                 what="the job to outlast two liveness periods")
        if not future.done():
            break
        future.result()  # WorkerLostError here: no heartbeats during the job
        rounds = min(rounds * 4, MAX_ROUNDS)
    else:
        pytest.fail("no job outlasted two liveness periods; cannot test heartbeats")
    stats = service_stats(client, "cpp")
    assert stats["workers"] == 1 and stats["busy"] == 1
    assert HEX_DIGEST.fullmatch(future.result(timeout=60))
    assert client.execute(b"after", service="cpp") == b"after"


def test_job_past_its_ttl_is_abandoned(cpp_cluster, client):
    """The client gives up after 0.5s; a billion rounds would take a minute or more."""
    with pytest.raises(exc.TimeoutError):
        sha256_job(client, b"forever", MAX_ROUNDS, timeout=0.5)
    assert client.execute(b"next", service="cpp", timeout=20) == b"next"
    assert "TimeoutError: jobs::JobTimeout: gave up after" in read_log(cpp_cluster[1])


def test_worker_registers_again_with_a_restarted_broker(cpp_cluster, start_broker, procs,
                                                        client, wait_workers):
    broker, worker = cpp_cluster
    assert client.execute(b"before", service="cpp") == b"before"
    procs.stop(broker, signal.SIGKILL)
    broker.wait(10)
    start_broker()
    wait_for(lambda: service_stats(client, "cpp").get("workers") == 1, timeout=20,
             what="the C++ worker to register with the new broker")
    assert client.execute(b"after", service="cpp") == b"after"
    assert worker.poll() is None, "the worker must reconnect, not exit"
    assert read_log(worker).count("READY sent") >= 2


def test_sigterm_finishes_the_job_then_exits_zero(cpp_cluster, start_cpp_worker, client,
                                                  wait_workers):
    _, worker = cpp_cluster
    rounds = rounds_lasting(client, 2.0)
    started = read_log(worker).count("started: sha256")
    future = client.submit(b"last", service="cpp", timeout=60,
                           headers={"job": "sha256", "rounds": str(rounds)})
    # The worker's log, not the broker's busy count: a job still on the wire
    # when SIGTERM lands is requeued by the DISCONNECT (PROTOCOL.rst), and
    # with no other worker it would end as NoWorkerError.
    wait_for(lambda: read_log(worker).count("started: sha256") > started,
             what="the job to start")
    worker.send_signal(signal.SIGTERM)
    assert HEX_DIGEST.fullmatch(future.result(timeout=60))
    assert worker.wait(20) == 0
    assert "stopping on signal after 3 jobs" in read_log(worker)  # probes and this one
    wait_workers(client, 0, service="cpp")

    idle = start_cpp_worker()
    wait_workers(client, 1, service="cpp")
    idle.send_signal(signal.SIGINT)
    assert idle.wait(20) == 0


# -- with Python workers -----------------------------------------------------------


def test_python_and_cpp_workers_serve_together(start_broker, start_worker, start_cpp_worker,
                                               wait_workers, client):
    """'echo': two Python workers and a C++ one; 'sha256': a C++ worker."""
    start_broker()
    python_workers = [start_worker("tests.targets:echo", service="echo") for _ in range(2)]
    cpp_echo = start_cpp_worker("--verbose", service="echo")
    start_cpp_worker("--job", "sha256", service="sha256")
    wait_workers(client, 3, service="echo")
    wait_workers(client, 1, service="sha256")

    seeds = [b"seed-%d" % i for i in range(40)]
    payloads = [os.urandom(i * 997) for i in range(60)]
    with concurrent.futures.ThreadPoolExecutor(1) as background:
        hashes = background.submit(client.map, seeds, headers={"rounds": "500"},
                                   service="sha256")
        assert client.map(payloads, service="echo") == payloads
        assert hashes.result(timeout=60) == [iterated_sha256(seed, 500) for seed in seeds]

    cpp_share = read_log(cpp_echo).count("(echo) done")
    assert 0 < cpp_share < len(payloads), "both kinds of worker should have served 'echo'"
    assert all(w.poll() is None for w in python_workers)


def test_circus_ini_runs_both_services(procs, run_dir, cpp_worker_binary):
    """examples/cpp_worker/circus.ini under a real circusd, then stopped cleanly."""
    ini = shutil.copy(os.path.join(CPP_DIR, "circus.ini"), run_dir)
    env = {"POWERHOSE_DIR": run_dir, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    circusd = procs.start(command("circusd") + [ini], "circusd", env=env)

    with Client(frontend=f"ipc://{run_dir}/front.sock", timeout=10) as client:
        wait_for(lambda: (service_stats(client, "echo").get("workers") == 3
                          and service_stats(client, "sha256").get("workers") == 2),
                 timeout=60, what="3 echo and 2 sha256 workers under circusd")
        payloads = [b"circus-%d" % i for i in range(30)]
        assert client.map(payloads, service="echo") == payloads
        assert client.execute(b"seed", service="sha256", headers={"rounds": "7"}) == \
            iterated_sha256(b"seed", 7)

    children = psutil.Process(circusd.pid).children(recursive=True)
    assert len(children) == 6, [c.cmdline() for c in children]
    circusd.send_signal(signal.SIGTERM)
    assert circusd.wait(60) == 0, read_log(circusd)
    wait_for(lambda: not any(c.is_running() for c in children), timeout=10,
             what="every process of the circus cluster to exit")


# -- the default endpoints, as the README runs it -------------------------------------------

def test_worker_finds_a_default_broker_with_print_endpoint(procs, run_dir, cpp_worker_binary,
                                                           monkeypatch):
    """``cpp_worker --backend "$(powerhose-broker --print-endpoint backend)"`` with
    XDG_RUNTIME_DIR unset (root, a container, CI): the shell command reaches the
    broker's default backend, wherever the default directory fell back to."""
    tempfile.gettempdir()  # cached before TMPDIR changes: this process keeps its own
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", run_dir)  # the fallback /tmp/powerhose-$UID, made private
    monkeypatch.setenv("PATH", BIN + os.pathsep + os.environ.get("PATH", ""))
    broker = procs.start(command("powerhose-broker") + ["--heartbeat", "0.2"], "default-broker")
    procs.start(["sh", "-c", 'exec "$0" --backend "$(powerhose-broker --print-endpoint backend)"'
                 ' --service cpp --heartbeat-ms ' + HEARTBEAT_MS, cpp_worker_binary],
                "cpp-worker")
    printed = subprocess.run(["sh", "-c", "powerhose-broker --print-endpoint frontend"],
                             capture_output=True, text=True, timeout=30)
    frontend = printed.stdout.strip()
    assert frontend == f"ipc://{run_dir}/powerhose-{os.getuid()}/frontend.sock"
    with Client(frontend=frontend, timeout=10) as client:
        wait_for(lambda: client.ping(timeout=0.2) == broker.pid, what="the default broker")
        wait_for(lambda: service_stats(client, "cpp").get("workers") == 1,
                 what="the C++ worker on the printed backend")
        assert client.execute(b"found it", service="cpp") == b"found it"


def test_the_cpp_worker_speaks_curve_to_a_broker_that_requires_it(procs, run_dir,
                                                                   cpp_worker_binary):
    """--curve-secret and --curve-broker: an allowed C++ worker serves jobs over
    CURVE; one whose key is not allowed is never registered."""
    import socket

    import zmq.auth

    keys = os.path.join(run_dir, "keys")
    allowed = os.path.join(run_dir, "allowed")
    os.mkdir(keys)
    os.mkdir(allowed)
    files = {name: zmq.auth.create_certificates(keys, name)
             for name in ("broker", "client", "cpp", "rogue")}
    for name in ("client", "cpp"):
        os.link(files[name][0], os.path.join(allowed, f"{name}.key"))
    for _, secret in files.values():
        os.chmod(secret, 0o600)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    frontend, backend = (f"tcp://127.0.0.1:{port}" for port in ports)
    broker = procs.start(command("powerhose-broker") + [
        "--frontend", frontend, "--backend", backend, "--heartbeat", "0.2",
        "--curve-secret", files["broker"][1], "--curve-allow", allowed], "broker")
    for name, service in (("cpp", "cpp"), ("rogue", "rogue")):
        procs.start([cpp_worker_binary, "--backend", backend, "--service", service,
                     "--heartbeat-ms", HEARTBEAT_MS, "--curve-secret", files[name][1],
                     "--curve-broker", files["broker"][0]], f"cpp-{name}")
    with Client(frontend=frontend, curve_secret=files["client"][1],
                curve_broker=files["broker"][0], timeout=5) as client:
        wait_for(lambda: client.ping(timeout=0.5) == broker.pid, what="the broker")
        wait_for(lambda: "cpp" in client.stats()["services"], what="the C++ worker")
        assert client.execute(b"over curve", service="cpp") == b"over curve"
        time.sleep(0.5)
        assert "rogue" not in client.stats()["services"]
