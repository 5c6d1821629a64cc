"""``powerhose-worker TARGET``: serve a Python callable as a powerhose worker."""

import argparse
import logging
import os
import sys

from .. import logs
from ..exc import TargetError
from ..worker import Worker, resolve_target
from . import (add_endpoint_options, add_logging_options, add_worker_options, default,
               parse_or_exit, settings_from)

log = logging.getLogger("pyramid_powerhose.worker")


def make_parser():
    parser = argparse.ArgumentParser(
        prog="powerhose-worker",
        description="Run jobs for a powerhose broker by calling TARGET(job).")
    parser.add_argument("target", help="the callable: pkg.module:func or pkg.module.func")
    add_endpoint_options(parser, frontend=False)
    add_worker_options(parser)
    add_logging_options(parser)
    parser.add_argument("--broker-timeout", type=float, default=default("broker_timeout"),
                        help="exit (status 2) after this many seconds without a broker "
                        "(default %(default)s)")
    return parser


def main(argv=None):
    parser = make_parser()
    args, settings = parse_or_exit(parser, lambda a: settings_from(
        a, target=a.target, broker_timeout=a.broker_timeout), argv)
    logs.configure(settings.logfile, settings.debug)
    try:
        target = resolve_target(settings.target)
    except TargetError as exc:
        log.error("%s", exc)
        print(f"powerhose-worker: {exc}", file=sys.stderr)
        return 1
    if settings.nice:
        # Jobs are the batch work of the machine; the broker and the web
        # server's threads wake for microseconds at a time and should get a
        # core at once rather than wait for a running job's time slice.
        os.nice(settings.nice)
    worker = Worker(target, settings)
    worker.install_signal_handlers()
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
