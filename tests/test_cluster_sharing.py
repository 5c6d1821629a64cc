"""Web processes sharing one spawned cluster (cluster = auto): it lives while any of them does.

Before, the cluster stopped with the process that spawned it and the others
were left with no broker.
"""

import os
import subprocess
import sys
import time

import psutil

from pyramid_powerhose import Client
from pyramid_powerhose.watchers import OWNER_GONE_GRACE
from tests.conftest import REPO, alive, wait_for

# A web process: the plugin with cluster = auto; it stops (atexit, as pserve
# does) when its stdin closes, and prints whether it spawned the cluster.
APP = """
import sys
from pyramid.config import Configurator
from pyramid_powerhose.plugin import get_powerhose
config = Configurator(settings={
    "powerhose.frontend": sys.argv[1], "powerhose.backend": sys.argv[2],
    "powerhose.heartbeat": "0.2", "powerhose.cluster": "auto",
    "powerhose.target": "tests.targets:pid", "powerhose.workers": "1",
    "powerhose.working_dir": sys.argv[3]})
config.include("pyramid_powerhose")
app = config.make_wsgi_app()
cluster = get_powerhose(app.registry).cluster
print("spawned" if cluster else "attached", cluster.pids()["circus"] if cluster else "",
      flush=True)
sys.stdin.read()
"""


def start_app(procs, endpoints):
    proc = subprocess.Popen([sys.executable, "-c", APP, endpoints.frontend, endpoints.backend,
                             REPO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), start_new_session=True)
    procs.procs.append(proc)
    return proc, proc.stdout.readline().decode().split()


def cluster_processes(circus_pid):
    root = psutil.Process(circus_pid)
    return [root] + root.children(recursive=True)


def test_the_cluster_outlives_its_spawner_while_another_app_attached(procs, endpoints):
    first, (how, circus) = start_app(procs, endpoints)
    assert how == "spawned"
    processes = cluster_processes(int(circus))
    run_dir = processes[0].cwd()  # the cluster's private directory
    assert os.path.isdir(run_dir)
    second, (how, *_) = start_app(procs, endpoints)
    assert how == "attached"
    with Client(frontend=endpoints.frontend, timeout=10) as client:
        worker = client.execute(b"")
        first.stdin.close()  # the spawner exits normally
        assert first.wait(30) == 0
        time.sleep(OWNER_GONE_GRACE + 0.5)  # past the supervisor's grace for a dead owner
        assert client.execute(b"") == worker  # the same cluster, still serving
        procs.stop(second)  # SIGKILL the last user
        wait_for(lambda: not [p for p in processes if alive(p)], timeout=20,
                 what="the cluster to stop after its last user")
    assert not os.path.exists(endpoints.frontend[len("ipc://"):] + ".users")
    assert not os.path.exists(run_dir)


def test_the_last_of_two_apps_to_exit_stops_the_cluster(procs, endpoints):
    first, (how, circus) = start_app(procs, endpoints)
    processes = cluster_processes(int(circus))
    second, (how, *_) = start_app(procs, endpoints)
    assert how == "attached"
    second.stdin.close()  # the attached one leaves first: nothing changes
    assert second.wait(30) == 0
    with Client(frontend=endpoints.frontend, timeout=10) as client:
        assert client.execute(b"").isdigit()
    first.stdin.close()
    assert first.wait(60) == 0
    assert not [p for p in processes if alive(p)]  # the spawner stopped it in order
