"""``powerhose-broker``: run the broker, or check whether one runs."""

import argparse
import logging
import sys

from .. import endpoints, logs
from ..broker import Broker
from ..client import Client
from ..exc import DuplicateBrokerError, SettingsError, UnsafeDirectoryError
from ..settings import add_arguments, from_arguments
from . import parse_or_exit

log = logging.getLogger("pyramid_powerhose.broker")


def make_parser():
    parser = argparse.ArgumentParser(
        prog="powerhose-broker",
        description="Majordomo (7/MDP) broker between powerhose clients and workers.")
    add_arguments(parser, "broker")
    parser.add_argument("--check", action="store_true",
                        help="print the pid of the broker serving --frontend and exit 0, "
                        "or exit 1 if none answers")
    parser.add_argument("--print-endpoint", choices=("frontend", "backend"),
                        help="print the endpoint this broker would bind for clients "
                        "(frontend) or workers (backend), e.g. for a worker's --backend, "
                        "and exit, starting nothing")
    return parser


def main(argv=None):
    parser = make_parser()
    args, settings = parse_or_exit(parser, lambda a: from_arguments(a, "broker"), argv)
    if args.print_endpoint:
        return print_endpoint(settings, args.print_endpoint)
    if args.check:
        return check(settings)
    logs.configure(settings.logfile, settings.debug)
    try:
        run(settings)
    except DuplicateBrokerError as exc:
        log.error("%s", exc)
        print(f"powerhose-broker: {exc}", file=sys.stderr)
        return 1
    except SettingsError as exc:  # found when the broker starts: keys, exposure
        print(f"powerhose-broker: {exc}", file=sys.stderr)
        return 2
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


def print_endpoint(settings, name):
    """The default resolved as the broker resolves it: where it binds, nothing else."""
    try:
        print(endpoints.resolve(getattr(settings, name), name))
    except UnsafeDirectoryError as exc:
        print(f"powerhose-broker: {exc}", file=sys.stderr)
        return 1
    return 0


def check(settings):
    with Client(settings=settings) as client:
        pid = client.ping(timeout=1.0)
    if pid is None:
        print(f"no broker answers on {client.frontend}")
        return 1
    print(pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
