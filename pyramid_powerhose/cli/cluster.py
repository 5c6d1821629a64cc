"""``powerhose TARGET``: a broker and workers under Circus, in the foreground.

The quick start: ``powerhose echo_worker.echo`` next to ``echo_worker.py``.
Ctrl-C or SIGTERM stops everything and exits 0.  ``--print-circus-ini``
prints the same cluster as a file for a plain ``circusd`` instead.
"""

import argparse
import signal
import sys

from .. import endpoints, logs, watchers
from ..cluster import get_cluster
from ..exc import ClusterError, SettingsError, TargetError, UnsafeDirectoryError
from ..settings import add_arguments, from_arguments
from . import load_target, parse_or_exit


def make_parser():
    parser = argparse.ArgumentParser(
        prog="powerhose",
        description="Run a powerhose broker and workers calling TARGET(job), under Circus, "
        "until Ctrl-C.")
    add_arguments(parser, "cluster")
    parser.add_argument("--print-circus-ini", action="store_true",
                        help="print a circus ini file running this broker and these "
                        "workers (run it with: circusd FILE) and exit, starting nothing")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:  # powerhose keys DIR NAME...
        from . import keys
        return keys.main(argv[1:])
    if argv[:1] == ["status"]:  # powerhose status [--json | --watch]
        from . import status
        return status.main(argv[1:])
    if argv[:1] == ["metrics"]:  # powerhose metrics --listen HOST:PORT
        from . import metrics
        return metrics.main(argv[1:])
    parser = make_parser()
    args, settings = parse_or_exit(parser, lambda a: from_arguments(a, "cluster"), argv)
    try:
        cluster = get_cluster(settings=settings, background=False)  # endpoints resolved
        if args.print_circus_ini:
            return print_circus_ini(cluster.settings)
        # Here, not in every worker under circus: one line, before anything starts.
        load_target(settings.target, cluster.settings.working_dir)
    except SettingsError as exc:  # no such working_dir
        parser.error(str(exc))
    except (TargetError, UnsafeDirectoryError, ClusterError) as exc:
        print(f"powerhose: {exc}", file=sys.stderr)
        return 1
    logs.configure(settings.logfile, settings.debug)
    # Until serve_forever() takes over, SIGTERM interrupts the start like Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        cluster.launch()
    except ClusterError as exc:
        print(f"powerhose: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    report(cluster)
    try:
        cluster.serve_forever()
    except ClusterError as exc:
        print(f"powerhose: {exc}", file=sys.stderr)
        return 1
    print("powerhose: stopped", flush=True)
    return 0


def print_circus_ini(settings):
    """The cluster as a file for ``circusd``; its command lines are the ones ``powerhose`` runs."""
    endpoint, pubsub = watchers.control_endpoints(settings.frontend, endpoints.runtime_dir)
    for name, value in (("circus endpoint", endpoint), ("circus pubsub endpoint", pubsub)):
        try:
            endpoints.check(value, name)
        except ValueError as exc:
            raise ClusterError(f"{exc}; choose a shorter --frontend") from None
    sys.stdout.write(watchers.circus_ini(settings, endpoint, pubsub))
    return 0


def report(cluster):
    """What runs where, for the user who just started it."""
    pids = cluster.pids()
    settings = cluster.settings
    lines = [
        f"broker pid {pids['broker'][0]}: clients connect to {cluster.frontend}, "
        f"workers to {cluster.backend}",
        f"{len(pids['workers'])} workers running {settings.target} for service "
        f"{settings.service!r} in {settings.working_dir}",
        f"circus pid {pids['circus']}, control endpoint {cluster.endpoint} "
        f"(e.g. circusctl --endpoint {cluster.endpoint} incr workers)",
        "press Ctrl-C to stop",
    ]
    for line in lines:
        print(f"powerhose: {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
