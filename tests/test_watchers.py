"""What circus runs for a cluster, checked exactly, without starting a process."""

import pytest

from pyramid_powerhose import watchers
from pyramid_powerhose.exc import ClusterError
from pyramid_powerhose.settings import Settings
from pyramid_powerhose.watchers import (broker_argv, circus_config, graceful_timeouts,
                                        worker_argv)

PY = "/venv/bin/python"
RUN = "/tmp/powerhose-cluster-x"
CIRCUS = f"ipc://{RUN}/circus.sock"


def settings(**changes):
    return Settings(target="app.jobs:run", frontend="ipc:///run/ph/front.sock",
                    backend="ipc:///run/ph/back.sock", working_dir="/srv/app", **changes)


# -- the command lines ------------------------------------------------------------

def test_broker_argv():
    assert broker_argv(settings(grace=4.0, liveness=5), python=PY) == [
        PY, "-m", "pyramid_powerhose.cli.broker",
        "--frontend", "ipc:///run/ph/front.sock", "--backend", "ipc:///run/ph/back.sock",
        "--heartbeat", "1.0", "--liveness", "5", "--grace", "4.0",
        "--no-worker-timeout", "1.0", "--max-job-size", "16777216",
        "--exit-with-parent", "--logfile", "stdout"]


def test_worker_argv():
    assert worker_argv(settings(service="echo", params={"a": "b", "c": "d"},
                                worker_timeout=7.0, max_age=30.0, max_age_delta=5.0,
                                nice=9, debug=True, logfile="/var/log/ph.log"),
                       python=PY) == [
        PY, "-m", "pyramid_powerhose.cli.worker", "app.jobs:run",
        "--backend", "ipc:///run/ph/back.sock", "--heartbeat", "1.0", "--liveness", "3",
        "--service", "echo", "--timeout", "7.0", "--max-age", "30.0",
        "--max-age-delta", "5.0", "--broker-timeout", "60.0", "--prefetch", "2",
        "--nice", "9", "--params", "a:b|c:d",
        "--exit-with-parent", "--logfile", "/var/log/ph.log", "--debug"]


def test_a_logfile_argument_overrides_the_setting():
    argv = broker_argv(settings(logfile="stderr"), "stdout", python=PY)
    assert argv[-3:] == ["--exit-with-parent", "--logfile", "stdout"]


def test_the_interpreter_is_this_one_unless_powerhose_python_says(monkeypatch):
    monkeypatch.delenv("POWERHOSE_PYTHON", raising=False)
    monkeypatch.setattr(watchers.sys, "executable", "/usr/bin/python3")
    assert broker_argv(settings())[0] == "/usr/bin/python3"
    monkeypatch.setenv("POWERHOSE_PYTHON", "/venv/bin/python")
    assert worker_argv(settings())[0] == "/venv/bin/python"
    # Under uWSGI or mod_wsgi there may be no python to tell.
    monkeypatch.delenv("POWERHOSE_PYTHON")
    monkeypatch.setattr(watchers.sys, "executable", "")
    with pytest.raises(ClusterError, match="POWERHOSE_PYTHON"):
        watchers.interpreter()


# -- the circus configuration ---------------------------------------------------------

def test_graceful_timeouts_leave_time_to_drain_and_to_finish_a_job():
    # The broker drains for grace; a worker finishes its job (worker_timeout).
    assert graceful_timeouts(settings(grace=10.0, worker_timeout=30.0)) == \
        {"broker": 15.0, "workers": 35.0}
    assert graceful_timeouts(settings(grace=10.0, worker_timeout=2.0)) == \
        {"broker": 15.0, "workers": 15.0}


def test_background_config_sends_the_output_to_files_in_the_run_dir():
    s = settings(numprocesses=3, worker_timeout=30.0)
    log = {"broker": f"{RUN}/broker.log", "workers": f"{RUN}/workers.log"}

    def stream(name):
        return {"class": "FileStream", "filename": log[name]}

    assert circus_config(s, RUN, CIRCUS, background=True, python=PY) == {
        "endpoint": CIRCUS,
        "pubsub_endpoint": f"ipc://{RUN}/pubsub.sock",
        "check_delay": 0.5,
        "owner_grace": 3.0,
        "loglevel": "info",
        "run_dir": RUN,
        "watchers": [
            {"name": "broker", "cmd": PY, "args": broker_argv(s, python=PY)[1:],
             "numprocesses": 1, "working_dir": "/srv/app", "copy_env": True,
             "graceful_timeout": 15.0, "priority": 2, "singleton": True,
             "stdout_stream": stream("broker"), "stderr_stream": stream("broker")},
            {"name": "workers", "cmd": PY, "args": worker_argv(s, python=PY)[1:],
             "numprocesses": 3, "working_dir": "/srv/app", "copy_env": True,
             "graceful_timeout": 35.0, "priority": 1, "singleton": False,
             "stdout_stream": stream("workers"), "stderr_stream": stream("workers")},
        ],
    }


@pytest.mark.parametrize("logfile, written", [("stdout", "stdout"), ("stderr", "stdout"),
                                              ("/var/log/ph.log", "/var/log/ph.log")])
def test_background_logging_goes_to_the_quoted_files_unless_a_file_is_set(logfile, written):
    config = circus_config(settings(logfile=logfile), RUN, CIRCUS, True, PY)
    for watcher in config["watchers"]:
        assert watcher["args"][-2:] == ["--logfile", written]


def test_foreground_config_leaves_the_output_on_the_terminal():
    s = settings(logfile="stderr")
    config = circus_config(s, RUN, CIRCUS, background=False, python=PY)
    broker, workers = config["watchers"]
    assert config["loglevel"] == "warning"
    assert "stdout_stream" not in broker and "stderr_stream" not in workers
    assert broker["args"] == broker_argv(s, python=PY)[1:]
    assert workers["args"][-2:] == ["--logfile", "stderr"]


@pytest.mark.parametrize("background", [True, False])
def test_debug_makes_circus_verbose(background):
    config = circus_config(settings(debug=True), RUN, CIRCUS, background, PY)
    assert config["loglevel"] == "debug"
    assert all(w["args"][-1] == "--debug" for w in config["watchers"])


def test_the_interpreter_is_quoted_for_circus():
    config = circus_config(settings(), RUN, CIRCUS, True, "/opt/my venv/bin/python")
    assert [w["cmd"] for w in config["watchers"]] == ["'/opt/my venv/bin/python'"] * 2
