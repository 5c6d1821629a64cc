"""``powerhose-broker``: run the broker, or check whether one runs."""

import argparse
import logging
import sys

from .. import logs
from ..broker import Broker
from ..client import Client
from ..exc import DuplicateBrokerError
from . import add_endpoint_options, add_logging_options, default, parse_or_exit, settings_from

log = logging.getLogger("pyramid_powerhose.broker")


def make_parser():
    parser = argparse.ArgumentParser(
        prog="powerhose-broker",
        description="Majordomo (7/MDP) broker between powerhose clients and workers.")
    add_endpoint_options(parser)
    add_logging_options(parser)
    parser.add_argument("--check", action="store_true",
                        help="print the pid of the broker serving --frontend and exit 0, "
                        "or exit 1 if none answers")
    parser.add_argument("--max-job-size", type=int, default=default("max_job_size"),
                        help="largest job data in bytes (default %(default)s)")
    parser.add_argument("--no-worker-timeout", type=float,
                        default=default("no_worker_timeout"),
                        help="seconds a job waits for a service that has no worker before "
                        "NoWorkerError (default %(default)s)")
    parser.add_argument("--grace", type=float, default=default("grace"),
                        help="seconds to finish accepted jobs on SIGTERM (default %(default)s)")
    return parser


def main(argv=None):
    parser = make_parser()
    args, settings = parse_or_exit(parser, lambda a: settings_from(
        a, max_job_size=a.max_job_size, no_worker_timeout=a.no_worker_timeout,
        grace=a.grace), argv)
    if args.check:
        return check(settings)
    logs.configure(settings.logfile, settings.debug)
    try:
        run(settings)
    except DuplicateBrokerError as exc:
        log.error("%s", exc)
        print(f"powerhose-broker: {exc}", file=sys.stderr)
        return 1
    log.info("broker stopped")
    return 0


def run(settings):
    broker = Broker(settings)
    broker.bind()
    broker.install_signal_handlers()
    try:
        broker.run()
    finally:
        broker.close()


def check(settings):
    with Client(settings=settings) as client:
        pid = client.ping(timeout=1.0)
    if pid is None:
        print(f"no broker answers on {settings.frontend}")
        return 1
    print(pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
