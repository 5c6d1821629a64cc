"""Settings, declared once: one table of options, one immutable object.

Each :class:`Settings` field is one option, declared with :func:`option`:
its default, the roles that take it, its ``powerhose.*`` ini key, its
command-line flag, its converter from text and one line of help.
Everything else is generated from that table: the argparse options of
every command (:func:`add_arguments`, :func:`from_arguments`), the ini
mapping (:func:`settings_from_mapping`), the argv that gives a broker or
worker the same settings (:func:`command_line`) and the docs' table
(:func:`rst_table`, ``python -m pyramid_powerhose.settings --rst``).

Constructing :class:`Settings` touches no file system: an empty
``frontend``/``backend`` means the private default endpoint, resolved by
:func:`pyramid_powerhose.endpoints.resolve` when a socket is made.  Either
may list several brokers (clients and workers use them all; a broker or a
cluster refuses them): a str for one endpoint, a tuple for several, and
``Settings.frontends``/``.backends`` a tuple either way.  This module
imports neither Pyramid nor ZeroMQ.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable

from . import endpoints
from .exc import SettingsError

MiB = 1024 * 1024
CLUSTER_MODES = ("auto", "spawn", "attach")

# Who takes an option.  broker, worker and cluster are commands
# (powerhose-broker, powerhose-worker, powerhose); client is the Client's
# keywords; plugin is the Pyramid app's powerhose.* ini keys.
ROLES = ("broker", "worker", "client", "cluster", "plugin", "status")
COMMANDS = ("broker", "worker", "cluster", "status")
# Commands that run exactly one broker, so take one frontend and one backend.
SINGLE_BROKER = ("broker", "cluster")
PREFIX = "powerhose."


# -- converters: (key as the user wrote it, value) -> value ------------------------
#
# The value is text from an ini file or a command line, or a Python value
# set from code.  A converter returning None means "keep the default".

def _text(key, value):
    if not isinstance(value, str):
        raise SettingsError(f"{key} must be text, got {value!r}")
    return value.strip()


def _endpoints(key, value):
    """One endpoint, or several: whitespace-separated text, or a list or tuple of them.

    Normal form, so that one endpoint looks the same however it was
    written: ``""`` for none (the private default), the endpoint itself (a
    str) for one, a tuple of str for several.
    """
    if isinstance(value, str):
        items = value.split()
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        items = [part for item in value for part in item.split()]
    else:
        raise SettingsError(f"{key} must be an endpoint, or a list of endpoints, "
                            f"got {value!r}")
    if len(set(items)) != len(items):
        raise SettingsError(f"{key} names an endpoint twice: {' '.join(items)}")
    if len(items) > 1:
        return tuple(items)
    return items[0] if items else ""


def several(value) -> tuple:
    """An endpoint setting's endpoints, as a tuple: () for the default."""
    if isinstance(value, tuple):
        return value
    return (value,) if value else ()


def _mode(key, value):
    return _text(key, value).lower()


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


TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")


def _flag(key, value):
    # Only these words: a typo must not silently turn a feature off.
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise SettingsError(f"{key} must be true or false, got {value!r}")


def _heartbeat(key, value):
    """Seconds between heartbeats; None for the seed's heartbeat *endpoint*.

    The original Powerhose took ``--heartbeat ipc:///tmp/heartbeat``; MDP
    heartbeats travel on the backend socket, so an endpoint is accepted and
    ignored, for old circus and ini files.
    """
    if isinstance(value, str) and "://" in value:
        return None
    seconds = None
    if not isinstance(value, bool):
        try:
            seconds = float(str(value).strip())
        except ValueError:
            pass
    if seconds is None or not seconds > 0:
        raise SettingsError(f"{key} must be a positive number of seconds (e.g. 1.0), "
                            f"got {value!r}")
    return seconds


def _params(key, value):
    return parse_params(value, key) if isinstance(value, str) else dict(value)


def parse_params(text: str, key: str = "params") -> dict[str, str]:
    """``'k:v|k2:v2'`` (the seed's --params syntax) -> ``{'k': 'v', 'k2': 'v2'}``."""
    params = {}
    for item in filter(None, (text or "").split("|")):
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise SettingsError(f"{key} must look like 'key:value|key2:value2', got {item!r}")
        params[name.strip()] = value
    return params


def format_params(params) -> str:
    """The inverse of :func:`parse_params`; refuses what it could not read back."""
    for name, value in params.items():
        if not name.strip() or ":" in name or "|" in name or "|" in value:
            raise SettingsError(f"param {name!r} cannot be passed on a command line: keys "
                                "cannot be empty or contain ':' or '|', values cannot "
                                "contain '|'")
    return "|".join(f"{name}:{value}" for name, value in params.items())


def read_params_file(path: str) -> dict[str, str]:
    """The params in ``path``, a JSON object of strings (``--params-file``)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            params = json.load(f)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"params_file {path}: cannot read a JSON object of params: "
                            f"{exc}") from None
    if not isinstance(params, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in params.items()):
        raise SettingsError(f"params_file {path} must hold a JSON object of strings")
    return params


def parse_heartbeat(value) -> float | None:
    """The ``--heartbeat``/``heartbeat=`` converter, for callers outside the table."""
    return _heartbeat("heartbeat", value)


def _as_text(value) -> str:
    # repr: a float must reach the child exactly as the parent has it.
    return repr(value) if isinstance(value, float) else str(value)


# -- the table ------------------------------------------------------------------------

def option(default=dataclasses.MISSING, *, roles, help, convert, ini=None, flag=None,
           to_text=_as_text, shown=None, repeat=False, default_factory=dataclasses.MISSING):
    """A Settings field that is also an option; see :class:`Option` for the arguments."""
    metadata = {"roles": frozenset(roles), "help": help, "convert": convert, "ini": ini,
                "flag": flag, "to_text": to_text, "shown": shown, "repeat": repeat}
    if not metadata["roles"] <= set(ROLES):
        raise ValueError(f"roles must be among {', '.join(ROLES)}, got {sorted(roles)}")
    return field(default=default, default_factory=default_factory, metadata=metadata,
                 hash=default_factory is dataclasses.MISSING)


@dataclass(frozen=True)
class Settings:
    """Every setting of the broker, the workers, the client, the cluster and the plugin.

    Immutable: :meth:`replace` makes a changed copy (scaling a cluster
    makes a new one).  Values are checked here, once, whatever they came from.
    """

    target: str = option("", roles={"worker", "cluster", "plugin"}, convert=_text,
                         flag="target", shown="none",
                         help="the worker callable: pkg.module:func or pkg.module.func, "
                         "importable from the working directory")
    # One endpoint is a str, several a tuple (see _endpoints); Settings.frontends
    # and .backends give a tuple either way.
    frontend: str | tuple[str, ...] = option(
        "", roles={"broker", "client", "cluster", "plugin", "status"}, convert=_endpoints,
        repeat=True, shown="ipc socket in a private per-user directory",
        help="ZeroMQ endpoint where clients reach the broker; a client may be given "
        "several brokers (repeat the flag; in an ini file, separate them with spaces) "
        "and spreads its jobs over those that answer; a broker or a cluster takes one")
    backend: str | tuple[str, ...] = option(
        "", roles={"broker", "worker", "cluster", "plugin"}, convert=_endpoints,
        repeat=True, shown="ipc socket in a private per-user directory",
        help="ZeroMQ endpoint where workers reach the broker; a worker may be given "
        "several brokers (repeat the flag; in an ini file, separate them with spaces), "
        "serves them all and runs one job at a time; a broker or a cluster takes one")
    service: str = option("default", roles={"worker", "client", "cluster", "plugin"},
                          convert=_text, help="the MDP service workers serve and jobs go to")
    heartbeat: float = option(1.0, roles={"broker", "worker", "cluster", "plugin"},
                              convert=_heartbeat,
                              help="seconds between heartbeats, both ways; an endpoint "
                              "such as ipc:///tmp/heartbeat (the original Powerhose's) "
                              "is accepted and ignored")
    liveness: int = option(3, roles={"broker", "worker", "cluster", "plugin"}, convert=_whole,
                           help="heartbeats missed before the other side counts as gone")
    timeout: float = option(5.0, roles={"client", "plugin"}, convert=_seconds,
                            help="seconds a client waits for a job's result")
    retries: int = option(0, roles={"client", "plugin"}, convert=_whole,
                          help="times a client sends a job again, to another broker if "
                          "one answers, when its broker was lost with the job in flight "
                          "(BrokerLostError), within the job's timeout: for idempotent "
                          "jobs only, since the lost job may have run")
    worker_timeout: float = option(10.0, roles={"worker", "cluster", "plugin"},
                                   convert=_seconds, flag="--timeout",
                                   help="hard limit in seconds on one job: past it the "
                                   "worker logs its stacks and exits to be restarted; "
                                   "0 disables")
    max_age: float = option(-1.0, roles={"worker", "cluster", "plugin"}, convert=_seconds,
                            help="recycle a worker after this many seconds, after its "
                            "current job; -1 never")
    max_age_delta: float = option(0.0, roles={"worker", "cluster", "plugin"},
                                  convert=_seconds,
                                  help="random spread in seconds added to max_age, so "
                                  "workers do not all restart at once")
    max_memory: int = option(0, roles={"worker", "cluster", "plugin"}, convert=_whole,
                             help="recycle a worker whose resident memory has passed this "
                             "many MiB (its peak, checked after each job) once that job is "
                             "done, as max_age does; 0 never")
    broker_timeout: float = option(60.0, roles={"worker", "cluster", "plugin"},
                                   convert=_seconds,
                                   help="a worker exits (status 2) after this many seconds "
                                   "without a broker")
    prefetch: int = option(2, roles={"worker", "cluster", "plugin"}, convert=_whole,
                           help="jobs the broker may hand a worker at once: one runs, the "
                           "others wait in its socket so it never idles between short "
                           "jobs; 1 for long or uneven jobs")
    direct: bool = option(True, roles={"worker", "client", "cluster", "plugin"},
                          convert=_flag,
                          help="on one host (ipc endpoints, one broker, CURVE off), jobs "
                          "travel straight between a client process and a worker the "
                          "broker leased it, instead of through the broker; --no-direct "
                          "relays every job")
    nice: int = option(5, roles={"worker", "cluster", "plugin"}, convert=_whole,
                       help="added to a worker's niceness (0 to 19), so the broker and the "
                       "web server's threads get a core first; 0 keeps the priority")
    no_worker_timeout: float = option(1.0, roles={"broker", "cluster", "plugin"},
                                      convert=_seconds,
                                      help="seconds a job waits for a service that has no "
                                      "worker before NoWorkerError")
    max_job_size: int = option(16 * MiB, roles={"broker", "client", "cluster", "plugin"},
                               convert=_whole,
                               help="largest job, in bytes: its data and headers together")
    max_queue: int = option(10_000, roles={"broker", "cluster", "plugin"}, convert=_whole,
                            help="jobs a service may have waiting in the broker; more fail "
                            "at once with OverloadedError")
    max_queue_bytes: int = option(128 * MiB, roles={"broker", "cluster", "plugin"},
                                  convert=_whole,
                                  help="bytes of jobs a service may have waiting in the "
                                  "broker; more fail at once with OverloadedError")
    grace: float = option(10.0, roles={"broker", "cluster", "plugin"}, convert=_seconds,
                          help="seconds the broker gives accepted jobs to finish on SIGTERM")
    numprocesses: int = option(5, roles={"cluster", "plugin"}, convert=_whole, ini="workers",
                               help="number of workers in a cluster")
    working_dir: str = option(".", roles={"cluster", "plugin"}, convert=_text,
                              help="where a cluster's workers run (and import the target "
                              "from)")
    cluster: str = option("auto", roles={"plugin"}, convert=_mode,
                          help="auto: use the broker that answers, or start a cluster; "
                          "spawn: start one; attach: use one started elsewhere")
    http_errors: bool = option(True, roles={"plugin"}, convert=_flag,
                               help="answer powerhose errors with 503/504 JSON responses")
    params: types.MappingProxyType = option(
        roles={"worker", "cluster", "plugin"}, convert=_params, ini="params.NAME",
        to_text=format_params, default_factory=dict, shown="none",
        help="read back by pyramid_powerhose.get_params(); on the command line "
        "'key:value|key2:value2', in an ini file one powerhose.params.NAME per key")
    params_file: str = option("", roles={"worker", "cluster", "plugin"}, convert=_text,
                              shown="none",
                              help="a JSON object of params (strings) that each worker "
                              "reads at start, so that they stay off command lines, which "
                              "every local user can see; params given directly override "
                              "it.  A cluster passes its workers their params this way, in "
                              "a file of mode 0600 in its private directory")
    curve_secret: str = option("", roles={"broker", "worker", "client", "cluster", "plugin",
                                          "status"},
                               convert=_text, shown="none: no CURVE",
                               help="this process's CURVE key pair, a .key_secret file of "
                               "mode 0600 ('powerhose keys' writes them): encrypt and "
                               "authenticate the connections to or from the broker")
    curve_broker: str = option("", roles={"worker", "client", "cluster", "plugin", "status"},
                               convert=_text,
                               shown="none",
                               help="the broker's public key, a .key file: with "
                               "curve_secret, connect to that broker only")
    curve_allow: str = option("", roles={"broker", "cluster", "plugin"}, convert=_text,
                              shown="none",
                              help="a directory of .key files: the clients and workers the "
                              "broker accepts (read again within seconds of a change)")
    insecure: bool = option(False, roles={"broker", "cluster", "plugin"}, convert=_flag,
                            help="let the broker bind a tcp address other hosts can reach "
                            "without CURVE (only on a trusted network)")
    metrics_listen: str = option("", roles={"cluster", "plugin"}, convert=_text,
                                 shown="none: no exporter",
                                 help="HOST:PORT where the cluster also runs 'powerhose "
                                 "metrics', an exporter of the broker's Prometheus metrics "
                                 "(e.g. 127.0.0.1:9464; needs pyramid_powerhose[metrics])")
    status_page: bool = option(False, roles={"plugin"}, convert=_flag,
                               help="add a live status page of the cluster (workers, queues, "
                               "jobs/s, latency, with charts) to the application")
    status_page_path: str = option("/_powerhose/status", roles={"plugin"}, convert=_text,
                                   help="where the status page is served")
    status_page_permission: str = option("", roles={"plugin"}, convert=_text, shown="none",
                                         help="the Pyramid permission the status page "
                                         "requires; status_page needs it")
    exit_with_parent: bool = option(False, roles={"broker", "worker", "cluster"},
                                    convert=_flag,
                                    help="stop (as on SIGTERM) when the parent process "
                                    "dies, so nothing outlives a supervisor")
    logfile: str = option("stdout", roles={"broker", "worker", "cluster", "plugin"},
                          convert=_text, help="'stdout', 'stderr' or a file path")
    debug: bool = option(False, roles={"broker", "worker", "cluster", "plugin"},
                         convert=_flag, help="log every job")

    def __post_init__(self):
        # Read-only, so that a frozen Settings is immutable all the way down.
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))
        for name in ("frontend", "backend"):
            value = _endpoints(name, getattr(self, name))
            object.__setattr__(self, name, value)
            for endpoint in several(value):  # none: the default, resolved when used
                try:
                    endpoints.check(endpoint, name)
                except ValueError as exc:
                    raise SettingsError(str(exc)) from None
        if set(self.frontends) & set(self.backends):
            raise SettingsError("frontend and backend must be different endpoints")
        if not self.service or len(self.service.encode()) > 255:
            raise SettingsError("service must be 1 to 255 bytes")
        if self.service.startswith("mmi."):
            raise SettingsError("service names starting with 'mmi.' are reserved")
        _positive(self, "heartbeat", "timeout", "no_worker_timeout", "grace")
        _at_least(self, 0, "worker_timeout", "max_age_delta", "broker_timeout", "max_memory")
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
        if self.max_queue < 1:
            raise SettingsError("max_queue must be at least 1 job")
        if self.max_queue_bytes < self.max_job_size:
            raise SettingsError(f"max_queue_bytes ({self.max_queue_bytes}) must be at least "
                                f"max_job_size ({self.max_job_size}), or no large job could wait")
        if self.retries < 0:
            raise SettingsError(f"retries must be 0 or more, got {self.retries!r}")
        if self.numprocesses < 0:
            raise SettingsError("numprocesses must be 0 or more")
        if bool(self.curve_broker) and not self.curve_secret:
            raise SettingsError("curve_broker needs curve_secret (this process's own key "
                                "pair) too")
        if self.curve_allow and not self.curve_secret:
            raise SettingsError("curve_allow needs curve_secret (the broker's own key pair) "
                                "too")
        if self.status_page and not self.status_page_permission:
            raise SettingsError("status_page needs status_page_permission: the permission "
                                "your security policy grants to who may see the cluster")
        if not self.status_page_path.startswith("/"):
            raise SettingsError(f"status_page_path must start with /, got "
                                f"{self.status_page_path!r}")
        if self.cluster not in CLUSTER_MODES:
            raise SettingsError(f"cluster must be one of {', '.join(CLUSTER_MODES)}, "
                                f"got {self.cluster!r}")

    @property
    def frontends(self) -> tuple[str, ...]:
        """The brokers' frontends as a tuple, whatever their number; () for the default."""
        return several(self.frontend)

    @property
    def backends(self) -> tuple[str, ...]:
        """The brokers' backends as a tuple, whatever their number; () for the default."""
        return several(self.backend)

    def replace(self, **changes) -> "Settings":
        """A new Settings with ``changes``, checked like any other."""
        return dataclasses.replace(self, **changes)

    def __reduce__(self):
        # For pickle and deepcopy: a mappingproxy has no pickled form, a dict has.
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["params"] = dict(self.params)
        return _from_values, (values,)


def _from_values(values):
    return Settings(**values)


def _positive(settings, *names):
    for name in names:
        if not getattr(settings, name) > 0:
            raise SettingsError(f"{name} must be positive, got {getattr(settings, name)!r}")


def _at_least(settings, floor, *names):
    for name in names:
        if not getattr(settings, name) >= floor:
            raise SettingsError(f"{name} must be >= {floor}, got {getattr(settings, name)!r}")


@dataclass(frozen=True)
class Option:
    """One row of the table, read from a Settings field's declaration.

    ``ini`` is the key after ``powerhose.`` (None: not in ini files);
    ``flag`` is ``--flag``, a positional's name, or None (no command takes
    it); ``convert(key, value)`` turns text into the field's value and
    names ``key`` in its errors; ``to_text`` is its inverse, for
    :func:`command_line`; ``shown`` is the default as the help and docs say it;
    ``repeat``: the flag may be given several times, for a tuple of values.
    """

    name: str
    default: Any
    roles: frozenset
    help: str
    convert: Callable
    ini: str | None
    flag: str | None
    to_text: Callable
    shown: str | None
    repeat: bool

    def default_text(self, literal="{}") -> str:
        """The default as people read it; ``literal`` wraps a value (rst: ``{}``)."""
        if self.is_flag:
            return "yes" if self.default else "no"
        return self.shown or literal.format(_as_text(self.default))

    @property
    def positional(self) -> bool:
        return self.flag is not None and not self.flag.startswith("--")

    @property
    def is_flag(self) -> bool:
        """A boolean: --name / --no-name on the command line."""
        return self.convert is _flag


def _row(f) -> Option:
    meta = dict(f.metadata)
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    roles = meta.pop("roles")
    # The usual spellings; the table says only where they differ.
    if meta["ini"] is None and "plugin" in roles:
        meta["ini"] = f.name
    if meta["flag"] is None and roles & set(COMMANDS):
        meta["flag"] = "--" + f.name.replace("_", "-")
    return Option(name=f.name, default=default, roles=roles, **meta)


OPTIONS: tuple[Option, ...] = tuple(_row(f) for f in dataclasses.fields(Settings))


def options(role: str) -> tuple[Option, ...]:
    """The options ``role`` takes, in the table's order."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return tuple(opt for opt in OPTIONS if role in opt.roles)


def _build(values: dict, names: dict) -> Settings:
    """Settings(**values), its errors saying the keys or flags the user wrote."""
    try:
        return Settings(**values)
    except SettingsError as exc:
        raise SettingsError(_rename(str(exc), names)) from None


def _rename(message: str, names: dict) -> str:
    """Settings' own messages begin with a field name; say ``names[field]`` instead."""
    head, sep, rest = message.partition(" ")
    if head in names:
        message = names[head] + sep + rest
    if "backend" in names:
        message = message.replace(" and backend ", f" and {names['backend']} ", 1)
    return message


# -- the command line -------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    """Declare the options of ``role``'s command on ``parser``.

    Every option defaults to None ("not given"), so that
    :func:`from_arguments` converts only what the user typed, with the same
    converters and messages as the ini file.
    """
    if role not in COMMANDS:
        raise ValueError(f"role must be one of {', '.join(COMMANDS)}, got {role!r}")
    for opt in options(role):
        help = opt.help.replace("%", "%%")  # argparse formats help with %
        if opt.positional:
            parser.add_argument(opt.flag, help=help)
            continue
        help += " (default: %s)" % opt.default_text().replace("%", "%%")
        if opt.is_flag:
            parser.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction,
                                help=help)
        elif opt.repeat:
            parser.add_argument(opt.flag, dest=opt.name, help=help, action="append",
                                metavar=opt.flag[2:].replace("-", "_").upper())
        else:
            parser.add_argument(opt.flag, dest=opt.name, help=help,
                                metavar=opt.flag[2:].replace("-", "_").upper())


def from_arguments(args: argparse.Namespace, role: str, **extra) -> Settings:
    """One Settings from what :func:`add_arguments` parsed, plus ``extra`` fields.

    A SettingsError names the flag the user wrote (``--timeout``, not
    ``worker_timeout``).
    """
    values = {}
    for opt in options(role):
        text = getattr(args, opt.name, None)
        if opt.flag is None or text is None:
            continue
        value = opt.convert(opt.flag, text)
        if isinstance(value, tuple) and role in SINGLE_BROKER:
            endpoints.single(value, opt.flag, f"powerhose-{role}" if role == "broker"
                             else "a cluster")
        if value is not None:
            values[opt.name] = value
    values.update(extra)
    return _build(values, {opt.name: opt.flag for opt in options(role) if opt.flag})


def command_line(settings: Settings, role: str) -> list[str]:
    """The flags that give ``role``'s command exactly ``settings``.

    Every option of the role, defaults included, so the child sees the
    parent's values; without the program and without the positional target.
    """
    if role not in COMMANDS:
        raise ValueError(f"role must be one of {', '.join(COMMANDS)}, got {role!r}")
    argv = []
    for opt in options(role):
        if opt.flag is None or opt.positional:
            continue
        value = getattr(settings, opt.name)
        if opt.is_flag:
            argv.append(opt.flag if value else "--no-" + opt.flag[2:])
        elif opt.repeat and isinstance(value, tuple):
            for item in value:
                argv += [opt.flag, opt.to_text(item)]
        else:
            argv += [opt.flag, opt.to_text(value)]
    return argv


# -- the ini file ------------------------------------------------------------------------

def settings_from_mapping(mapping, prefix: str = PREFIX) -> Settings:
    """One Settings from ``prefix``-ed keys of a mapping (Pyramid settings).

    Keys without the prefix are ignored; an unknown key with it is an
    error, so a typo is not silently replaced by a default.  ``params.NAME``
    keys become ``Settings.params``.  Every SettingsError names the key as
    the user wrote it.
    """
    keys = {opt.ini: opt for opt in options("plugin") if opt.name != "params"}
    params_key = "params."  # params.NAME, one key per parameter
    values = {}
    params = {}
    for full_key, value in mapping.items():
        if not isinstance(full_key, str) or not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        if value is None:
            continue  # set from Python as "use the default"
        if key.startswith(params_key):
            name = key[len(params_key):]
            if not name:
                raise SettingsError(f"{full_key} needs a parameter name, "
                                    f"e.g. {prefix}{params_key}region")
            params[name] = _text(full_key, value)
            continue
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise SettingsError(f"unknown setting {full_key}; {hint}known: "
                                + ", ".join(prefix + k for k in keys)
                                + f", {prefix}{params_key}NAME")
        converted = keys[key].convert(full_key, value)
        if converted is not None:
            values[keys[key].name] = converted
    if params:
        values["params"] = params
    return _build(values, {opt.name: prefix + opt.ini for opt in options("plugin")})


# -- the docs ------------------------------------------------------------------------------

def rst_table() -> str:
    """docs/settings.rst: the table of every option, for people."""
    rows = [("ini key", "flag", "default", "roles", "meaning")]
    for opt in OPTIONS:
        rows.append((
            # A simple table's first cell must not be empty (it would continue the row above).
            f"``{PREFIX}{opt.ini}``" if opt.ini else "(none)",
            f"``{opt.flag}``" if opt.flag and not opt.positional
            else (opt.flag.upper() if opt.flag else ""),
            opt.default_text("``{}``"),
            ", ".join(role for role in ROLES if role in opt.roles),
            opt.help,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rule = "  ".join("=" * w for w in widths)

    def line(row):
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()

    table = [rule, line(rows[0]), rule] + [line(row) for row in rows[1:]] + [rule]
    head = [
        "Settings",
        "========",
        "",
        ".. Generated from pyramid_powerhose/settings.py; do not edit. Regenerate with",
        "   python -m pyramid_powerhose.settings --rst > docs/settings.rst",
        "",
        "Every option of the broker, the workers, the client, the cluster and the",
        "Pyramid plugin. In an ini file the key takes the ``powerhose.`` prefix; the",
        "commands ``powerhose-broker``, ``powerhose-worker`` and ``powerhose`` take the",
        "flags of their role (a boolean ``--flag`` also has ``--no-flag``).",
        "",
    ]
    return "\n".join(head + table) + "\n"


if __name__ == "__main__":  # pragma: no cover - a tool for the docs
    if sys.argv[1:] != ["--rst"]:
        sys.exit("usage: python -m pyramid_powerhose.settings --rst > docs/settings.rst")
    sys.stdout.write(rst_table())
