"""The seed's quick start, verbatim: ``powerhose echo_worker.echo`` and its circus.ini.

Each run happens in the test's private directory holding the example's
echo_worker.py; every socket is rewritten or defaulted into it.
"""

import os
import shutil
import signal

import psutil
import pytest

from pyramid_powerhose import Client

from ..conftest import BIN, REPO, alive, command, read_log, wait_for

EXAMPLES = os.path.join(REPO, "examples")


@pytest.fixture
def seed_dir(run_dir):
    shutil.copy(os.path.join(EXAMPLES, "echo_worker.py"), run_dir)
    return run_dir


def descendants(proc):
    return psutil.Process(proc.pid).children(recursive=True)


def serve_and_stop(proc, frontend, workers, sig):
    """Wait for the cluster to answer, run a job, send ``sig``; return what ran."""
    wait_for(lambda: "press Ctrl-C" in read_log(proc) or proc.poll() is not None,
             timeout=60, what="powerhose to start")
    assert proc.poll() is None, read_log(proc)
    with Client(frontend=frontend) as client:
        assert client.execute(b"x") == b"x"
        assert client.stats()["services"]["default"]["workers"] == workers
    processes = descendants(proc)
    assert len(processes) >= 2 + workers  # circus, the broker, the workers
    os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: the foreground process group
    assert proc.wait(60) == 0, read_log(proc)
    assert not [p for p in processes if alive(p)]
    return processes


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_quick_start_with_explicit_endpoints(procs, seed_dir, endpoints, sig):
    proc = procs.start(command("powerhose") + [
        "echo_worker.echo", "--frontend", endpoints.frontend, "--backend", endpoints.backend,
        "--heartbeat", "0.2", "--numprocesses", "2"], "powerhose", cwd=seed_dir)
    serve_and_stop(proc, endpoints.frontend, 2, sig)
    output = read_log(proc)
    assert f"clients connect to {endpoints.frontend}" in output
    assert "circusctl --endpoint ipc://" in output


def test_quick_start_verbatim_with_default_endpoints(procs, seed_dir):
    runtime = os.path.join(seed_dir, "xdg")
    os.mkdir(runtime, 0o700)
    proc = procs.start(command("powerhose") + ["echo_worker.echo"], "powerhose",
                       env={"XDG_RUNTIME_DIR": runtime}, cwd=seed_dir)
    frontend = f"ipc://{runtime}/powerhose/frontend.sock"
    serve_and_stop(proc, frontend, 5, signal.SIGINT)
    assert os.stat(os.path.join(runtime, "powerhose")).st_mode & 0o777 == 0o700


def test_seed_circus_ini_under_plain_circusd(procs, seed_dir):
    # The file binds in /tmp and on 127.0.0.1:5555/5556, as the seed did; the
    # test moves every endpoint into its private directory.
    with open(os.path.join(EXAMPLES, "circus.ini")) as f:
        ini = f.read()
    assert "ipc:///tmp/front" in ini and "numprocesses = 5" in ini
    ini = (ini.replace("ipc:///tmp/", f"ipc://{seed_dir}/")
              .replace("tcp://127.0.0.1:5555", f"ipc://{seed_dir}/circus.sock")
              .replace("tcp://127.0.0.1:5556", f"ipc://{seed_dir}/pubsub.sock"))
    assert "ipc:///tmp/front" not in ini and "ipc:///tmp/backend" not in ini
    assert "tcp://" not in ini
    with open(os.path.join(seed_dir, "circus.ini"), "w") as f:
        f.write(ini)

    env = {"PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    circusd = procs.start(command("circusd") + ["circus.ini"], "circusd", env=env,
                          cwd=seed_dir)
    frontend = f"ipc://{seed_dir}/front"
    with Client(frontend=frontend) as client:
        wait_for(lambda: circusd.poll() is not None or
                 client.stats(timeout=0.5)["services"].get("default", {}).get("workers") == 5
                 if client.ping(timeout=0.2) else False,
                 timeout=60, what="circusd's broker and 5 workers")
        assert circusd.poll() is None, read_log(circusd)
        assert client.execute(b"x") == b"x"
    processes = descendants(circusd)
    assert len(processes) == 6  # the broker and five workers

    circusd.send_signal(signal.SIGTERM)
    assert circusd.wait(60) == 0, read_log(circusd)
    assert not [p for p in processes if alive(p)]
