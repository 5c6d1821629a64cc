"""``powerhose status``: what the broker is doing, once, as JSON, or live.

Reads the broker's statistics (``mmi.stats``) through a ``Client``; exits 1
with one line when no broker answers.
"""

import argparse
import json
import sys
import time

from ..client import Client
from ..exc import PowerhoseError
from ..settings import add_arguments, from_arguments
from ..status import render
from . import parse_or_exit

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: a refresh in place
STATS_TIMEOUT = 2.0  # seconds: a broker answers mmi.stats at once, or not at all


def make_parser():
    parser = argparse.ArgumentParser(
        prog="powerhose status",
        description="Per service: workers idle and busy, queue, jobs/s, wait and run "
        "times, errors; per worker: jobs, age, last job; the broker's pid and uptime.")
    add_arguments(parser, "status")
    parser.add_argument("--json", action="store_true",
                        help="print the broker's statistics as one JSON object")
    parser.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                        help="refresh in place every SECONDS (default 1) until Ctrl-C")
    return parser


def main(argv=None):
    parser = make_parser()
    args, settings = parse_or_exit(parser, lambda a: from_arguments(a, "status"), argv)
    with Client(settings=settings) as client:
        try:
            while True:
                each = _read(client)
                if not any(each.values()):
                    print(f"powerhose status: no broker answers on "
                          f"{' '.join(each) or client.frontend}", file=sys.stderr)
                    return 1
                print((CLEAR if args.watch else "") + _show(each, args.json), flush=True)
                if not args.watch:
                    return 0
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def _read(client) -> dict:
    """Each broker's statistics by frontend (None: no answer)."""
    if len(client.frontends) > 1:
        return client.broker_stats(timeout=STATS_TIMEOUT)
    try:
        return {client.frontend: client.stats(timeout=STATS_TIMEOUT)}
    except PowerhoseError:
        return {client.frontend: None}


def _show(each: dict, as_json: bool) -> str:
    """One broker: its report, or its stats as JSON; several: each in turn, by
    frontend (JSON: one object, by frontend)."""
    if len(each) == 1:
        (stats,) = each.values()
        return json.dumps(stats) if as_json else render(stats)
    if as_json:
        return json.dumps(each)
    return "\n\n".join(f"== {frontend}: no answer" if stats is None else
                        f"== {frontend}\n{render(stats)}" for frontend, stats in each.items())


if __name__ == "__main__":
    sys.exit(main())
