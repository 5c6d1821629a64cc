"""``powerhose-worker TARGET``: serve a Python callable as a powerhose worker."""

import argparse
import logging
import os
import sys

from .. import logs
from ..exc import SettingsError, TargetError
from ..settings import add_arguments, from_arguments
from ..worker import Worker
from . import load_target, parse_or_exit

log = logging.getLogger("pyramid_powerhose.worker")


def make_parser():
    parser = argparse.ArgumentParser(
        prog="powerhose-worker",
        description="Run jobs for a powerhose broker by calling TARGET(job).")
    add_arguments(parser, "worker")
    return parser


def main(argv=None):
    parser = make_parser()
    args, settings = parse_or_exit(parser, lambda a: from_arguments(a, "worker"), argv)
    logs.configure(settings.logfile, settings.debug)
    try:
        target = load_target(settings.target)
    except TargetError as exc:
        if settings.logfile != "stderr":  # there, the line below says it
            log.error("%s", exc)
        print(f"powerhose-worker: {exc}", file=sys.stderr)
        return 1
    if settings.nice:
        # Jobs are the batch work of the machine; the broker and the web
        # server's threads wake for microseconds at a time and should get a
        # core at once rather than wait for a running job's time slice.
        os.nice(settings.nice)
    try:
        worker = Worker(target, settings)
    except SettingsError as exc:  # found when the worker starts: its CURVE keys
        print(f"powerhose-worker: {exc}", file=sys.stderr)
        return 2
    worker.install_signal_handlers()
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
