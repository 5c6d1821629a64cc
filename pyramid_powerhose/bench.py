"""``powerhose-bench``: should I use powerhose for this job?

Runs a job in T threads in-process, then through a cluster of W workers,
and prints both throughputs, the speed-up and the per-job overhead.  With
``--sweep`` it does so for the built-in GIL-holding job (an HMAC chain) at
several durations and reports the break-even duration: the shortest job
for which offloading beats in-process threads.

The seed's rule of thumb was "unless your job takes more than 20 ms, it
will probably not speed it up"; this tool measures the real figure on the
machine it runs on.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass

from .job import Job

BUILTIN_TARGET = "pyramid_powerhose.bench:hmac_chain"
SWEEP_MS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 20)


# HMAC-SHA256 (RFC 2104) built from hashlib: on short messages hashlib keeps
# the GIL, whereas hmac.digest() releases it around OpenSSL's HMAC call, so
# in-process threads would overlap and the comparison would flatter threads.
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_MESSAGE = b"powerhose bench"


def hmac_chain(job):
    """The built-in GIL-holding job: ``rounds`` chained HMAC-SHA256s of the data.

    ``job.data`` is ``b"<rounds>"`` or ``b"<rounds>:<payload>"``; each round
    keys an HMAC of a fixed message with the previous round's digest.
    """
    rounds, _, payload = job.data.partition(b":")
    key = payload or b"powerhose"
    sha256 = hashlib.sha256
    for _ in range(int(rounds)):
        block = key.ljust(64, b"\0") if len(key) <= 64 else sha256(key).digest().ljust(64, b"\0")
        inner = sha256(block.translate(_IPAD) + _MESSAGE).digest()
        key = sha256(block.translate(_OPAD) + inner).digest()
    return key


def rounds_per_ms(sample_ms=200):
    """How many HMAC rounds take one millisecond here (single thread)."""
    rounds = 1000
    while True:
        started = time.perf_counter()
        hmac_chain(Job(b"%d" % rounds))
        elapsed = (time.perf_counter() - started) * 1000
        if elapsed >= sample_ms:
            return rounds / elapsed
        rounds *= 2


@dataclass
class Result:
    label: str
    jobs: int
    seconds: float

    @property
    def rate(self):
        return self.jobs / self.seconds


def _split(total, parts):
    """``total`` as ``parts`` near-equal whole shares."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def run_threads(call, data, jobs, threads, progress=None):
    """``jobs`` calls of ``call(data)`` from ``threads`` threads looping, as a
    server's threads would; returns the seconds taken and the results.

    On Ctrl-C (or SIGTERM raised as SystemExit) the threads finish the call
    they are in and stop before the exception goes on, so the caller can
    close their sockets: closing one under a waiting thread aborts libzmq.
    """
    shares = _split(jobs, threads)
    results = [None] * threads
    errors = []
    start = threading.Barrier(threads + 1)
    stopping = threading.Event()

    def loop(i):
        try:
            call(data)  # warm-up: connections, caches
            start.wait()
            out = []
            for _ in range(shares[i]):
                if stopping.is_set():
                    return
                out.append(call(data))
                if progress is not None:
                    progress.update(1)
            results[i] = out
        except threading.BrokenBarrierError:
            pass  # stopped, or another thread failed while warming up
        except Exception as exc:  # raised in the calling thread, below
            errors.append(exc)
            stopping.set()
            start.abort()

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    try:
        start.wait()
        started = time.perf_counter()
        for worker in workers:
            worker.join()
    except threading.BrokenBarrierError:  # a thread failed while warming up
        for worker in workers:
            worker.join()
    except BaseException:
        stopping.set()
        start.abort()  # threads still warming up wake with BrokenBarrierError
        for worker in workers:
            worker.join()
        raise
    if errors:
        raise errors[0]
    return time.perf_counter() - started, [r for out in results for r in out]


def overhead(local, remote, data, count):
    """Median job time, and median extra latency of ``remote``, timed in alternation."""
    durations, differences = [], []
    for _ in range(count):
        started = time.perf_counter()
        local(data)
        middle = time.perf_counter()
        remote(data)
        durations.append(middle - started)
        differences.append((time.perf_counter() - middle) - (middle - started))
    return statistics.median(durations), statistics.median(differences)


@dataclass
class Comparison:
    data: bytes
    local: Result
    remote: Result
    job_ms: float  # one job's duration, measured in-process
    overhead_us: float
    cpu_ms: float = 0.0  # CPU time per job of the in-process run itself

    @property
    def speedup(self):
        return self.remote.rate / self.local.rate


MIN_JOBS_PER_THREAD = 50  # per turn: fewer, and the runs' ramps and tails would count


def compare(target, client, data, jobs, threads, latency_samples=50, progress=None):
    """One job, run in-process and through powerhose, side by side.

    The two runs take turns (A B B A ...) in up to four parts, so that a
    machine whose speed drifts within seconds slows both alike, and the
    in-process parts' CPU time gives the job's size as it ran.
    """
    def local(payload):
        result = target(Job(payload))
        return result.encode() if isinstance(result, str) else result

    def remote(payload):
        return client.execute(payload)

    turns = max(1, min(4, jobs // (threads * MIN_JOBS_PER_THREAD)))
    shares = _split(jobs, turns)
    seconds = {local: 0.0, remote: 0.0}
    results = {local: [], remote: []}
    local_cpu = 0.0
    for turn, share in enumerate(shares):
        for call in ((local, remote) if turn % 2 == 0 else (remote, local)):
            cpu = time.process_time()
            elapsed, out = run_threads(call, data, share, threads, progress)
            if call is local:
                local_cpu += time.process_time() - cpu
            seconds[call] += elapsed
            results[call] += out
    if results[remote] != results[local]:
        raise AssertionError("results through powerhose differ from in-process results")
    duration, extra = overhead(local, remote, data, latency_samples)
    return Comparison(data, Result("in-process", jobs, seconds[local]),
                      Result("powerhose", jobs, seconds[remote]), duration * 1000, extra * 1e6,
                      local_cpu / (jobs + threads * turns) * 1000)  # with warm-up calls


BUDGET_MS = 2000.0  # single-thread work per measurement, by default
MIN_JOBS = 400  # with 4 threads, two turns each way: one turn is open to drift


def jobs_for(ms):
    """Jobs for about BUDGET_MS of work at ``ms`` each: at least MIN_JOBS, at most 20,000."""
    return min(20_000, max(MIN_JOBS, int(BUDGET_MS / max(ms, 1e-3))))


def job_ms(target, data, samples=5):
    """One call's duration in milliseconds, the median of a few (to size the run)."""
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        target(Job(data))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def break_even(points):
    """The shortest duration where speed-up crosses 1, interpolated on a log scale."""
    points = sorted(points)
    if points and points[0][1] >= 1:
        return points[0][0]
    for (d0, s0), (d1, s1) in zip(points, points[1:]):
        if s0 < 1 <= s1:
            fraction = (1 - s0) / (s1 - s0)
            return math.exp(math.log(d0) + fraction * (math.log(d1) - math.log(d0)))
    return None


def cpu_model():
    """The CPU's name, as benchmark reports must say what they ran on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine():
    import zmq

    return (f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, pyzmq {zmq.__version__} "
            f"(libzmq {zmq.zmq_version()}), {time.strftime('%Y-%m-%d %H:%M %Z')}")


def table(headers, rows):
    """A plain-text table that is also a reStructuredText simple table."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(c.ljust(w) for c, w in zip(cells[0], widths)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join([*lines, rule])


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
                        help="a few jobs per measurement (a smoke test, not a benchmark)")
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
    from .cluster import get_cluster
    from .client import Client
    from .worker import resolve_target

    target = resolve_target(args.target)
    builtin = args.target == BUILTIN_TARGET
    speed = rounds_per_ms() if builtin else None
    print(f"machine: {machine()}")
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
    extremes = ", and the lowest and highest round" if rounds > 1 else ""
    print(f"(median of {rounds} rounds per job size{extremes}; "
          "CPU ms: the in-process runs' CPU time per job)")
    even = break_even(points)
    if even is None:
        print("break-even: not reached in this sweep")
    else:
        print(f"break-even: {even:.2f} ms (offloading wins for jobs longer than this)")
    if rounds > 1:
        print(_single_round_break_evens(single_rounds))
    if args.plot:
        _plot(points, even, args)
        print(f"plot written to {args.plot}")
    return 0


def _single_round_break_evens(sweeps):
    """How far one round per size (``--rounds 1``) would have put the break-even."""
    found = sorted(e for e in map(break_even, sweeps) if e is not None)
    missed = len(sweeps) - len(found)
    text = "one round per size, as --rounds 1 would measure: "
    if found:
        text += f"break-even {found[0]:.2f} to {found[-1]:.2f} ms over the {len(sweeps)} rounds"
        if missed:
            text += f" ({missed} not reached)"
    else:
        text += f"break-even not reached in any of the {len(sweeps)} rounds"
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
