"""The one table of options, and every form generated from it.

No processes, no sockets: the argparse options of each command, the ini
mapping, the argv a broker or worker is started with, and the docs table
must each carry every option of their role.
"""

import copy
import dataclasses
import os
import pickle
import subprocess
import sys

import pytest

from pyramid_powerhose import endpoints, settings
from pyramid_powerhose.cli import broker, cluster, worker
from pyramid_powerhose.exc import SettingsError
from pyramid_powerhose.settings import (OPTIONS, Settings, command_line, from_arguments,
                                        options, rst_table, settings_from_mapping)

from .conftest import REPO

PARSERS = {"broker": broker.make_parser, "worker": worker.make_parser,
           "cluster": cluster.make_parser}

# A value of every option other than its default, so a form that drops or
# mixes up an option shows.
CHANGED = dict(
    target="tests.targets:echo", frontend="tcp://127.0.0.1:5001",
    backend="ipc:///tmp/powerhose-test/back.sock", service="resize", heartbeat=0.25,
    liveness=4, timeout=2.5, retries=2, worker_timeout=30.5, max_age=600.0, max_age_delta=1 / 3,
    broker_timeout=20.0, max_memory=512, prefetch=3, direct=False, nice=0,
    no_worker_timeout=2.0,
    max_job_size=1024, max_queue=7, max_queue_bytes=4096, curve_secret="/k/me.key_secret",
    curve_broker="/k/broker.key", curve_allow="/k/allowed", insecure=True, status_page=True,
    status_page_path="/ops/powerhose", status_page_permission="ops",
    grace=3.5, numprocesses=3, working_dir="/srv/app", cluster="attach", http_errors=False,
    params={"region": "eu", "size": "a:b"}, params_file="/etc/app/params.json",
    metrics_listen="127.0.0.1:9464", exit_with_parent=True, logfile="stderr",
    debug=True)


def role_fields(settings, role):
    return {opt.name: getattr(settings, opt.name) for opt in options(role)}


def test_changed_values_cover_the_table():
    assert set(CHANGED) == {opt.name for opt in OPTIONS}
    changed = Settings(**CHANGED)
    for opt in OPTIONS:
        assert getattr(changed, opt.name) != opt.default, opt.name


# -- command_line: the argv that reproduces settings in a child ---------------------------

@pytest.mark.parametrize("role", ["broker", "worker", "cluster"])
@pytest.mark.parametrize("values", [{}, CHANGED], ids=["defaults", "changed"])
def test_command_line_round_trips_through_the_commands_parser(role, values):
    original = Settings(**values)
    argv = command_line(original, role)
    if role != "broker":
        argv = [original.target or "pkg.module:func"] + argv
    parsed = from_arguments(PARSERS[role]().parse_args(argv), role)
    expected = role_fields(original, role)
    if role != "broker" and not original.target:
        expected["target"] = "pkg.module:func"
    assert role_fields(parsed, role) == expected


@pytest.mark.parametrize("role", ["broker", "worker"])
def test_command_line_names_every_option_of_the_role(role):
    argv = command_line(Settings(**CHANGED), role)
    for opt in options(role):
        if opt.positional:
            assert CHANGED[opt.name] not in argv  # the caller places the target
        elif opt.is_flag:
            wanted = opt.flag if CHANGED[opt.name] else "--no-" + opt.flag[2:]
            assert wanted in argv
        else:
            assert argv[argv.index(opt.flag) + 1] == opt.to_text(CHANGED[opt.name])
    assert argv == command_line(Settings(**CHANGED), role)  # one order, always


def test_command_line_gives_defaults_too_and_floats_exactly():
    argv = command_line(Settings(max_age_delta=0.1 + 0.2), "worker")
    assert argv[argv.index("--max-age-delta") + 1] == "0.30000000000000004"
    assert argv[argv.index("--prefetch") + 1] == "2"
    assert "--no-debug" in argv and "--no-exit-with-parent" in argv
    assert "--frontend" not in argv and "--grace" not in argv  # not the worker's
    assert command_line(Settings(), "broker")[:4] == ["--frontend", "", "--backend", ""]


def test_command_line_refuses_params_it_cannot_write():
    with pytest.raises(SettingsError, match="cannot be passed on a command line"):
        command_line(Settings(params={"key": "a|b"}), "worker")


@pytest.mark.parametrize("role", ["client", "plugin", "nobody"])
def test_command_line_is_for_commands_only(role):
    with pytest.raises(ValueError, match="role must be one of broker, worker, cluster"):
        command_line(Settings(), role)


# -- argparse -----------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["broker", "worker", "cluster"])
def test_each_command_takes_every_option_of_its_role_and_no_other(role):
    parser = PARSERS[role]()
    declared = {action.dest: action for action in parser._actions}
    for opt in OPTIONS:
        if role in opt.roles:
            action = declared[opt.name]
            assert action.option_strings[:1] == ([] if opt.positional else [opt.flag])
            assert action.help.startswith(opt.help.replace("%", "%%"))
        else:
            assert opt.name not in declared, opt.name


def test_a_command_without_options_gets_the_defaults():
    args = worker.make_parser().parse_args(["pkg.module:func"])
    assert from_arguments(args, "worker") == Settings(target="pkg.module:func")


def test_existing_spellings_still_parse():
    args = worker.make_parser().parse_args([
        "pkg.mod.func", "--timeout", "7", "--heartbeat", "ipc:///tmp/heartbeat", "--debug",
        "--exit-with-parent", "--params", "a:b|c:d"])
    settings = from_arguments(args, "worker")
    assert settings.worker_timeout == 7.0 and settings.heartbeat == Settings.heartbeat
    assert settings.debug is True and settings.exit_with_parent is True
    assert settings.params == {"a": "b", "c": "d"}
    args = cluster.make_parser().parse_args(["pkg.mod.func", "--numprocesses", "2"])
    assert from_arguments(args, "cluster").numprocesses == 2


@pytest.mark.parametrize("role, argv, message", [
    ("worker", ["t", "--timeout", "-1"], "--timeout must be >= 0, got -1.0"),
    ("worker", ["t", "--timeout", "soon"], "--timeout must be a number of seconds, "
                                           "got 'soon'"),
    ("worker", ["t", "--prefetch", "two"], "--prefetch must be a whole number, got 'two'"),
    ("worker", ["t", "--params", "novalue"], "--params must look like 'key:value"),
    ("broker", ["--heartbeat", "often"], "--heartbeat must be a positive number of seconds"),
    ("broker", ["--max-job-size", "0"], "--max-job-size must be a positive number of bytes"),
    ("broker", ["--frontend", "nowhere"], "--frontend must be a ZeroMQ endpoint"),
    ("broker", ["--frontend", "ipc:///a", "--backend", "ipc:///a"],
     "--frontend and --backend must be different endpoints"),
    ("cluster", ["t", "--numprocesses", "-1"], "--numprocesses must be 0 or more"),
])
def test_command_line_errors_name_the_flag(role, argv, message):
    with pytest.raises(SettingsError) as info:
        from_arguments(PARSERS[role]().parse_args(argv), role)
    assert message in str(info.value)


# -- the ini mapping ----------------------------------------------------------------------

def ini_text(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_every_plugin_option_has_an_ini_key_and_only_those():
    for opt in OPTIONS:
        assert (opt.ini is not None) == ("plugin" in opt.roles), opt.name


def test_every_ini_key_is_read():
    mapping = {f"powerhose.{opt.ini}": ini_text(CHANGED[opt.name])
               for opt in options("plugin") if opt.name != "params"}
    mapping.update({f"powerhose.params.{k}": v for k, v in CHANGED["params"].items()})
    assert role_fields(settings_from_mapping(mapping), "plugin") == \
        role_fields(Settings(**CHANGED), "plugin")


def test_ini_spellings():
    assert "powerhose.workers" in rst_table()
    read = settings_from_mapping({"powerhose.workers": "2", "powerhose.cluster": " SPAWN ",
                                  "powerhose.heartbeat": "ipc:///tmp/heartbeat",
                                  "powerhose.http_errors": "Off", "other.key": "x"})
    assert (read.numprocesses, read.cluster, read.heartbeat, read.http_errors) == \
        (2, "spawn", Settings.heartbeat, False)


def test_unknown_ini_key_suggests_the_right_one():
    with pytest.raises(SettingsError, match="unknown setting powerhose.worker; did you "
                                            "mean powerhose.workers?"):
        settings_from_mapping({"powerhose.worker": "2"})
    with pytest.raises(SettingsError, match="unknown setting powerhose.exit_with_parent"):
        settings_from_mapping({"powerhose.exit_with_parent": "true"})


def test_ini_errors_name_the_key():
    with pytest.raises(SettingsError, match="^powerhose.workers must be 0 or more"):
        settings_from_mapping({"powerhose.workers": "-1"})
    with pytest.raises(SettingsError, match="^app.worker_timeout must be >= 0"):
        settings_from_mapping({"app.worker_timeout": "-1"}, prefix="app.")


# -- converters ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("true", True), ("Yes", True), (" ON ", True), ("1", True), (True, True),
    ("false", False), ("NO", False), ("off", False), ("0", False), (False, False)])
def test_boolean_words(text, value):
    assert settings._flag("powerhose.debug", text) is value


@pytest.mark.parametrize("text", ["", "t", "y", "maybe", "2", None])
def test_other_words_are_not_booleans(text):
    with pytest.raises(SettingsError, match=f"^powerhose.debug must be true or false, "
                                            f"got {text!r}"):
        settings._flag("powerhose.debug", text)


@pytest.mark.parametrize("convert, value, result", [
    (settings._whole, " 12 ", 12), (settings._whole, 3, 3),
    (settings._seconds, "2.5", 2.5), (settings._seconds, 2, 2.0),
    (settings._heartbeat, "0.5", 0.5), (settings._heartbeat, "tcp://x:1", None),
    (settings._text, " a ", "a"), (settings._mode, " Auto", "auto"),
    (settings._params, "a:1|b:x:y|", {"a": "1", "b": "x:y"}), (settings._params, "", {}),
])
def test_converters(convert, value, result):
    assert convert("key", value) == result


@pytest.mark.parametrize("convert, value, message", [
    (settings._whole, "2.5", "key must be a whole number, got '2.5'"),
    (settings._whole, True, "key must be a whole number, got True"),
    (settings._seconds, "soon", "key must be a number of seconds, got 'soon'"),
    (settings._heartbeat, "0", "key must be a positive number of seconds"),
    (settings._heartbeat, "fast", "key must be a positive number of seconds"),
    (settings._text, 42, "key must be text, got 42"),
    (settings._params, "a:1|b", "key must look like 'key:value|key2:value2', got 'b'"),
])
def test_converter_errors_name_the_key(convert, value, message):
    with pytest.raises(SettingsError) as info:
        convert("key", value)
    assert str(info.value).startswith(message)


# -- the object ---------------------------------------------------------------------------

def test_settings_are_immutable():
    s = Settings(params={"a": "b"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.numprocesses = 2
    with pytest.raises(TypeError):
        s.params["a"] = "c"
    scaled = s.replace(numprocesses=2)
    assert (s.numprocesses, scaled.numprocesses) == (5, 2)
    assert scaled.params == {"a": "b"} and dict(scaled.params) == {"a": "b"}
    assert hash(s) == hash(Settings(params={"a": "other"}))  # params are not hashed


def test_settings_pickle_and_copy():
    s = Settings(**CHANGED)
    assert pickle.loads(pickle.dumps(s)) == s
    assert copy.deepcopy(s) == s and copy.copy(s) == s


def test_replace_checks_like_construction():
    with pytest.raises(SettingsError, match="liveness must be at least 1"):
        Settings().replace(liveness=0)


def test_construction_touches_no_file_system(monkeypatch, tmp_path):
    runtime = tmp_path / "xdg"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    s = Settings()
    settings_from_mapping({})
    assert (s.frontend, s.backend) == ("", "")
    assert not (runtime / "powerhose").exists()
    assert endpoints.resolve(s.frontend, "frontend") == \
        f"ipc://{runtime}/powerhose/frontend.sock"
    assert (runtime / "powerhose").is_dir()


# -- several brokers: frontend and backend lists ---------------------------------------------

A, B = "tcp://127.0.0.1:5001", "ipc:///tmp/ph-b/front.sock"
BACK_A, BACK_B = "tcp://127.0.0.1:5002", "ipc:///tmp/ph-b/back.sock"


@pytest.mark.parametrize("value", [[A, B], (A, B), f"{A} {B}", f"  {A}\n\t{B} ", [f"{A} {B}"]])
def test_several_endpoints_in_every_spelling_are_one_tuple(value):
    s = Settings(frontend=value, backend=[BACK_A, BACK_B])
    assert s.frontend == (A, B) and s.frontends == (A, B)
    assert s.backend == (BACK_A, BACK_B) and s.backends == (BACK_A, BACK_B)
    assert hash(s) == hash(Settings(frontend=(A, B), backend=(BACK_A, BACK_B)))
    assert pickle.loads(pickle.dumps(s)) == s


@pytest.mark.parametrize("value, normal, many", [
    ("", "", ()), ([], "", ()), (" ", "", ()), ([A], A, (A,)), (f" {A} ", A, (A,))])
def test_one_endpoint_or_none_stays_a_string(value, normal, many):
    s = Settings(frontend=value)
    assert s.frontend == normal and s.frontends == many
    assert s == Settings(frontend=normal)


@pytest.mark.parametrize("values, message", [
    (dict(frontend=[A, "nowhere"]), "frontend must be a ZeroMQ endpoint"),
    (dict(frontend=[A, A]), "frontend names an endpoint twice"),
    (dict(frontend=[A, 5]), "frontend must be an endpoint, or a list of endpoints"),
    (dict(frontend=[A, B], backend=[BACK_A, B]), "frontend and backend must be different"),
])
def test_several_endpoints_are_checked_each(values, message):
    with pytest.raises(SettingsError, match=message):
        Settings(**values)


def test_ini_lists_are_whitespace_separated():
    read = settings_from_mapping({"powerhose.frontend": f"{A}\n{B}",
                                  "powerhose.backend": BACK_A, "powerhose.retries": "1"})
    assert (read.frontend, read.backend, read.retries) == ((A, B), BACK_A, 1)
    with pytest.raises(SettingsError, match="^powerhose.frontend names an endpoint twice"):
        settings_from_mapping({"powerhose.frontend": f"{A} {A}"})
    with pytest.raises(SettingsError, match="^powerhose.retries must be 0 or more"):
        settings_from_mapping({"powerhose.retries": "-1"})


def test_repeated_flags_give_several_endpoints_and_round_trip():
    args = worker.make_parser().parse_args(["t", "--backend", BACK_A, "--backend", BACK_B])
    s = from_arguments(args, "worker")
    assert s.backend == (BACK_A, BACK_B)
    argv = command_line(s, "worker")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--backend"] == [BACK_A, BACK_B]
    again = from_arguments(worker.make_parser().parse_args(["t"] + argv), "worker")
    assert again == s
    # One flag may carry a whitespace-separated list too (an ini value passed on).
    args = worker.make_parser().parse_args(["t", "--backend", f"{BACK_A} {BACK_B}"])
    assert from_arguments(args, "worker").backend == (BACK_A, BACK_B)


def test_a_broker_and_a_cluster_take_exactly_one_endpoint_each():
    for role, argv in [("broker", ["--frontend", A, "--frontend", B]),
                       ("cluster", ["t", "--backend", BACK_A, "--backend", BACK_B])]:
        with pytest.raises(SettingsError, match="^--(frontend|backend) lists 2 endpoints"):
            from_arguments(PARSERS[role]().parse_args(argv), role)
    from pyramid_powerhose.broker import Broker
    from pyramid_powerhose.cluster import Cluster
    with pytest.raises(SettingsError, match="^frontend lists 2 endpoints"):
        Broker(Settings(frontend=[A, B]))
    with pytest.raises(SettingsError, match="^backend lists 2 endpoints"):
        Cluster(Settings(target="t:t", backend=[BACK_A, BACK_B]))
    # One endpoint in a list is one endpoint.
    assert from_arguments(PARSERS["broker"]().parse_args(["--frontend", A]),
                          "broker").frontend == A


def test_frontend_and_backend_compared_only_when_both_are_given():
    Settings(backend="ipc:///tmp/b.sock")
    with pytest.raises(SettingsError, match="frontend and backend must be different"):
        Settings(frontend="ipc:///tmp/b.sock", backend="ipc:///tmp/b.sock")


def test_settings_does_not_import_pyramid():
    code = "import sys, pyramid_powerhose.settings; sys.exit('pyramid' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# -- the docs -----------------------------------------------------------------------------

def test_docs_table_is_the_generated_one():
    with open(os.path.join(REPO, "docs", "settings.rst")) as f:
        assert f.read() == rst_table(), \
            "regenerate: python -m pyramid_powerhose.settings --rst > docs/settings.rst"


def test_docs_table_has_every_option():
    table = rst_table()
    for opt in OPTIONS:
        row = next(line for line in table.splitlines() if opt.help in line)
        if opt.ini:
            assert f"``powerhose.{opt.ini}``" in row
        if opt.flag:
            assert (opt.flag.upper() if opt.positional else f"``{opt.flag}``") in row
        assert ", ".join(r for r in settings.ROLES if r in opt.roles) in row
        assert opt.default_text("``{}``") in row


def test_the_table_refuses_an_unknown_role():
    with pytest.raises(ValueError, match="roles must be among broker, worker"):
        settings.option(1, roles={"browser"}, convert=settings._whole, help="")
