#!/usr/bin/env python
"""Where a round trip's time goes: CPU, system calls and context switches per job.

``instructions.py`` counts user-space instructions; this counts what the
kernel sees of each process while one thread of this script runs jobs in
a loop, for the direct path and the floor next to it:

* ``powerhose``: ``Client.execute`` on the direct path (2 echo workers
  behind ``powerhose-broker``; the broker only hears of a job when a
  worker goes idle for a few milliseconds, so it stays at 0 here);
* ``relayed``: the same through the broker (workers ``--no-direct``);
* ``1-hop``: a DEALER to a ROUTER echo process, both ends reading and
  sending through ``pyramid_powerhose.multipart`` (``direct.py``'s floor);
* ``1-hop+py``: the same echo with a loop of Python (300 additions, about
  9 us on its own, warm) run per message: what a given amount of Python
  costs inside a round trip rather than in a warm loop.

Per process: CPU time per job (``/proc/PID/task/*/schedstat``: user and
kernel, every thread, precise to the nanosecond), the part of it spent
by the main thread (the one calling our code; the rest is mostly
libzmq's I/O thread) and the kernel's share of it (``/proc/PID/task/*/stat``,
counted in clock ticks: coarse per round, summed over the rounds),
voluntary and involuntary context switches per job
(``/proc/PID/task/*/status``), and,
where ``perf`` can read the kernel's tracepoints, system calls per job
(``perf stat -e raw_syscalls:sys_enter``: counted in the kernel, without
slowing the process as strace would).  The variants take turns, one
block of jobs each per round; medians over rounds.

``--one-cpu`` runs every process on the first CPU this script may use
(``sched_setaffinity``, inherited by the children): no wake-up crosses
CPUs, so what each process costs itself stands out from what the
machine's wake-ups cost.

    python bench/costs.py              # 7 rounds x 3000 jobs: about a minute
    python bench/costs.py --one-cpu    # the same, every process on one CPU
    python bench/costs.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import time

import zmq

import harness
from harness import PAYLOAD, Processes, say

from pyramid_powerhose import multipart
from pyramid_powerhose.bench import describe_machine, table

WORKERS = 2

ECHO = """
import sys, zmq
from pyramid_powerhose import multipart
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
python = sys.argv[2] == "py"

def work():  # 300 additions: about 9 us in a warm loop on a 2-vCPU VM
    total = 0
    for i in range(300):
        total += i
    return total

while True:
    frames = multipart.recv(sock)
    if python:
        work()
    multipart.send(sock, frames)
"""


def task_counts(pid):
    """(CPU ns, voluntary switches, involuntary switches, main thread's CPU
    ns, user ticks, kernel ticks) of all threads of ``pid``."""
    cpu = voluntary = involuntary = main = user = kernel = 0
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(f"{task}/schedstat") as f:
                ns = int(f.read().split()[0])
            cpu += ns
            if task.endswith(f"/{pid}"):
                main = ns
            with open(f"{task}/stat") as f:  # after the ")" of the name: state is field 3
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime, field 14
            kernel += int(fields[12])  # stime, field 15
            with open(f"{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        involuntary += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return cpu, voluntary, involuntary, main, user, kernel


def perf_works() -> bool:
    if shutil.which("perf") is None:
        return False
    done = subprocess.run(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "true"],
                          capture_output=True, text=True)
    return done.returncode == 0 and "not supported" not in done.stderr


class SyscallCount:
    """``perf stat`` counting system calls of ``pid`` (all its threads) until stopped."""

    def __init__(self, pid, path):
        self.path = path
        self.proc = subprocess.Popen(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter",
                                      "-p", str(pid), "-o", path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        """The count, or None: perf says ``<not counted>`` for a process that
        never ran while it watched (the idle worker of a quick run)."""
        self.proc.send_signal(2)  # perf prints its counts on SIGINT
        self.proc.wait(10)
        with open(self.path) as f:
            for line in f:
                if "raw_syscalls:sys_enter" in line:
                    value = line.split(",")[0]
                    return int(value) if value.isdigit() else None
        return None


class DealerCall:
    def __init__(self, context, endpoint):
        self.sock = context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def __call__(self):
        multipart.send(self.sock, [b"", PAYLOAD])
        return multipart.recv(self.sock)[1]


def start(procs, run_dir, context):
    """The variants: name -> (call, [(process name, pid), ...])."""
    me = ("client", os.getpid())
    variants = {}
    client, broker, workers = harness.start_powerhose(
        procs, f"ipc://{run_dir}/f.sock", f"ipc://{run_dir}/b.sock", harness.ECHO_TARGET,
        WORKERS)
    variants["powerhose"] = (lambda: client.execute(PAYLOAD), [me, ("broker", broker.pid)] + [
        (f"worker {i}", w.pid) for i, w in enumerate(workers)])
    relayed, rbroker, rworkers = harness.start_powerhose(
        procs, f"ipc://{run_dir}/rf.sock", f"ipc://{run_dir}/rb.sock", harness.ECHO_TARGET,
        WORKERS, name="relayed", worker_args=("--no-direct",), direct=False)
    variants["relayed"] = (lambda: relayed.execute(PAYLOAD), [me, ("broker", rbroker.pid)] + [
        (f"worker {i}", w.pid) for i, w in enumerate(rworkers)])
    for name, mode in (("1-hop", "plain"), ("1-hop+py", "py")):
        endpoint = f"ipc://{run_dir}/{mode}.sock"
        echo = procs.start(name, [sys.executable, "-c", ECHO, endpoint, mode])
        call = DealerCall(context, endpoint)
        variants[name] = (call, [me, ("echo", echo.pid)])
    return variants, [client, relayed]


def measure(variants, rounds, count, syscalls, run_dir):
    """Per variant, per process: (cpu us, voluntary, involuntary, main thread
    us) per job and (user, kernel) ticks, a list over rounds, and system
    calls per job (None if not counted).

    The system calls are counted in a pass of their own after the rounds:
    perf's counting costs the kernel time on every call, which would show
    in the CPU times."""
    results = {name: {p: [] for p, _ in pids} for name, (_, pids) in variants.items()}
    calls = {name: {p: None for p, _ in pids} for name, (_, pids) in variants.items()}
    for name, (call, _) in variants.items():
        for _ in range(max(500, count // 3)):
            call()
    for r in range(rounds):
        say(f"round {r + 1} of {rounds}")
        for name, (call, pids) in variants.items():
            before = [task_counts(pid) for _, pid in pids]
            for _ in range(count):
                call()
            after = [task_counts(pid) for _, pid in pids]
            for (label, _), b, a in zip(pids, before, after):
                results[name][label].append(((a[0] - b[0]) / count / 1000,
                                             (a[1] - b[1]) / count, (a[2] - b[2]) / count,
                                             (a[3] - b[3]) / count / 1000,
                                             a[4] - b[4], a[5] - b[5]))
    if syscalls:
        say("system calls")
        for name, (call, pids) in variants.items():
            counters = [SyscallCount(pid, os.path.join(run_dir, f"perf-{pid}"))
                        for _, pid in pids]
            time.sleep(0.3)  # perf attached
            for _ in range(count):
                call()
            for (label, _), counter in zip(pids, counters):
                n = counter.stop()
                calls[name][label] = None if n is None else n / count
    return results, calls


def report(results, calls, rounds, count):
    def cpu(samples):
        return statistics.median(s[0] for s in samples)

    floor = sum(cpu(samples) for samples in results["1-hop"].values())
    rows = []
    for name, per_process in results.items():
        total = 0.0
        for label, samples in per_process.items():
            if cpu(samples) < 1 and label.startswith("worker"):
                continue  # an idle worker (the other one ran the jobs)
            total += cpu(samples)
            n = calls[name][label]
            ticks = sum(s[4] + s[5] for s in samples)
            rows.append([name, label, f"{cpu(samples):.1f}",
                         f"{statistics.median(s[3] for s in samples):.1f}",
                         f"{100 * sum(s[5] for s in samples) / ticks:.0f}%" if ticks else "-",
                         "-" if n is None else f"{n:.1f}",
                         f"{statistics.median(s[1] for s in samples):.2f}",
                         f"{statistics.median(s[2] for s in samples):.2f}", ""])
        rows.append([name, "all", f"{total:.1f}", "", "", "", "", "", f"{total / floor:.2f}"])
    print(f"100-byte echo from one thread, {count} jobs per round, medians over {rounds} "
          "rounds; per job, per process (all its threads; the main thread's part; the "
          "kernel's share, from clock ticks over all rounds); system calls from one more "
          "block, counted by perf")
    print()
    print(table(["path", "process", "CPU (us)", "main thread", "kernel", "system calls",
                 "voluntary switches", "involuntary", "CPU / 1-hop"], rows))
    if all(n is None for per in calls.values() for n in per.values()):
        print("\nsystem calls: not counted (perf cannot read tracepoints here)")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--count", type=int, default=3000, help="jobs per variant per round")
    p.add_argument("--quick", action="store_true", help="2 rounds of 300 jobs")
    p.add_argument("--no-syscalls", action="store_true", help="do not run perf")
    p.add_argument("--one-cpu", action="store_true",
                   help="run every process on one CPU (the first this one may use)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.count = 2, 300
    if args.rounds < 1 or args.count < 1:
        p.error("--rounds and --count must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if sys.platform != "linux":
        sys.exit("costs.py reads /proc: Linux only")
    syscalls = not args.no_syscalls and perf_works()
    if args.one_cpu:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})  # before any child and any thread: all inherit it
    print(describe_machine())
    if args.one_cpu:
        print(f"every process on CPU {cpu}")
    print()
    with harness.private_dir("ph-costs-") as run_dir:
        procs = Processes(run_dir)
        context = zmq.Context()
        clients = []
        try:
            variants, clients = start(procs, run_dir, context)
            results, calls = measure(variants, args.rounds, args.count, syscalls, run_dir)
            procs.check()
            report(results, calls, args.rounds, args.count)
        finally:
            for client in clients:
                client.close()
            procs.close()
            context.destroy(linger=0)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
