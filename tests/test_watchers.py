"""What circus runs for a cluster, checked exactly, without starting a process."""

import pytest

from pyramid_powerhose import watchers
from pyramid_powerhose.exc import ClusterError
from pyramid_powerhose.cli import broker as cli_broker
from pyramid_powerhose.cli import worker as cli_worker
from pyramid_powerhose.settings import Settings, from_arguments, options
from pyramid_powerhose.watchers import (broker_argv, circus_config, graceful_timeouts,
                                        worker_argv)

PY = "/venv/bin/python"
RUN = "/tmp/powerhose-cluster-x"
CIRCUS = f"ipc://{RUN}/circus.sock"


def settings(**changes):
    return Settings(target="app.jobs:run", frontend="ipc:///run/ph/front.sock",
                    backend="ipc:///run/ph/back.sock", working_dir="/srv/app", **changes)


# -- the command lines ------------------------------------------------------------

def parsed(argv, cli):
    """What the command started with ``argv`` would run with."""
    assert argv[:3] == [PY, "-m", cli.__name__]
    return from_arguments(cli.make_parser().parse_args(argv[3:]), cli.make_parser().prog
                          .removeprefix("powerhose-"))


def value(args, flag):
    return args[args.index(flag) + 1]


def test_the_broker_gets_every_broker_setting_and_runs_under_the_supervisor():
    given = settings(grace=4.0, liveness=5, heartbeat=0.25, max_job_size=1024, debug=True)
    got = parsed(broker_argv(given, python=PY), cli_broker)
    for opt in options("broker"):
        if opt.name not in ("exit_with_parent",):
            assert getattr(got, opt.name) == getattr(given, opt.name), opt.name
    assert got.exit_with_parent  # if the supervisor is killed, circus cannot stop it


def test_the_workers_get_every_worker_setting_and_the_target():
    given = settings(service="echo", params={"a": "b", "c": "d"}, worker_timeout=7.0,
                     max_age=30.0, max_age_delta=5.0, nice=9, debug=True,
                     logfile="/var/log/ph.log")
    argv = worker_argv(given, python=PY)
    assert argv[3] == "app.jobs:run"
    got = parsed(argv, cli_worker)
    for opt in options("worker"):
        if opt.name not in ("exit_with_parent",):
            assert getattr(got, opt.name) == getattr(given, opt.name), opt.name
    assert got.exit_with_parent


def test_a_logfile_argument_overrides_the_setting():
    got = parsed(broker_argv(settings(logfile="stderr"), "stdout", python=PY), cli_broker)
    assert got.logfile == "stdout"


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
        assert value(watcher["args"], "--logfile") == written


def test_foreground_config_leaves_the_output_on_the_terminal():
    s = settings(logfile="stderr")
    config = circus_config(s, RUN, CIRCUS, background=False, python=PY)
    broker, workers = config["watchers"]
    assert config["loglevel"] == "warning"
    assert "stdout_stream" not in broker and "stderr_stream" not in workers
    assert broker["args"] == broker_argv(s, python=PY)[1:]
    assert value(workers["args"], "--logfile") == "stderr"


@pytest.mark.parametrize("background", [True, False])
def test_debug_makes_circus_verbose(background):
    config = circus_config(settings(debug=True), RUN, CIRCUS, background, PY)
    assert config["loglevel"] == "debug"
    assert all("--debug" in w["args"] for w in config["watchers"])


def test_the_interpreter_is_quoted_for_circus():
    config = circus_config(settings(), RUN, CIRCUS, True, "/opt/my venv/bin/python")
    assert [w["cmd"] for w in config["watchers"]] == ["'/opt/my venv/bin/python'"] * 2
