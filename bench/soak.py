#!/usr/bin/env python
"""Soak: many small jobs through a real cluster; does anything go wrong, hang or grow?

A broker and workers under Circus (``get_cluster``), client threads sending
numbered echo jobs, each result checked.  Prints the jobs run, wrong
results, typed errors by kind, hung calls (no answer within the timeout
plus a margin) and the broker's RSS and open fds at the start, the middle
and the end; ``--json`` prints one JSON object instead.

    python bench/soak.py                          # 300,000 jobs
    python bench/soak.py --jobs 2000 --json       # smoke run

``bench/killstorm.py`` runs the same while kill -9-ing workers.  Not part
of the test suite; its smoke test is tests/test_reliability_bench.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import threading
import time

from pyramid_powerhose import Client, exc, get_cluster

HERE = os.path.dirname(os.path.abspath(__file__))
HUNG_MARGIN = 5.0  # seconds past its timeout before a call counts as hung


def echo(job):
    """The workers' target (soak:echo, imported from this directory)."""
    return job.data


def broker_sample(pid) -> dict:
    """The broker's resident memory (KiB) and open fds, from /proc."""
    rss = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Load:
    """Client threads that run ``jobs`` numbered echo jobs and count what happens.

    ``more()``, when given, keeps the load going past ``jobs`` for as long as
    it is true: a disturbance that must happen during the load (a kill) is
    then not raced by a load that ends first on a fast machine.
    """

    def __init__(self, client, jobs, threads, timeout, more=None):
        self.client, self.jobs, self.timeout = client, jobs, timeout
        self.more = more or (lambda: False)
        self.lock = threading.Lock()
        self.next_job = 0
        self.done = 0
        self.wrong = 0
        self.errors = collections.Counter()
        self.examples = {}  # error kind -> its first message, for the report
        self.hung = 0
        self.started = {}  # thread -> when its call in progress began
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self):
        for thread in self.threads:
            thread.start()

    def _take(self):
        with self.lock:
            if self.next_job >= self.jobs and not self.more():
                return None
            self.next_job += 1
            return self.next_job

    def _run(self):
        me = threading.get_ident()
        while (number := self._take()) is not None:
            data = b"%d" % number
            self.started[me] = began = time.monotonic()
            outcome = None
            try:
                if self.client.execute(data, timeout=self.timeout) != data:
                    outcome = "wrong"
            except exc.PowerhoseError as error:
                outcome = type(error).__name__
                self.examples.setdefault(outcome, str(error))
            late = time.monotonic() - began > self.timeout + HUNG_MARGIN
            with self.lock:
                del self.started[me]
                self.done += 1
                self.hung += late
                if outcome == "wrong":
                    self.wrong += 1
                elif outcome:
                    self.errors[outcome] += 1

    def wait(self, until_done=None):
        """Until ``until_done`` jobs have an outcome (by default: every thread has
        finished), or a call has hung too long."""
        while until_done is None or self.done < until_done:
            now = time.monotonic()
            with self.lock:
                stuck = [t for t in self.started.values()
                         if now - t > 3 * (self.timeout + HUNG_MARGIN)]
            if stuck or not any(thread.is_alive() for thread in self.threads):
                return
            time.sleep(0.05)

    def still_hung(self) -> int:
        now = time.monotonic()
        with self.lock:
            return sum(now - t > self.timeout + HUNG_MARGIN for t in self.started.values())


def run(args, disturb=None) -> dict:
    """Run the load on a fresh cluster; ``disturb(cluster, stop)`` runs in a thread beside it.

    If ``disturb`` has a ``wants_more()`` method, the load goes on past
    ``args.jobs`` while it says true and the disturbance is still running.
    """
    tmp = tempfile.mkdtemp(prefix="ph-bench-", dir="/tmp")
    cluster = get_cluster("soak:echo", background=True, frontend=f"ipc://{tmp}/front.sock",
                          backend=f"ipc://{tmp}/back.sock", numprocesses=args.workers,
                          working_dir=HERE, heartbeat=args.heartbeat, timeout=args.timeout)
    stop = threading.Event()
    from pyramid_powerhose import broker as engine  # the broker's engine: this tree's

    report = {"engine": "compiled" if engine.COMPILED else "pure Python", "jobs": 0,
              "wrong": 0, "errors": {}, "examples": {}, "hung": 0, "broker": {},
              "disturbance": {}}
    try:
        cluster.launch()
        broker = cluster.pids()["broker"][0]
        report["broker"]["start"] = broker_sample(broker)
        with Client(frontend=cluster.frontend) as client:
            disturber = more = None
            if disturb is not None:
                disturber = threading.Thread(
                    target=lambda: report["disturbance"].update(disturb(cluster, stop)),
                    daemon=True)
                if hasattr(disturb, "wants_more"):
                    more = lambda: disturber.is_alive() and disturb.wants_more()  # noqa: E731
            load = Load(client, args.jobs, args.threads, args.timeout, more)
            if disturber is not None:
                disturber.start()
            load.start()
            load.wait(args.jobs // 2)
            report["broker"]["middle"] = broker_sample(broker)
            load.wait()
            stop.set()
            if disturber is not None:
                disturber.join(30)
            report["broker"]["end"] = broker_sample(broker)
            with load.lock:
                report.update(jobs=load.done, wrong=load.wrong, errors=dict(load.errors),
                              examples=dict(load.examples), hung=load.hung)
            report["hung"] += load.still_hung()
    finally:
        stop.set()
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def parser(description) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--jobs", type=int, default=300_000)
    p.add_argument("--threads", type=int, default=8, help="client threads")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=10.0, help="each job's timeout, seconds")
    p.add_argument("--heartbeat", type=float, default=0.2)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p


def show(report, as_json):
    if as_json:
        print(json.dumps(report))
        return
    print(f"broker engine: {report['engine']}")
    print(f"jobs {report['jobs']}, wrong results {report['wrong']}, hung calls {report['hung']}")
    for kind, count in sorted(report["errors"].items()):
        print(f"  {kind}: {count} (the first: {report['examples'][kind]})")
    for key, value in report["disturbance"].items():
        print(f"{key}: {value}")
    for phase, sample in report["broker"].items():
        print(f"broker {phase}: RSS {sample['rss_kib'] / 1024:.1f} MiB, {sample['fds']} fds")


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    report = run(args)
    show(report, args.json)
    return 1 if report["wrong"] or report["hung"] else 0


if __name__ == "__main__":
    sys.exit(main())
