#!/usr/bin/env python
"""Where a job's CPU goes, thread by thread, while the cluster is saturated.

``powerhose-bench`` says whether offloading pays; this says what it costs
and who pays it.  Client threads in this process run the built-in
GIL-holding job (``pyramid_powerhose.bench:hmac_chain``) through a real
``powerhose-broker`` and real ``powerhose-worker`` processes (at the
cluster's default ``nice``), as the sweep does,
and every thread of every process is read from ``/proc`` before and after
each round:

* CPU time per job (user + system: the kernel's split between the two
  is sampled at each tick, too coarse to report here);
* sleeps per job: voluntary context switches, each a wake-up later;
* preemptions per job: involuntary context switches;
* the share of the machine left idle.

The workers run the job through ``timed_job`` below, which returns the
CPU time the job itself took instead of its digest, so that the workers'
main threads can be split into the job and what the worker adds (the
machine's speed drifts within seconds here: a job timed apart from the
round would not do).  Each round also runs the same jobs in the same
threads in-process, in turn with the cluster, so that the report can say
how much longer the job itself took in a worker, where both cores are
busy and other threads preempt it, than alone under the GIL.  Linux only
(``/proc``); the clock tick is 10 ms, so a round needs a few thousand
jobs for a resolution of a few microseconds per job.

    python bench/threads.py                      # 0.5 ms jobs, 4 threads, 2 workers, 3 rounds
    python bench/threads.py --ms 2 --jobs 1500   # longer jobs
    python bench/threads.py --rst                # the table as RST, for README.rst
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import harness
from harness import Processes

from pyramid_powerhose.bench import describe_machine, hmac_chain, rounds_per_ms, table
from pyramid_powerhose.job import Job
from pyramid_powerhose.settings import Settings

HERE = os.path.dirname(os.path.abspath(__file__))
TICK = os.sysconf("SC_CLK_TCK")

# Rows of the report: (process, thread kind), in pipeline order.
ROWS = [
    (("client", "app"), "client: the calling threads"),
    (("client", "io"), "client: libzmq I/O thread"),
    (("broker", "main"), "broker: message loop"),
    (("broker", "io"), "broker: libzmq I/O thread"),
    (("worker", "io"), "workers: libzmq I/O threads"),
    (("worker", "main"), "workers: main threads, less the job"),
    (("any", "other"), "other threads, all processes"),
]
WORKER_MAIN = ("worker", "main")


def thread_counters(pid, tid):
    """(user s, system s, voluntary switches, involuntary switches) of one thread."""
    base = f"/proc/{pid}/task/{tid}"
    with open(f"{base}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    switches = {}
    with open(f"{base}/status") as f:
        for line in f:
            if "ctxt_switches:" in line:
                name, value = line.split(":")
                switches[name] = int(value)
    return (int(fields[11]) / TICK, int(fields[12]) / TICK,
            switches["voluntary_ctxt_switches"], switches["nonvoluntary_ctxt_switches"])


def kind_of(pid, tid):
    if tid == pid:
        return "main"
    with open(f"/proc/{pid}/task/{tid}/comm") as f:
        return "io" if f.read().startswith("ZMQbg/IO") else "other"


def snapshot(processes, app_tids):
    """{(process, kind): [user, system, voluntary, involuntary]} summed over threads."""
    totals = {}
    for name, pid in processes:
        for tid in map(int, os.listdir(f"/proc/{pid}/task")):
            try:
                kind = "app" if tid in app_tids else kind_of(pid, tid)
                counters = thread_counters(pid, tid)
            except FileNotFoundError:  # a thread that just ended
                continue
            if name == "client" and kind == "main":
                continue  # this script's own thread: it only waits for the round
            row = totals.setdefault(("any" if kind == "other" else name, kind),
                                    [0.0, 0.0, 0, 0])
            for i, value in enumerate(counters):
                row[i] += value
    return totals


def idle_seconds():
    """Idle CPU seconds of the whole machine since boot (all cores)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[4]) / TICK


def timed_job(job):
    """The workers' target: the built-in job, answering the thread CPU
    nanoseconds it took."""
    started = time.thread_time_ns()
    hmac_chain(job)
    return b"%d" % (time.thread_time_ns() - started)


def in_process(data):
    """``timed_job`` called in this process, as the workers call it."""
    return timed_job(Job(data))


class Callers:
    """``threads`` long-lived client threads; each knows its kernel thread id."""

    def __init__(self, call, data, threads):
        self.call, self.data, self.threads = call, data, threads
        self.tids = set()
        self.go = threading.Semaphore(0)
        self.done = threading.Semaphore(0)
        self.share = 0
        self.job_ns = [0] * threads  # per thread: CPU the jobs took in the workers
        self.error = None
        self.stopping = False
        self.pool = [threading.Thread(target=self._run, args=(i,), daemon=True)
                     for i in range(threads)]
        for thread in self.pool:
            thread.start()

    def _run(self, index):
        self.tids.add(threading.get_native_id())
        while True:
            self.go.acquire()
            if self.stopping:
                return
            try:
                total = 0
                for _ in range(self.share):
                    total += int(self.call(self.data))
                self.job_ns[index] = total
            except Exception as exc:  # reported by run()
                self.error = exc
            self.done.release()

    def run(self, jobs, call=None):
        """Runs ``jobs`` jobs spread over the threads (through ``call``, or the
        one given at first); returns the seconds taken and the CPU seconds the
        jobs themselves took."""
        first, self.call = self.call, call or self.call
        try:
            return self._run_all(jobs)
        finally:
            self.call = first

    def _run_all(self, jobs):
        self.share = jobs // self.threads
        started = time.perf_counter()
        for _ in self.pool:
            self.go.release()
        for _ in self.pool:
            self.done.acquire()
        if self.error is not None:
            raise self.error
        return time.perf_counter() - started, sum(self.job_ns) / 1e9

    def close(self):
        self.stopping = True
        for _ in self.pool:
            self.go.release()
        for thread in self.pool:
            thread.join(5)


def measure(callers, processes, jobs, local_first):
    """One round: per-job counters of every row, jobs/s, idle share, job CPU,
    and the same jobs in-process, in turn with the cluster."""
    if local_first:
        local = callers.run(jobs, in_process)
    before, idle = snapshot(processes, callers.tids), idle_seconds()
    seconds, job_seconds = callers.run(jobs)
    after, idle = snapshot(processes, callers.tids), idle_seconds() - idle
    if not local_first:
        local = callers.run(jobs, in_process)
    done = callers.share * callers.threads
    rows = {}
    for key, values in after.items():
        start = before.get(key, [0.0, 0.0, 0, 0])
        delta = [a - b for a, b in zip(values, start)]
        rows[key] = {"cpu": (delta[0] + delta[1]) / done * 1e6,
                     "sleeps": delta[2] / done, "preempted": delta[3] / done}
    return {"rows": rows, "rate": done / seconds, "idle": idle / (seconds * os.cpu_count()),
            "job": job_seconds / done * 1e6,
            "local_rate": done / local[0], "local_job": local[1] / done * 1e6}


def report(args, rounds, rst):
    def med(get):
        return statistics.median(get(r) for r in rounds)

    def cell(key, field, minus_job=False):
        return med(lambda r: r["rows"].get(key, {}).get(field, 0.0)
                   - (r["job"] if minus_job else 0.0))

    job = med(lambda r: r["job"])
    body = []
    for key, label in ROWS:
        body.append([label, f"{cell(key, 'cpu', key == WORKER_MAIN):.0f}",
                     f"{cell(key, 'sleeps'):.2f}", f"{cell(key, 'preempted'):.2f}"])
    outside = med(lambda r: sum(r["rows"].get(key, {}).get("cpu", 0.0) for key, _ in ROWS)
                  - r["job"])
    body.append(["all of the above", f"{outside:.0f}", "", ""])
    body.append(["the job itself, in the workers", f"{job:.0f}", "", ""])
    body.append(["the job itself, in-process", f"{med(lambda r: r['local_job']):.0f}", "", ""])
    out = [describe_machine(rst), ""]
    over = f"median of {len(rounds)} rounds" if len(rounds) > 1 else "one round"
    out += [f"{args.threads} client threads, {args.workers} workers, "
            f"{args.jobs} jobs of {args.ms:g} ms per round, {over}: "
            f"{med(lambda r: r['rate']):.0f} jobs/s, the jobs themselves "
            f"{med(lambda r: r['rate'] * r['job'] / 1e4 / os.cpu_count()):.0f}% of the "
            f"machine's time, idle {med(lambda r: r['idle']) * 100:.0f}%.",
            f"In-process, the same jobs in the same threads: "
            f"{med(lambda r: r['local_rate']):.0f} jobs/s; speed-up "
            f"{med(lambda r: r['rate'] / r['local_rate']):.2f}x; the job itself took "
            f"{med(lambda r: r['job'] / r['local_job'] - 1) * 100:+.0f}% in the workers.", ""]
    out.append(table(["CPU outside the job", "us/job", "sleeps/job", "preempted/job"],
                     body))
    return "\n".join(out)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", type=float, default=0.5, help="CPU ms per job (default 0.5)")
    parser.add_argument("--threads", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="workers (default 2)")
    parser.add_argument("--jobs", type=int, default=4000, help="jobs per round (default 4000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--rst", action="store_true",
                        help="the machine header as one sentence, for an RST document")
    args = parser.parse_args(argv)
    if min(args.threads, args.workers, args.rounds) < 1 or args.jobs < args.threads:
        parser.error("--threads, --workers and --rounds must be at least 1, "
                     "--jobs at least --threads")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists("/proc/self/task"):
        sys.exit("threads.py reads /proc: Linux only")
    with harness.private_dir("powerhose-threads-") as run_dir:
        procs = Processes(run_dir)
        client = callers = None
        try:
            data = b"%d" % max(1, round(rounds_per_ms() * args.ms))
            # The workers import timed_job from this file.
            os.environ["PYTHONPATH"] = os.pathsep.join(
                filter(None, [HERE, os.environ.get("PYTHONPATH")]))
            client, broker, workers = harness.start_powerhose(
                procs, f"ipc://{run_dir}/frontend.sock", f"ipc://{run_dir}/backend.sock",
                "threads:timed_job", args.workers, worker_args=["--nice", str(Settings().nice)])
            processes = [("client", os.getpid()), ("broker", broker.pid)]
            processes += [("worker", w.pid) for w in workers]
            callers = Callers(client.execute, data, args.threads)
            callers.run(args.threads * 50)  # warm-up: connections, caches
            callers.run(args.threads * 50, in_process)
            rounds = []
            for r in range(args.rounds):
                rounds.append(measure(callers, processes, args.jobs, local_first=r % 2 == 1))
                harness.say(f"round {r + 1}/{args.rounds}: {rounds[-1]['rate']:.0f} jobs/s")
            print(report(args, rounds, args.rst))
            return 0
        finally:
            if callers is not None:
                callers.close()
            if client is not None:
                client.close()
            procs.close()


if __name__ == "__main__":
    harness.run_script(main)
