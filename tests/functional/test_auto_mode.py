"""Whole servers: waitress processes that spawn, share and lose a cluster.

Each server is a real process building the app with ``cluster = auto`` (or
``spawn``) on the test's private endpoints and serving it on a free port
of 127.0.0.1; jobs go over real HTTP and the cluster is a real circus.
"""

import os
import re
import signal
import socket
import sys
import time
import urllib.request

import psutil

from pyramid_powerhose.watchers import OWNER_GONE_GRACE
from ..conftest import REPO, all_gone, read_log, wait_for

SERVER = r"""
import logging, sys
from pyramid.config import Configurator
from pyramid.response import Response
from waitress import create_server

logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(process)d %(name)s: %(message)s")
mode, frontend, backend, repo = sys.argv[1:5]


def job(request):
    return Response(body=request.powerhose.execute(request.params.get("data", "")))


def ping(request):
    return Response(str(request.powerhose.client.ping(timeout=5.0)))


config = Configurator(settings={
    "powerhose.cluster": mode, "powerhose.target": "tests.targets:echo",
    "powerhose.frontend": frontend, "powerhose.backend": backend,
    "powerhose.heartbeat": "0.2", "powerhose.workers": "2",
    "powerhose.working_dir": repo, "powerhose.timeout": "10"})
config.include("pyramid_powerhose")
config.add_route("job", "/job")
config.add_view(job, route_name="job")
config.add_route("ping", "/ping")
config.add_view(ping, route_name="ping")
app = config.make_wsgi_app()
server = create_server(app, host="127.0.0.1", port=0)
print("SERVING", server.effective_port, flush=True)
server.run()  # returns on SIGINT (KeyboardInterrupt); then atexit runs
print("SERVER EXITED", flush=True)
"""

START_TIMEOUT = 60.0  # three interpreters and a cluster on a loaded 2-core VM
GONE_TIMEOUT = 20.0  # "a few seconds", with a wide margin


def start_server(procs, endpoints, mode="auto"):
    argv = [sys.executable, "-c", SERVER, mode, endpoints.frontend, endpoints.backend, REPO]
    return procs.start(argv, "server")


def port_of(server):
    def serving():
        if server.poll() is not None:
            raise AssertionError(f"server exited {server.returncode}:\n{read_log(server)}")
        match = re.search(r"^SERVING (\d+)$", read_log(server), re.M)
        return match and int(match.group(1))
    return wait_for(serving, timeout=START_TIMEOUT, interval=0.1, what="the server to serve")


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.read()


def descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def brokers(procs_list, run_dir):
    """The broker processes among these, on this test's endpoints."""
    found = []
    for proc in procs_list:
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if ("powerhose-broker" in cmdline or "pyramid_powerhose.cli.broker" in cmdline) \
                and run_dir in cmdline:
            found.append(proc)
    return found


def test_three_servers_share_one_broker_and_it_outlives_its_spawner(procs, endpoints):
    servers = [start_server(procs, endpoints) for _ in range(3)]
    ports = [port_of(server) for server in servers]

    pids = {int(get(port, "/ping")) for port in ports}
    assert len(pids) == 1, pids  # every app talks to the same broker
    broker_pid = pids.pop()
    every_process = brokers(psutil.process_iter(), endpoints.dir)
    assert [p.pid for p in every_process] == [broker_pid]  # exactly one, system-wide

    spawners = [s for s in servers
                if broker_pid in {p.pid for p in descendants(s.pid)}]
    assert len(spawners) == 1
    spawner = spawners[0]
    # The lock, not the broker's refusal to start twice, decided: only one
    # server ever started a cluster; the others waited, then attached.
    for server in servers:
        log = read_log(server)
        if server is spawner:
            assert "starting a powerhose cluster" in log
        else:
            assert "starting a powerhose cluster" not in log, log
            assert f"attaching to the powerhose broker (pid {broker_pid})" in log
            assert descendants(server.pid) == []
    for i, port in enumerate(ports):
        assert get(port, f"/job?data=hello{i}") == f"hello{i}".encode()

    cluster = descendants(spawner.pid)
    assert len(cluster) >= 4  # supervisor, broker, 2 workers
    os.kill(spawner.pid, signal.SIGKILL)
    spawner.wait(5)
    # The others still use it, past the supervisor's grace for a dead owner.
    time.sleep(OWNER_GONE_GRACE + 0.5)
    for i, port in enumerate(ports):
        if servers[i] is not spawner:
            assert int(get(port, "/ping")) == broker_pid
            assert get(port, f"/job?data=after{i}") == f"after{i}".encode()
    for server in servers:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
    wait_for(lambda: all_gone(cluster), timeout=GONE_TIMEOUT, interval=0.1,
             what="the cluster to exit after its last user")
    assert brokers(psutil.process_iter(), endpoints.dir) == []


def test_spawned_cluster_stops_when_the_server_exits(procs, endpoints):
    server = start_server(procs, endpoints, mode="spawn")
    port = port_of(server)
    assert get(port, "/job?data=once") == b"once"
    cluster = descendants(server.pid)
    assert brokers(cluster, endpoints.dir)

    os.kill(server.pid, signal.SIGINT)  # a clean exit: atexit runs
    assert server.wait(GONE_TIMEOUT) == 0, read_log(server)
    log = read_log(server)
    assert "SERVER EXITED" in log and "stopping the powerhose cluster" in log
    wait_for(lambda: all_gone(cluster), timeout=GONE_TIMEOUT, interval=0.1,
             what="the cluster to stop")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tcp_frontend_ends_with_one_broker(procs, endpoints):
    """No lock file for tcp: a server whose broker cannot bind attaches instead."""
    class Tcp:
        dir = endpoints.dir
        frontend = f"tcp://127.0.0.1:{free_port()}"
        backend = f"tcp://127.0.0.1:{free_port()}"

    servers = [start_server(procs, Tcp) for _ in range(2)]
    ports = [port_of(server) for server in servers]
    pids = {int(get(port, "/ping")) for port in ports}
    assert len(pids) == 1, pids
    found = [p for p in brokers(psutil.process_iter(), Tcp.frontend)]
    assert [p.pid for p in found] == list(pids)
    for i, port in enumerate(ports):
        assert get(port, f"/job?data=tcp{i}") == f"tcp{i}".encode()

    cluster = [p for s in servers for p in descendants(s.pid)]
    for server in servers:
        os.kill(server.pid, signal.SIGINT)
    for server in servers:
        assert server.wait(GONE_TIMEOUT) == 0, read_log(server)
    wait_for(lambda: all_gone(cluster), timeout=GONE_TIMEOUT, interval=0.1,
             what="the cluster to stop")
