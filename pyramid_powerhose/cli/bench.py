"""``powerhose-bench``: should I use powerhose for this job?

Runs a job in T threads in-process, then through a cluster of W workers,
and prints both throughputs, the speed-up and the per-job overhead.  With
``--sweep`` it does so for the built-in GIL-holding job (an HMAC chain) at
several durations and reports the break-even duration: the shortest job
for which offloading beats in-process threads.  The measuring itself is
:mod:`pyramid_powerhose.bench`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..bench import (BUILTIN_TARGET, break_even, compare, describe_machine, job_ms, jobs_for,
                     rounds_per_ms, single_round_break_evens, table)
from ..client import Client
from ..cluster import get_cluster
from ..exc import TargetError
from . import load_target

SWEEP_MS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 20)


def _progress(total, quiet):
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the [bench] extra
        return None
    return tqdm(total=total, unit="job", file=sys.stderr, leave=False)


def make_parser():
    parser = argparse.ArgumentParser(
        prog="powerhose-bench",
        description="Compare a job run in threads in-process with the same job "
                    "run through a powerhose cluster.")
    parser.add_argument("--target", default=BUILTIN_TARGET,
                        help="the job callable, pkg.module:func (default: the built-in "
                        "GIL-holding HMAC chain)")
    parser.add_argument("--data", help="job data for --target (default for the built-in "
                        "job: rounds for --duration-ms)")
    parser.add_argument("--duration-ms", type=float, default=1.0,
                        help="built-in job: CPU milliseconds per job (default %(default)s)")
    parser.add_argument("--threads", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="workers (default: the number of cores, %(default)s)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="jobs per measurement (default: about 2 s of single-thread "
                        "work, 400 to 20,000 jobs)")
    parser.add_argument("--sweep", action="store_true",
                        help="built-in job at %s ms; report the break-even duration"
                        % ", ".join(map(str, SWEEP_MS)))
    parser.add_argument("--plot", metavar="FILE.png",
                        help="with --sweep: draw speed-up against job duration")
    parser.add_argument("--rounds", type=int, default=None,
                        help="measurements per job size, the median is reported "
                        "(default 1, or 3 with --sweep): machines are noisy")
    parser.add_argument("--quick", action="store_true",
                        help="a few jobs per measurement, and with --sweep the four "
                        "shortest durations only, one round: a smoke test, not a benchmark")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    """``powerhose-bench``: Ctrl-C or SIGTERM stops the runs and the cluster."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _on_sigterm(*_):
    raise SystemExit(143)  # unwinds like Ctrl-C: the cluster is stopped on the way out


def _main(argv):
    args = make_parser().parse_args(argv)
    if args.plot and not args.sweep:
        make_parser().error("--plot needs --sweep")
    if args.threads < 1 or args.workers < 1 or (args.rounds is not None and args.rounds < 1):
        make_parser().error("--threads, --workers and --rounds must be at least 1")
    try:
        target = load_target(args.target, os.getcwd())  # where the workers import it from
    except TargetError as exc:
        print(f"powerhose-bench: {exc}", file=sys.stderr)
        return 1
    builtin = args.target == BUILTIN_TARGET
    speed = rounds_per_ms() if builtin else None
    print(describe_machine())
    print(f"{args.threads} threads in-process vs {args.workers} powerhose workers; "
          f"target {args.target}")
    cluster = get_cluster(args.target, numprocesses=args.workers, background=True,
                          working_dir=os.getcwd(), timeout=0)
    cluster.start()
    try:
        with Client(frontend=cluster.frontend, timeout=60) as client:
            if args.sweep:
                return _sweep(args, target, client, speed)
            if builtin:
                data = (args.data or b"%d" % max(1, round(speed * args.duration_ms)))
            else:
                data = (args.data or "").encode()
            data = data if isinstance(data, bytes) else data.encode()
            jobs = args.jobs or (20 if args.quick else jobs_for(job_ms(target, data)))
            rounds = args.rounds or 1
            bar = _progress(jobs * 2 * rounds, args.quiet)
            runs = sorted((compare(target, client, data, jobs, args.threads,
                                   5 if args.quick else 50, bar) for _ in range(rounds)),
                          key=lambda c: c.speedup)
            result = runs[len(runs) // 2]
            if bar is not None:
                bar.close()
            _print_one(result)
            return 0
    finally:
        cluster.stop()


def _print_one(c):
    print(table(
        ["run", "jobs", "total s", "jobs/s"],
        [[r.label, r.jobs, f"{r.seconds:.3f}", f"{r.rate:.0f}"] for r in (c.local, c.remote)]))
    print(f"speed-up: {c.speedup:.2f}x   job: {c.job_ms:.3f} ms   "
          f"per-job overhead: {c.overhead_us:.0f} us")


def _sweep(args, target, client, speed):
    rows, points = [], []
    durations = SWEEP_MS[:4] if args.quick else SWEEP_MS
    plan = [(ms, args.jobs or (20 if args.quick else jobs_for(ms))) for ms in durations]
    rounds = args.rounds or (1 if args.quick else 3)
    bar = _progress(sum(jobs * 2 * rounds for _, jobs in plan), args.quiet)
    single_rounds = [[] for _ in range(rounds)]  # round i of every size: a sweep of one round
    for ms, jobs in plan:
        if not args.quick:  # again: a virtual machine's speed drifts within minutes
            speed = rounds_per_ms()
        data = b"%d" % max(1, round(speed * ms))
        runs = [compare(target, client, data, jobs, args.threads, 5 if args.quick else 30, bar)
                for _ in range(rounds)]
        for sweep, run in zip(single_rounds, runs):
            sweep.append((run.cpu_ms, run.speedup))
        runs.sort(key=lambda c: c.speedup)
        c = runs[len(runs) // 2]  # the median round
        points.append((c.cpu_ms, c.speedup))
        spread = f"{runs[0].speedup:.2f}-{runs[-1].speedup:.2f}x" if rounds > 1 else "-"
        rows.append([f"{ms:g}", f"{c.cpu_ms:.3f}", jobs, f"{c.local.rate:.0f}",
                     f"{c.remote.rate:.0f}", f"{c.speedup:.2f}x", spread,
                     f"{c.overhead_us:.0f}"])
    if bar is not None:
        bar.close()
    print(table(["job ms", "CPU ms", "jobs", "in-process jobs/s", "powerhose jobs/s",
                 "speed-up", "rounds", "overhead us"], rows))
    measured = (f"median of {rounds} rounds per job size, and the lowest and highest round"
                if rounds > 1 else "one round per job size")
    print(f"({measured}; CPU ms: the in-process runs' CPU time per job)")
    even = break_even(points)
    if even is None:
        print("break-even: not reached in this sweep")
    else:
        print(f"break-even: {even:.2f} ms (offloading wins for jobs longer than this)")
    if rounds > 1:
        print(_single_round_text(*single_round_break_evens(single_rounds)))
    if args.plot:
        _plot(points, even, args)
        print(f"plot written to {args.plot}")
    return 0


def _single_round_text(found, missed):
    """How far one round per size (``--rounds 1``) would have put the break-even."""
    rounds = len(found) + missed
    text = "one round per size, as --rounds 1 would measure: "
    if found:
        text += f"break-even {found[0]:.2f} to {found[-1]:.2f} ms over the {rounds} rounds"
        if missed:
            text += f" ({missed} not reached)"
    else:
        text += f"break-even not reached in any of the {rounds} rounds"
    return text


def _plot(points, even, args):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    points = sorted(points)  # by CPU ms: drift can swap two rows' sizes
    figure, axes = pyplot.subplots(figsize=(7, 4))
    axes.plot([p[0] for p in points], [p[1] for p in points], marker="o",
              label=f"{args.workers} workers vs {args.threads} threads")
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    if even is not None:
        axes.axvline(even, color="tab:red", linestyle=":",
                     label=f"break-even {even:.2f} ms")
    axes.set_xscale("log")
    axes.set_xlabel("CPU time per job (ms, GIL held)")
    axes.set_ylabel("speed-up (powerhose / in-process)")
    axes.set_title("powerhose-bench --sweep")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
