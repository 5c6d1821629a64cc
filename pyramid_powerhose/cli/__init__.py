"""Thin argparse front ends: parse, build Settings, run, map to exit codes.

The options shared by the commands are declared once here, with their
defaults taken from :class:`~pyramid_powerhose.settings.Settings`.
"""

import argparse

from ..exc import SettingsError
from ..settings import Settings, parse_heartbeat, parse_params

DEFAULTS = Settings.__dataclass_fields__


def default(name):
    field = DEFAULTS[name]
    return field.default


def add_endpoint_options(parser, frontend=True):
    if frontend:
        parser.add_argument("--frontend", help="ZeroMQ endpoint for clients "
                            "(default: ipc socket in a private per-user directory)")
    parser.add_argument("--backend", help="ZeroMQ endpoint for workers "
                        "(default: ipc socket in a private per-user directory)")
    parser.add_argument("--heartbeat", default=str(default("heartbeat")),
                        help="seconds between heartbeats (default %(default)s); an "
                        "endpoint such as ipc:///tmp/heartbeat is accepted and ignored, "
                        "for the original Powerhose's circus files")
    parser.add_argument("--liveness", type=int, default=default("liveness"),
                        help="heartbeats missed before the other side counts as gone "
                        "(default %(default)s)")


def add_logging_options(parser):
    parser.add_argument("--logfile", default=default("logfile"),
                        help="'stdout', 'stderr' or a file path (default %(default)s)")
    parser.add_argument("--debug", action="store_true", help="log every job")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop (as on SIGTERM) if the parent process dies: for "
                        "supervisors such as the cluster's circus, so that nothing "
                        "outlives them")


def add_worker_options(parser):
    parser.add_argument("--service", default=default("service"),
                        help="the MDP service to serve (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=default("worker_timeout"),
                        help="hard limit in seconds on one job: past it the worker logs "
                        "its stacks and exits to be restarted; 0 disables "
                        "(default %(default)s)")
    parser.add_argument("--max-age", type=float, default=default("max_age"),
                        help="recycle the worker after this many seconds, after its "
                        "current job; -1 never (default %(default)s)")
    parser.add_argument("--max-age-delta", type=float, default=default("max_age_delta"),
                        help="random spread in seconds added to --max-age so workers "
                        "do not all restart at once (default %(default)s)")
    parser.add_argument("--prefetch", type=int, default=default("prefetch"),
                        help="jobs the broker may hand this worker at once: one runs, "
                        "the others wait in its socket so it never idles between "
                        "short jobs; 1 for long or uneven jobs (default %(default)s)")
    parser.add_argument("--nice", type=int, default=default("nice"),
                        help="add this to the worker's niceness (0 to 19): a busy worker "
                        "then gives way at once to the broker and the web server's "
                        "threads, which need a core for microseconds at a time; 0 keeps "
                        "the priority it was started with (default %(default)s)")
    parser.add_argument("--params", default="",
                        help="'key:value|key2:value2', read back by "
                        "pyramid_powerhose.get_params()")


def settings_from(args, **extra) -> Settings:
    """One Settings from parsed arguments; SettingsError names what is wrong."""
    values = dict(extra)
    for name in ("frontend", "backend", "service", "logfile", "debug",
                 "max_age", "max_age_delta", "prefetch", "nice", "liveness",
                 "exit_with_parent"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if getattr(args, "heartbeat", None) is not None:
        seconds = parse_heartbeat(args.heartbeat)
        if seconds is not None:
            values["heartbeat"] = seconds
    if getattr(args, "timeout", None) is not None:
        values["worker_timeout"] = args.timeout
    if getattr(args, "params", None):
        values["params"] = parse_params(args.params)
    return Settings(**values)


def parse_or_exit(parser, build, argv):
    """Parse argv and build settings; bad values exit 2 with a usage message."""
    args = parser.parse_args(argv)
    try:
        return args, build(args)
    except (SettingsError, ValueError) as exc:
        parser.error(str(exc))


__all__ = ["argparse", "add_endpoint_options", "add_logging_options",
           "add_worker_options", "settings_from", "parse_or_exit"]
