"""Params stay off command lines (every local user can run ps), yet reach get_params()."""

import json
import os
import stat

import psutil
import webtest

from pyramid_powerhose.plugin import get_powerhose
from tests.conftest import REPO
from tests.test_cluster import clusters  # noqa: F401 (fixture)
from tests.test_plugin import make_app  # noqa: F401 (fixture)

SECRET = "s3cret-VALUE-7f1d"


def cluster_cmdlines(cluster):
    pids = cluster.pids()
    processes = [psutil.Process(pids["circus"])]
    processes += [psutil.Process(pid) for pid in pids["broker"] + pids["workers"]]
    processes += processes[0].children(recursive=True)
    return [" ".join(process.cmdline()) for process in processes]


def test_a_clusters_params_are_in_a_private_file_not_in_ps(clusters, client):  # noqa: F811
    cluster = clusters("tests.targets:params", worker_params={"secret": SECRET, "a": "b:c"})
    cluster.launch()
    assert client.execute(b"") == f"a=b:c|secret={SECRET}".encode()
    cmdlines = cluster_cmdlines(cluster)
    assert len(cmdlines) >= 4  # circus, broker, two workers
    assert not [line for line in cmdlines if SECRET in line]
    files = [os.path.join(cluster.run_dir, name) for name in os.listdir(cluster.run_dir)]
    holding = [path for path in files if os.path.isfile(path) and SECRET in open(path).read()]
    assert len(holding) == 1  # the params file, nothing else (circus.json has none)
    assert stat.S_IMODE(os.stat(holding[0]).st_mode) == 0o600


def test_a_params_file_of_the_user_reaches_the_workers(clusters, client, run_dir):  # noqa: F811
    path = os.path.join(run_dir, "params.json")
    with open(path, "w") as f:
        json.dump({"secret": SECRET, "region": "eu"}, f)
    cluster = clusters("tests.targets:params", params_file=path,
                       worker_params={"region": "us"})  # given directly: wins
    cluster.launch()
    assert client.execute(b"") == f"region=us|secret={SECRET}".encode()
    assert not [line for line in cluster_cmdlines(cluster) if SECRET in line]


def test_the_plugin_spawns_with_params_off_the_command_line(make_app, client):  # noqa: F811
    raw = make_app(raw=True, cluster="spawn", target="tests.targets:params", workers="1",
                   working_dir=REPO, **{"params.secret": SECRET})
    cluster = get_powerhose(raw.registry).cluster
    assert webtest.TestApp(raw).get("/job").body == f"secret={SECRET}".encode()
    assert not [line for line in cluster_cmdlines(cluster) if SECRET in line]


def test_a_worker_reads_a_params_file(start_broker, start_worker, wait_workers, client,
                                      run_dir):
    path = os.path.join(run_dir, "p.json")
    with open(path, "w") as f:
        json.dump({"k": "v"}, f)
    start_broker()
    worker = start_worker("tests.targets:params", "--params-file", path)
    wait_workers(client, 1)
    assert client.execute(b"") == b"k=v"
    assert SECRET not in " ".join(psutil.Process(worker.pid).cmdline())


def test_the_circus_configuration_names_the_file_not_the_params(run_dir):
    from pyramid_powerhose.settings import Settings
    from pyramid_powerhose.watchers import WORKERS, circus_config, params_path

    settings = Settings(target="app:run", frontend="ipc:///x/f.sock", backend="ipc:///x/b.sock",
                        params={"secret": SECRET})
    config = circus_config(settings, run_dir, "ipc:///x/c.sock", background=True,
                           python="/usr/bin/python3")
    assert SECRET not in json.dumps(config)
    workers = next(w for w in config["watchers"] if w["name"] == WORKERS)
    args = workers["args"]
    assert args[args.index("--params-file") + 1] == params_path(run_dir)
    assert args[args.index("--params") + 1] == ""
