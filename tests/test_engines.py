"""The broker's two engines: the C++ loop (native) and the Python one."""

import subprocess

import pytest

from pyramid_powerhose import native_broker
from tests.conftest import command, missing, read_log, wait_for


def test_the_native_engine_is_built_where_the_readme_set_up_ran():
    if not native_broker.available():
        missing("pyramid_powerhose._nbroker was not built: is g++ or libzmq3-dev missing?")
    assert native_broker.choose("auto") == "native"


@pytest.mark.parametrize("option, variable, expected", [
    ("python", None, "python"),
    ("native", None, "native"),
    (None, "python", "python"),
    ("native", "python", "native"),  # the option wins over the environment
])
def test_engine_option_and_variable_pick_the_loop(start_broker, monkeypatch, option, variable,
                                                   expected):
    if expected == "native" and not native_broker.available():
        pytest.skip("the native broker is not built")
    if variable is None:
        monkeypatch.delenv(native_broker.ENGINE_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(native_broker.ENGINE_VARIABLE, variable)
    broker = start_broker(*(["--engine", option] if option else []))
    wait_for(lambda: "broker engine:" in read_log(broker), what="the engine log line")
    assert f"broker engine: {expected}" in read_log(broker)


def test_an_unknown_engine_is_refused(endpoints):
    result = subprocess.run(command("powerhose-broker") + [
        "--frontend", endpoints.frontend, "--backend", endpoints.backend, "--engine", "rust"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "invalid choice: 'rust'" in result.stderr
