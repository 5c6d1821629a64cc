"""``powerhose metrics --listen HOST:PORT``: the broker's Prometheus exporter.

On each scrape, reads the broker's statistics (``mmi.stats``) through a
``Client`` and serves them in Prometheus' text format
(:mod:`pyramid_powerhose.metrics` converts them), so the broker's loop
never speaks HTTP.  A scrape with no broker answers 200 with
``powerhose_up 0``.  Binds only the address it is given; a bad one exits 2.
"""

import argparse
import logging
import os
import signal
import socket
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .. import logs
from ..settings import add_arguments, from_arguments
from . import parse_or_exit

log = logging.getLogger(__name__)

STATS_TIMEOUT = 2.0  # seconds: a broker answers mmi.stats at once, or not at all
REQUEST_TIMEOUT = 10.0  # seconds a scraper may take to send its request
PARENT_CHECK_INTERVAL = 0.5  # seconds between looks at the parent (--exit-with-parent)


def make_parser():
    parser = argparse.ArgumentParser(
        prog="powerhose metrics",
        description="Serve the broker's statistics as Prometheus metrics (powerhose_*), "
        "read from the broker on each scrape.")
    # The default is metrics.DEFAULT_LISTEN, not imported here: the parser
    # (and --help, and the docs) must work without prometheus_client.
    parser.add_argument("--listen", metavar="HOST:PORT", default=None,
                        help="the address to serve the metrics on, any path "
                        "(default: 127.0.0.1:9464)")
    add_arguments(parser, "status")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop when the parent process dies (a cluster's watcher)")
    return parser


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT  # a client that sends nothing does not block the next scrape

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)


class _Stopped(Exception):
    """SIGTERM or SIGINT, or the parent is gone: stop serving, exit 0."""


class _Server(WSGIServer):
    """One request at a time, in the main thread: the client's socket is this thread's.

    A signal only marks the server ``stopping``; the loop stops between
    requests.  Raised from the signal handler, the exception could land
    inside a request, where socketserver and wsgiref catch whatever a
    request raises, and the exporter would serve on.
    """

    parent = None  # the pid to outlive no longer than PARENT_CHECK_INTERVAL
    stopping = False

    def stop(self, signum=None, frame=None):
        self.stopping = True

    def service_actions(self):
        if self.stopping:
            raise _Stopped
        if self.parent is not None and os.getppid() != self.parent:
            log.warning("parent process %d is gone; stopping", self.parent)
            raise _Stopped


class _Server6(_Server):
    address_family = socket.AF_INET6


def main(argv=None):
    parser = make_parser()
    args, settings = parse_or_exit(parser, lambda a: from_arguments(a, "status"), argv)
    try:  # prometheus_client: the [metrics] extra
        from prometheus_client import CollectorRegistry, make_wsgi_app

        from ..metrics import DEFAULT_LISTEN, BrokerCollector, parse_listen
    except ImportError as exc:
        print(f"powerhose metrics: {exc}", file=sys.stderr)
        return 1
    try:
        host, port = parse_listen(args.listen or DEFAULT_LISTEN)
    except ValueError as exc:
        print(f"powerhose metrics: {exc}", file=sys.stderr)
        return 2
    from ..client import Client

    logs.configure("stderr")
    parent = os.getppid() if args.exit_with_parent else None
    with Client(settings=settings) as client:
        registry = CollectorRegistry()
        registry.register(BrokerCollector(lambda: client.stats(timeout=STATS_TIMEOUT)))
        server_class = _Server6 if ":" in host else _Server
        try:
            server = make_server(host, port, make_wsgi_app(registry), server_class, _Handler)
        except OSError as exc:
            print(f"powerhose metrics: cannot listen on {host}:{port}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
        server.parent = parent
        signal.signal(signal.SIGTERM, server.stop)
        signal.signal(signal.SIGINT, server.stop)
        log.info("serving the metrics of the broker on %s at http://%s:%d/metrics",
                 client.frontend, host, port)
        try:
            server.serve_forever(poll_interval=PARENT_CHECK_INTERVAL)
        except _Stopped:
            pass
        finally:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
