"""Several hosts on one machine: each its own circusd, run directory and
loopback address, talking tcp with CURVE.

* two broker hosts, 127.0.0.2 and 127.0.0.7: a broker each, CURVE required,
  one allow-list;
* two worker hosts, 127.0.0.3 and 127.0.0.4: the demo's workers and a
  ``sleep`` worker each, connecting from their own address to both brokers;
* a web host, 127.0.0.5: pserve running the demo, attached to both brokers.

Checked: the demo end to end; the workers' connections come from their
hosts' addresses; a rogue worker (a key not allowed) gets nothing; a client
with no key is refused; a worker host killed whole fails its jobs fast while
the other serves; a broker killed fails its jobs in flight fast, the web
carries on through the other at once, and once circusd restarts it, it is
used again.  Nothing touches an address outside 127.0.0.0/8, and nothing is
left running.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import psutil
import pytest
import zmq.auth

from demo_app import assertion
from pyramid_powerhose import Client, exc
from tests.conftest import REPO, alive, command, wait_for
from tests.functional.test_pserve import check_token, family, http

BROKER_HOSTS, WORKER_HOSTS = ("127.0.0.2", "127.0.0.7"), ("127.0.0.3", "127.0.0.4")
WEB_HOST, ROGUE_HOST = "127.0.0.5", "127.0.0.6"
BROKER_HOST = BROKER_HOSTS[0]
STARTUP = 90.0


def free_port(host):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Hosts:
    """The hosts' circusd processes, keys and endpoints."""

    def __init__(self, root):
        self.root = root
        self.circusd = {}
        self.keys = os.path.join(root, "keys")
        self.allowed = os.path.join(root, "allowed")
        os.mkdir(self.keys)
        os.mkdir(self.allowed)
        for name in ("broker", "web", "workers3", "workers4", "rogue"):
            _, secret = zmq.auth.create_certificates(self.keys, name)
            os.chmod(secret, 0o600)
        for name in ("web", "workers3", "workers4"):
            os.link(self.key(name), os.path.join(self.allowed, f"{name}.key"))
        ports = [(free_port(host), free_port(host)) for host in BROKER_HOSTS]
        self.frontends = [f"tcp://{host}:{f}" for host, (f, _) in zip(BROKER_HOSTS, ports)]
        self.backends = [f"tcp://{host}:{b}" for host, (_, b) in zip(BROKER_HOSTS, ports)]
        self.back_ports = {b for _, b in ports}
        self.frontend, self.backend = self.frontends[0], self.backends[0]
        self.http_port = free_port(WEB_HOST)

    def key(self, name, secret=False):
        return os.path.join(self.keys, f"{name}.key" + ("_secret" if secret else ""))

    def from_host(self, host, endpoint):
        """``endpoint``, connected to from ``host``'s address (libzmq's source syntax)."""
        return f"tcp://{host}:0;{endpoint[len('tcp://'):]}"

    def curve_client(self, name):
        return ["--curve-secret", self.key(name, True), "--curve-broker", self.key("broker")]

    def start(self, host, watchers):
        """A circusd for ``host``: its own run directory and control sockets."""
        run = os.path.join(self.root, host)
        os.mkdir(run)
        lines = ["[circus]", f"endpoint = ipc://{run}/circus.sock",
                 f"pubsub_endpoint = ipc://{run}/circus-pub.sock", "multicast_endpoint =",
                 "statsd = false", "check_delay = 5"]
        for name, (cmd, args, count) in watchers.items():
            lines += ["", f"[watcher:{name}]", f"cmd = {command(cmd)[0]}",
                      "args = " + " ".join(args), f"numprocesses = {count}",
                      f"working_dir = {REPO}", "copy_env = true", "graceful_timeout = 5",
                      "stdout_stream.class = FileStream",
                      f"stdout_stream.filename = {run}/{name}.log",
                      "stderr_stream.class = FileStream",
                      f"stderr_stream.filename = {run}/{name}.log"]
        path = os.path.join(run, "circus.ini")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        log = open(os.path.join(run, "circusd.log"), "wb")
        self.circusd[host] = subprocess.Popen(
            command("circusd") + [path], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO), start_new_session=True)
        log.close()

    def start_worker_host(self, host, key):
        backs = [arg for back in self.backends
                 for arg in ("--backend", f"'{self.from_host(host, back)}'")]
        common = ["--heartbeat", "0.2", *backs, *self.curve_client(key)]
        self.start(host, {
            "demo": ("powerhose-worker", ["demo_app.jobs:issue_token", "--params-file",
                                          "demo_app/params.json", *common], 1),
            "sleep": ("powerhose-worker", ["tests.targets:sleep", "--service", "sleep",
                                           *common], 1),
        })

    def log(self, host, name):
        try:
            with open(os.path.join(self.root, host, f"{name}.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def kill(self, host):
        """The host, whole: circusd and everything it runs, at once."""
        for process in family(self.circusd[host].pid):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.circusd[host].wait(10)

    def close(self):
        for host, proc in self.circusd.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for host in list(self.circusd):
            try:
                self.circusd[host].wait(20)
            except subprocess.TimeoutExpired:
                pass
            self.kill(host)


@pytest.fixture(scope="module")
def hosts():
    root = tempfile.mkdtemp(prefix="ph-hosts-", dir="/tmp")
    os.chmod(root, 0o700)
    h = Hosts(root)
    everyone = []
    try:
        for host, front, back in zip(BROKER_HOSTS, h.frontends, h.backends):
            h.start(host, {"broker": ("powerhose-broker", [
                "--frontend", front, "--backend", back, "--heartbeat", "0.2",
                "--curve-secret", h.key("broker", True), "--curve-allow", h.allowed], 1)})
        for host, key in zip(WORKER_HOSTS, ("workers3", "workers4")):
            h.start_worker_host(host, key)
        ini = os.path.join(root, "web.ini")
        with open(os.path.join(REPO, "demo_app", "production.ini")) as f:
            text = f.read()
        text = text.replace("host = 127.0.0.1", f"host = {WEB_HOST}").replace(
            "powerhose.timeout = 5", "\n".join([
                "powerhose.timeout = 5",
                f"powerhose.curve_secret = {h.key('web', True)}",
                f"powerhose.curve_broker = {h.key('broker')}"]))
        with open(ini, "w") as f:
            f.write(text)
        web_front = " ".join(h.from_host(WEB_HOST, front) for front in h.frontends)
        h.start(WEB_HOST, {"web": ("pserve", [ini, f"http_port={h.http_port}",
                                              f"'frontend={web_front}'"], 1)})
        with h.client("web") as client:
            wait_for(lambda: _all_brokers(client) == {"default": 2, "sleep": 2},
                     timeout=STARTUP, what="four workers from two hosts on both brokers")
        h.url = f"http://{WEB_HOST}:{h.http_port}"
        wait_for(lambda: _status(h.url + "/__heartbeat__") == 200, timeout=STARTUP,
                 what="the web host")
        for proc in h.circusd.values():
            everyone += family(proc.pid)
        yield h
    finally:
        h.close()
        wait_for(lambda: not any(alive(p) for p in everyone), timeout=30,
                 what="every host's processes gone")
        shutil.rmtree(root, ignore_errors=True)


def _client(self, name, **kwargs):
    keys = {} if name is None else {"curve_secret": self.key(name, True),
                                    "curve_broker": self.key("broker")}
    return Client(frontend=self.frontends, timeout=kwargs.pop("timeout", 5), **keys)


Hosts.client = _client


def _workers(client):
    try:
        return {name: svc["workers"] for name, svc in client.stats(timeout=1)["services"].items()
                if svc["workers"]}
    except exc.PowerhoseError:
        return None


def _all_brokers(client):
    """Workers by service, if every broker counts the same; else None."""
    seen = [{name: svc["workers"] for name, svc in stats["services"].items() if svc["workers"]}
            if stats else None for stats in client.broker_stats(timeout=1).values()]
    return seen[0] if seen and all(s == seen[0] for s in seen) else None


def _busy(client, service, everywhere=False):
    """The most workers of ``service`` any broker counts busy (``everywhere``:
    the fewest, 0 if a broker does not answer)."""
    counts = [stats["services"].get(service, {}).get("busy", 0) if stats else 0
              for stats in client.broker_stats(timeout=1).values()]
    if everywhere:
        return min(counts, default=0)
    return max(counts, default=0)


def _status(url):
    try:
        return http(url)[0]
    except OSError:
        return None


def token_request(h, email="carol@example.com"):
    return http(h.url + "/token", json.dumps({"assertion": assertion.mint(email)}).encode())


def test_the_demo_end_to_end_across_hosts(hosts):
    status, body = token_request(hosts)
    assert status == 200, body
    check_token(body, "carol@example.com")
    # Each worker talks to the broker from its own host's address.
    seen = set()
    for host in WORKER_HOSTS:
        for process in family(hosts.circusd[host].pid)[1:]:
            for conn in process.net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port in hosts.back_ports:
                    assert conn.raddr.ip in BROKER_HOSTS
                    seen.add((conn.laddr.ip, conn.raddr.ip))
    assert seen == {(w, b) for w in WORKER_HOSTS for b in BROKER_HOSTS}


def test_a_rogue_worker_gets_nothing(hosts, run_dir):
    rogue = subprocess.Popen(command("powerhose-worker") + [
        "tests.targets:echo", "--backend", hosts.from_host(ROGUE_HOST, hosts.backend),
        "--curve-secret", hosts.key("rogue", True), "--curve-broker", hosts.key("broker")],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        with hosts.client("web") as client:
            assert _all_brokers(client) == {"default": 2, "sleep": 2}
        assert token_request(hosts)[0] == 200
        # The broker logged the refusal with the rogue's address and key.
        rogue_key = zmq.auth.load_certificate(hosts.key("rogue"))[0].decode()
        assert any(ROGUE_HOST in line and rogue_key in line
                   for line in hosts.log(BROKER_HOST, "broker").splitlines())
    finally:
        os.killpg(rogue.pid, signal.SIGKILL)
        rogue.wait(10)


def test_a_client_without_a_key_is_refused(hosts):
    with hosts.client(None, timeout=20) as client:
        started = time.monotonic()
        with pytest.raises(exc.BrokerLostError):
            client.execute(b"0", service="sleep")
        assert time.monotonic() - started < 10


def test_a_worker_host_killed_whole_fails_its_jobs_fast_and_the_other_serves(hosts):
    results = {}
    with hosts.client("web", timeout=30) as client:
        def run(i):
            try:
                results[i] = client.execute(b"3", service="sleep")
            except exc.PowerhoseError as error:
                results[i] = error
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        # One job, then the other once both brokers count the first one's
        # worker busy (its PAUSE arrived): started together, both brokers
        # could pick the same idle worker, which runs them in turn
        # (PROTOCOL.rst, "Several brokers: PAUSE and RESUME").
        threads[0].start()
        wait_for(lambda: _busy(client, "sleep", everywhere=True) == 1, what="a job running")
        threads[1].start()
        wait_for(lambda: _busy(client, "sleep") == 2, what="a job on each worker host")
        killed_at = time.monotonic()
        hosts.kill(WORKER_HOSTS[0])
        for thread in threads:
            thread.join(30)
        lost = [r for r in results.values() if isinstance(r, exc.WorkerLostError)]
        assert len(lost) == 1 and time.monotonic() - killed_at < 6  # the other ran its 3 s
        assert sum(isinstance(r, bytes) for r in results.values()) == 1
        # The surviving host serves everything now.
        wait_for(lambda: _all_brokers(client) == {"default": 1, "sleep": 1}, timeout=10,
                 what="the dead host's workers forgotten by both brokers")
        for i in range(3):
            status, body = token_request(hosts, f"u{i}@example.com")
            assert status == 200, body


def test_a_broker_killed_fails_its_jobs_fast_and_the_other_carries_on(hosts):
    with hosts.client("web", timeout=30) as client:
        broker = hosts.circusd[BROKER_HOSTS[0]]
        (broker_pid,) = [p.pid for p in family(broker.pid)[1:]]
        outcomes = []

        def run():
            started = time.monotonic()
            try:
                client.execute(b"3", service="sleep")
                outcomes.append(("ok", time.monotonic() - started))
            except exc.PowerhoseError as error:
                outcomes.append((type(error).__name__, time.monotonic() - started))

        # One worker host is left (the test before killed the other).
        threads = [threading.Thread(target=run)]
        for thread in threads:
            thread.start()
        wait_for(lambda: _busy(client, "sleep") == 1, what="a job running")
        killed_at = time.monotonic()
        os.kill(broker_pid, signal.SIGKILL)
        # The web carries on through the other broker at once.
        status, body = token_request(hosts)
        assert status == 200 and time.monotonic() - killed_at < 3, body
        for thread in threads:
            thread.join(30)
        # The job failed fast if it was on the killed broker, or ran on the other.
        kinds = sorted(kind for kind, _ in outcomes)
        assert all(kind in ("ok", "BrokerLostError") for kind in kinds)
        assert all(took < 3 for kind, took in outcomes if kind == "BrokerLostError")
        # circusd restarts it on the same endpoints, and it is used again.
        wait_for(lambda: (client.broker_stats(timeout=0.5)[hosts.frontends[0]] or {}).get(
            "pid") not in (None, broker_pid), timeout=STARTUP, what="a new broker")
        wait_for(lambda: _all_brokers(client) == {"default": 1, "sleep": 1}, timeout=STARTUP,
                 what="the workers registered with it again")
        before = client.broker_stats()[hosts.frontends[0]]["services"]["default"]["done"]
        for i in range(6):
            status, body = token_request(hosts, f"v{i}@example.com")
            assert status == 200, body
        wait_for(lambda: client.broker_stats()[hosts.frontends[0]]["services"]["default"][
            "done"] > before, what="the restarted broker used again")
