"""Measuring whether offloading pays: what ``powerhose-bench`` and ``bench/`` share.

The built-in GIL-holding job (:func:`hmac_chain`, also a target for the
docs and the tests), calling threads that loop as a server's would
(:func:`run_threads`), a job run in-process and through powerhose side
by side (:func:`compare`), the break-even duration (:func:`break_even`),
and the header and tables every report prints (:func:`describe_machine`,
:func:`table`).  The command itself is :mod:`pyramid_powerhose.cli.bench`.

The seed's rule of thumb was "unless your job takes more than 20 ms, it
will probably not speed it up"; these measure the real figure on the
machine they run on.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import platform
import signal
import statistics
import threading
import time
from dataclasses import dataclass

from .job import Job

BUILTIN_TARGET = "pyramid_powerhose.bench:hmac_chain"


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
    done = [False] * threads  # each thread's own word that it has returned
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
        finally:
            done[i] = True

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    started = None
    try:
        with _signals_held():
            for worker in workers:
                worker.start()
        try:
            start.wait()
            started = time.perf_counter()
        except threading.BrokenBarrierError:
            pass  # a thread failed while warming up: its error is raised below
        for worker in workers:
            worker.join()
    except BaseException:
        stopping.set()
        start.abort()  # threads still warming up wake with BrokenBarrierError
        # Not join(): on Python 3.11 a join() that a signal interrupts may
        # mark a running thread as finished, and a second join() returns at
        # once while the thread still waits on its socket.
        with _signals_held():
            while not all(done):
                time.sleep(0.01)
        raise
    if errors:
        raise errors[0]
    return time.perf_counter() - started, [r for out in results for r in out]


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until every thread is started and watched.

    Raised between two starts, the exception would leave a started thread
    calling unwatched while its socket is closed.  The threads inherit the
    mask: the signals reach the main thread, as Python delivers them anyway.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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


def single_round_break_evens(sweeps):
    """The break-evens that one round per size (``--rounds 1``) would have given.

    ``sweeps[i]`` is round i of every size, as (CPU ms, speed-up) points;
    returns the break-evens found, lowest first, and how many sweeps found none.
    """
    found = sorted(e for e in map(break_even, sweeps) if e is not None)
    return found, len(sweeps) - len(found)


# -- what every report prints ------------------------------------------------------------

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
    """(name, value) pairs saying when and on what a measurement ran.

    Numbers mean something only next to these: on a shared or virtual
    machine the same measurement moves by 2x from one minute to the next.
    """
    import zmq

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("cpu", f"{cpu_model()}, {cores} cores"),
        ("system", f"{platform.system()} {platform.release()}, load average "
                   + " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("zmq", f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}"),
    ]


def describe_machine(rst=False):
    """The header of a report: one line per item, or one RST sentence."""
    pairs = machine()
    if rst:
        return "Measured " + "; ".join(f"{name}: {value}" for name, value in pairs) + "."
    return "\n".join(f"{name:8}{value}" for name, value in pairs)


def table(headers, rows):
    """A reStructuredText simple table, as readable in a terminal as in a document.

    Columns of figures (every cell starts with a digit, a sign or a
    bracket, or is empty) are aligned on the right, the others on the left.
    """
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    figures = [i > 0 and all(not row[i] or row[i][0] in "0123456789+-[" for row in cells[1:])
               for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if right else c.ljust(w)
                         for c, w, right in zip(row, widths, figures)).rstrip()

    rule = "  ".join("=" * w for w in widths)
    return "\n".join([rule, line(cells[0]), rule, *map(line, cells[1:]), rule])
