"""Settings, parsed once into one typed object.

The command line, ``get_cluster`` and the Pyramid plugin all build a
:class:`Settings`; the defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from pyramid.settings import asbool, falsey, truthy

from . import endpoints
from .exc import SettingsError

MiB = 1024 * 1024
CLUSTER_MODES = ("auto", "spawn", "attach")


@dataclass
class Settings:
    target: str = ""  # worker callable, pkg.module:func or pkg.module.func
    frontend: str = ""  # default: ipc socket in the private runtime dir
    backend: str = ""
    service: str = "default"
    heartbeat: float = 1.0  # seconds between heartbeats, both ways
    liveness: int = 3  # heartbeats missed before a peer is dead
    timeout: float = 5.0  # client: seconds to wait for a result
    worker_timeout: float = 10.0  # worker: hard limit on one job; 0 disables
    max_age: float = -1.0  # worker: recycle after this many seconds; -1 never
    max_age_delta: float = 0.0  # worker: random spread added to max_age
    broker_timeout: float = 60.0  # worker: exit after this long without a broker
    prefetch: int = 2  # worker: jobs the broker may hand it at once (1: one at a time)
    nice: int = 5  # worker: lowers its CPU priority so broker and web threads run first
    no_worker_timeout: float = 1.0  # broker: fail jobs of a service with no worker
    max_job_size: int = 16 * MiB  # broker and client: largest job data
    grace: float = 10.0  # broker and worker: seconds to finish jobs on SIGTERM
    numprocesses: int = 5  # cluster: number of workers
    working_dir: str = "."  # cluster: where workers run (and import the target from)
    cluster: str = "auto"  # plugin: auto | spawn | attach
    http_errors: bool = True  # plugin: exception views for powerhose errors
    params: dict = field(default_factory=dict)  # worker: get_params()
    exit_with_parent: bool = False  # broker, worker: stop when the supervisor dies
    logfile: str = "stdout"
    debug: bool = False

    def __post_init__(self):
        self.frontend = self.frontend or endpoints.default_frontend()
        self.backend = self.backend or endpoints.default_backend()
        try:
            endpoints.check(self.frontend, "frontend")
            endpoints.check(self.backend, "backend")
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if self.frontend == self.backend:
            raise SettingsError("frontend and backend must be different endpoints")
        if not self.service or len(self.service.encode()) > 255:
            raise SettingsError("service must be 1 to 255 bytes")
        if self.service.startswith("mmi."):
            raise SettingsError("service names starting with 'mmi.' are reserved")
        _positive(self, "heartbeat", "timeout", "no_worker_timeout", "grace")
        _at_least(self, 0, "worker_timeout", "max_age_delta", "broker_timeout")
        if self.liveness < 1:
            raise SettingsError("liveness must be at least 1")
        if not 1 <= self.prefetch <= 64:
            raise SettingsError(f"prefetch must be 1 to 64, got {self.prefetch!r}")
        if not 0 <= self.nice <= 19:
            raise SettingsError(f"nice must be 0 (keep the priority) to 19, got {self.nice!r}")
        if self.max_age != -1 and self.max_age <= 0:
            raise SettingsError("max_age must be -1 (never) or positive seconds")
        if self.max_job_size < 1:
            raise SettingsError("max_job_size must be a positive number of bytes")
        if self.numprocesses < 0:
            raise SettingsError("numprocesses must be 0 or more")
        if self.cluster not in CLUSTER_MODES:
            raise SettingsError(f"cluster must be one of {', '.join(CLUSTER_MODES)}, "
                                f"got {self.cluster!r}")

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


def _positive(settings, *names):
    for name in names:
        if not getattr(settings, name) > 0:
            raise SettingsError(f"{name} must be positive, got {getattr(settings, name)!r}")


def _at_least(settings, floor, *names):
    for name in names:
        if not getattr(settings, name) >= floor:
            raise SettingsError(f"{name} must be >= {floor}, got {getattr(settings, name)!r}")


def parse_params(text: str) -> dict[str, str]:
    """``'k:v|k2:v2'`` (the seed's --params syntax) -> ``{'k': 'v', 'k2': 'v2'}``."""
    params = {}
    for item in filter(None, (text or "").split("|")):
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise SettingsError(f"params must look like 'key:value|key2:value2', got {item!r}")
        params[key.strip()] = value
    return params


def format_params(params: dict) -> str:
    return "|".join(f"{key}:{value}" for key, value in params.items())


def parse_heartbeat(value) -> float | None:
    """Seconds between heartbeats; None for the seed's heartbeat *endpoint*.

    The original Powerhose took ``--heartbeat ipc:///tmp/heartbeat``; MDP
    heartbeats travel on the backend socket, so an endpoint is accepted and
    ignored for old circus configurations.
    """
    if isinstance(value, str) and "://" in value:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"heartbeat must be seconds (e.g. 1.0), got {value!r}") from None
    if seconds <= 0:
        raise SettingsError(f"heartbeat must be positive seconds, got {value!r}")
    return seconds


# -- the Pyramid plugin's settings ------------------------------------------------

def _text(key, value):
    if not isinstance(value, str):
        raise SettingsError(f"{key} must be text, got {value!r}")
    return value.strip()


def _whole(key, value):
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise SettingsError(f"{key} must be a whole number, got {value!r}") from None


def _seconds(key, value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        raise SettingsError(f"{key} must be a number of seconds, got {value!r}") from None


def _flag(key, value):
    # asbool() reads any unknown word as false; a typo must not silently
    # turn a feature off, so only pyramid's own words are accepted.
    if isinstance(value, bool) or str(value).strip().lower() in truthy | falsey:
        return asbool(value)
    raise SettingsError(f"{key} must be true or false, got {value!r}")


def _heartbeat(key, value):
    try:
        seconds = parse_heartbeat(value.strip() if isinstance(value, str) else value)
    except SettingsError:
        raise SettingsError(f"{key} must be a positive number of seconds (e.g. 1.0), "
                            f"got {value!r}") from None
    return seconds  # None: an old heartbeat endpoint, ignored


# ini name -> (Settings field, converter).  Every Settings field can be set;
# ``workers`` is the seed's name for ``numprocesses``.
MAPPING_KEYS = {
    "target": ("target", _text),
    "workers": ("numprocesses", _whole),
    "cluster": ("cluster", _text),
    "frontend": ("frontend", _text),
    "backend": ("backend", _text),
    "service": ("service", _text),
    "heartbeat": ("heartbeat", _heartbeat),
    "liveness": ("liveness", _whole),
    "timeout": ("timeout", _seconds),
    "worker_timeout": ("worker_timeout", _seconds),
    "max_age": ("max_age", _seconds),
    "max_age_delta": ("max_age_delta", _seconds),
    "broker_timeout": ("broker_timeout", _seconds),
    "prefetch": ("prefetch", _whole),
    "nice": ("nice", _whole),
    "no_worker_timeout": ("no_worker_timeout", _seconds),
    "max_job_size": ("max_job_size", _whole),
    "grace": ("grace", _seconds),
    "working_dir": ("working_dir", _text),
    "http_errors": ("http_errors", _flag),
    "logfile": ("logfile", _text),
    "debug": ("debug", _flag),
}


def settings_from_mapping(mapping, prefix: str = "powerhose.") -> Settings:
    """One Settings from ``prefix``-ed keys of a mapping (Pyramid settings).

    Keys without the prefix are ignored; an unknown key with it is an
    error, so a typo is not silently replaced by a default.  ``params.NAME``
    keys become ``Settings.params``.  Every SettingsError names the key as
    the user wrote it.
    """
    values = {}
    params = {}
    for full_key, value in mapping.items():
        if not isinstance(full_key, str) or not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        if value is None:
            continue  # set from Python as "use the default"
        if key.startswith("params."):
            name = key[len("params."):]
            if not name:
                raise SettingsError(f"{full_key} needs a parameter name, "
                                    f"e.g. {prefix}params.region")
            params[name] = _text(full_key, value)
            continue
        if key not in MAPPING_KEYS:
            close = difflib.get_close_matches(key, MAPPING_KEYS, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise SettingsError(
                f"unknown setting {full_key}; {hint}known: "
                + ", ".join(prefix + k for k in MAPPING_KEYS) + f", {prefix}params.NAME")
        field_name, convert = MAPPING_KEYS[key]
        converted = convert(full_key, value)
        if converted is not None:
            values[field_name] = converted
    if params:
        values["params"] = params
    if "cluster" in values:
        values["cluster"] = values["cluster"].lower()
    try:
        return Settings(**values)
    except SettingsError as exc:
        raise SettingsError(_name_keys(str(exc), prefix)) from None


def _name_keys(message: str, prefix: str) -> str:
    """Settings' own messages name fields; say the key the user wrote."""
    keys = {field_name: key for key, (field_name, _) in MAPPING_KEYS.items()}
    head, sep, rest = message.partition(" ")
    if head in keys:
        message = prefix + keys[head] + sep + rest
    return message.replace(" and backend ", f" and {prefix}backend ", 1)
