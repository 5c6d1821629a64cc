#!/usr/bin/env python
"""Which broker should stay?  Broker implementations side by side, in one run.

Each contestant is a way to start a broker process on a frontend and a
backend endpoint; the clients and the workers are the same code for all
of them (this tree's ``Client`` and ``powerhose-worker``, but for
``before``'s workers):

* ``relay``: ``zmq.proxy`` (ROUTER to DEALER, libzmq's C loop) in a
  process of its own with REP workers behind it, as in ``overhead.py``
  (c) and ``floor.py``: the floor for any broker on libzmq;
* ``baseline-native``, ``baseline-python``: the broker of a git commit
  (``--baseline``, default 73e07e2), extracted with ``git archive`` into a
  temp dir, its native modules built there, run with ``--engine native``
  and ``--engine python``;
* ``before``: the broker *and the workers* of another commit
  (``--before``, default HEAD), extracted and built the same way, run as
  they start by default: the working tree's change against the last
  commit, side by side;
* ``current``: this working tree's broker, whatever engine it has;
* ``current-pure``: this working tree's package copied without any
  compiled ``*.so``, so that Python imports the ``.py`` files: the same
  source, uncompiled.

Three measures, the contestants taking turns within every round (the
order rotates from round to round), medians over rounds:

1. round trip of a 100-byte echo job from one client thread, and its
   ratio to the relay's (target from the issue: at most 1.3);
2. jobs/s from 8 client threads with 2 echo workers, and its ratio to
   ``baseline-native`` (target: at least 0.9);
3. the break-even, as ``floor.py`` finds it: 4 threads, 2 workers, the
   built-in GIL-holding job at increasing sizes, the size from which
   offloading beats in-process threads (target: no later than the relay's).

    python bench/engines.py             # 7 rounds of each measure, about 6 minutes
    python bench/engines.py --quick     # smoke run, about 20 seconds
    python bench/engines.py --only relay,current,current-pure --rounds 3
    python bench/engines.py --baseline HEAD~5 --rst   # header as an RST sentence
    python bench/engines.py --only relay,before,current   # this change against HEAD
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

import zmq

import harness
from harness import PAYLOAD, REPO, THREADS, Load, Processes, ReqCaller, say, wait_until

from pyramid_powerhose.bench import (
    BUILTIN_TARGET, describe_machine, jobs_for, rounds_per_ms, table)

CONTESTANTS = ("relay", "baseline-native", "baseline-python", "before", "current",
               "current-pure")
SHORT = dict(zip(CONTESTANTS, ("r", "bn", "bp", "b", "c", "cp")))  # ipc paths are limited to 107 bytes
BASELINE = "73e07e2"
WORKERS = 2
BREAK_EVEN_THREADS = 4  # as floor.py and powerhose-bench
SIZES_MS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
TARGETS = {"round trip": 1.3, "jobs/s": 0.9}  # from the issue
# A broker started in a tree must import that tree's modules only.  An
# editable install's finder (last on sys.meta_path) maps the package to the
# working tree, so a module missing from the tree on PYTHONPATH (say, a
# compiled one not copied) would silently come from the working tree: the
# launcher drops that finder, then runs the module as ``python -m`` would.
ONLY_PYTHONPATH = """\
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
"""
LAUNCH = ONLY_PYTHONPATH + """\
import runpy
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""
PROBE = ONLY_PYTHONPATH + """\
import os
tree = os.path.realpath(sys.argv[1])
import pyramid_powerhose.cli.broker
loaded = {name: os.path.realpath(module.__file__) for name, module in sys.modules.items()
          if name.startswith("pyramid_powerhose") and getattr(module, "__file__", None)}
strays = [f"{name} from {path}" for name, path in loaded.items()
          if not path.startswith(tree + os.sep)]
print("; ".join(strays) or "-")
print(os.path.basename(loaded.get("pyramid_powerhose.broker", "?")))
"""


@dataclass
class Contestant:
    name: str
    source: str  # what it runs, for the report
    path: str | None = None  # the tree on its PYTHONPATH and cwd; None: the relay
    flags: list = field(default_factory=list)  # --engine, when its parser has one
    compiled: str = "-"  # the package's *.so files
    module: str = "-"  # the file pyramid_powerhose.broker is imported from
    engine: str = "-"  # what its broker's log says

    @property
    def argv(self):
        return launch(*self.flags)


def launch(*args, module="pyramid_powerhose.cli.broker"):
    """``python -m module args``, importing from the tree on PYTHONPATH only."""
    return [sys.executable, "-c", LAUNCH, module, *args]


# -- preparing the contestants -----------------------------------------------


def run_quietly(name, argv, cwd, work_dir, what):
    """Run a step in its own process group (killed on Ctrl-C or SIGTERM), output
    to ``<work_dir>/<name>.log``; RuntimeError with the output's end if it fails."""
    procs = Processes(work_dir)
    try:
        proc = procs.start(name, argv, path=cwd)
        if proc.wait() != 0:
            with open(os.path.join(work_dir, f"{name}.log"), errors="replace") as f:
                raise RuntimeError(f"{what} failed ({proc.returncode}):\n{f.read()[-3000:]}")
    finally:
        procs.close()


def extract(rev, into, work_dir):
    """``git archive REV | tar -x`` into ``into``; returns the short commit."""
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "--verify",
                             f"{rev}^{{commit}}"], capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"engines.py: --baseline {rev}: not a commit of {REPO}")
    os.makedirs(into)
    script = f"git -C '{REPO}' archive {commit.stdout.strip()} | tar -x -C '{into}'"
    run_quietly("extract", ["sh", "-c", script], into, work_dir, f"extracting {rev}")
    return commit.stdout.strip()


def compiled_modules(tree):
    names = sorted(os.path.basename(p).split(".")[0] for p in glob.glob(
        os.path.join(tree, "pyramid_powerhose", "**", "*.so"), recursive=True))
    return ", ".join(names) or "none"


def probe(tree, name):
    """What a broker started in ``tree`` imports, and whether it has ``--engine``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [tree, os.environ.get("PYTHONPATH")])))
    found = subprocess.run([sys.executable, "-c", PROBE, tree], cwd=tree,
                           env=env, capture_output=True, text=True, timeout=60)
    strays, module = (found.stdout.split("\n") + ["", ""])[:2]
    if found.returncode != 0 or strays != "-":
        raise RuntimeError(f"{name}: the broker does not import from {tree} alone: "
                           f"{strays}{found.stderr}")
    helped = subprocess.run(launch("--help"), cwd=tree, env=env, capture_output=True,
                            text=True, timeout=60)
    if helped.returncode != 0:
        raise RuntimeError(f"{name}: powerhose-broker --help failed:\n{helped.stderr}")
    return module, "--engine" in helped.stdout


def build_commit(rev, tree, work_dir):
    """REV's tree in ``tree``, its compiled modules built; its short commit."""
    commit = extract(rev, tree, work_dir)
    say(f"building the compiled modules of {commit}")
    try:
        run_quietly("build", [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                    tree, work_dir, f"building {commit}")
    except RuntimeError as exc:
        say(str(exc))
    return commit


def prepare(names, rev, work_dir, before="HEAD"):
    """The contestants to run, and a line for each that cannot run here."""
    ready, skipped = [], []
    if "relay" in names:
        ready.append(Contestant("relay", "zmq.proxy ROUTER->DEALER, REP workers"))
    baseline = [n for n in names if n.startswith("baseline-")]
    if baseline:
        tree = os.path.join(work_dir, "baseline")
        commit = build_commit(rev, tree, work_dir)
        module, has_engine = probe(tree, "baseline")
        compiled = compiled_modules(tree)
        for name in baseline:
            engine = name.split("-", 1)[1]
            if not has_engine:
                skipped.append(f"{name}: the broker of {commit} has no --engine option")
            elif engine == "native" and not glob.glob(
                    os.path.join(tree, "pyramid_powerhose", "_nbroker*.so")):
                with open(os.path.join(work_dir, "build.log"), errors="replace") as log:
                    say(f"build_ext of {commit} said:\n{log.read()[-3000:]}")
                skipped.append(f"{name}: the native engine of {commit} did not build "
                               "(a C++ compiler and libzmq's headers are needed)")
            else:
                ready.append(Contestant(name, f"{commit}, git archive + build_ext", tree,
                                        ["--engine", engine], compiled, module))
    if "before" in names:
        tree = os.path.join(work_dir, "before")
        commit = build_commit(before, tree, work_dir)
        module, _ = probe(tree, "before")
        ready.append(Contestant("before", f"{commit}, git archive + build_ext", tree, [],
                                compiled_modules(tree), module))
    current = [n for n in names if n.startswith("current")]
    if "current-pure" in current:
        tree = os.path.join(work_dir, "pure")
        shutil.copytree(os.path.join(REPO, "pyramid_powerhose"),
                        os.path.join(tree, "pyramid_powerhose"),
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in current:
        tree = REPO if name == "current" else os.path.join(work_dir, "pure")
        module, has_engine = probe(tree, name)
        source = "working tree" + (", copied without *.so" if name == "current-pure" else "")
        ready.append(Contestant(name, source, tree, ["--engine", "auto"] if has_engine else [],
                                compiled_modules(tree), module))
    return ready, skipped


# -- starting them -------------------------------------------------------------


def start_broker(procs, contestant, run_dir, tag, target):
    """A contestant's broker and WORKERS powerhose-workers; returns a Client, once all are ready."""
    name, short = f"{tag}-{contestant.name}", f"{run_dir}/{tag}-{SHORT[contestant.name]}"
    own_workers = contestant.name == "before"  # the other contestants run this tree's
    # Brokers compared: every job relayed (this tree's workers --no-direct, and
    # no lease asked for), as the brokers before the direct path relayed them.
    client, _, _ = harness.start_powerhose(
        procs, f"ipc://{short}-f.sock", f"ipc://{short}-b.sock", target, WORKERS, name,
        broker=contestant.argv, broker_path=contestant.path,
        worker=launch(module="pyramid_powerhose.cli.worker") if own_workers else None,
        worker_path=contestant.path if own_workers else harness.REPO,
        worker_args=() if own_workers else ("--no-direct",), direct=False)
    # Today's broker logs "(compiled)" or "(pure Python)"; 73e07e2's, "engine: X".
    engine = re.search(r"engine\W+(\w+)|\((compiled|pure Python)\)",
                       procs.log(f"{name}-broker")[:4000])
    contestant.engine = ("?" if engine is None else engine.group(1)
                         or {"compiled": "compiled", "pure Python": "python"}[engine.group(2)])
    return client


# -- measuring -----------------------------------------------------------------


class Phase:
    """The processes, sockets, clients and threads of one measure, closed together."""

    def __init__(self, run_dir):
        self.procs = Processes(run_dir)
        self.context = zmq.Context()
        self.clients, self.callers, self.loads = [], [], []

    def close(self):
        for load in self.loads:  # the calling threads first, while their peers still answer
            load.close()
        self.procs.close()
        for client in self.clients:
            client.close()
        for caller in self.callers:
            caller.close()
        self.context.destroy(linger=0)


def round_trips(contestants, run_dir, args):
    """Measures 1 and 2: per contestant, round trip summaries and jobs/s, per round."""
    phase = Phase(run_dir)
    try:
        latency, throughput = {}, {}
        for c in contestants:
            if c.name == "relay":
                front = harness.start_relay(phase.procs, run_dir, "rt-r", WORKERS)
                latency[c.name] = harness.req_caller(phase.context, front, phase.procs)
                caller = ReqCaller(phase.context, [front])  # a REQ socket per thread
                phase.callers.append(caller)
                phase.loads.append(Load(lambda caller=caller: caller(PAYLOAD)))
            else:
                client = start_broker(phase.procs, c, run_dir, "rt", harness.ECHO_TARGET)
                phase.clients.append(client)
                latency[c.name] = lambda client=client: client.execute(PAYLOAD)
                phase.loads.append(Load(latency[c.name]))
            throughput[c.name] = phase.loads[-1]
        say("round trip and jobs/s: processes ready; warming up")
        lat, tput = harness.run_rounds(latency, throughput, args.rounds, args.count,
                                       args.tput_count, args.warmup)
        phase.procs.check()
        return lat, tput
    finally:
        phase.close()


def break_evens(contestants, run_dir, args):
    """Measure 3: per size, per path, jobs/s per round; and in-process CPU ms per job."""
    phase = Phase(run_dir)
    try:
        calls = {"in-process": harness.in_process}
        for c in contestants:
            if c.name == "relay":
                caller = ReqCaller(phase.context, [harness.start_relay(
                    phase.procs, run_dir, "be-r", WORKERS, job="jobs")])
                phase.callers.append(caller)
                calls[c.name] = caller
            else:
                client = start_broker(phase.procs, c, run_dir, "be", BUILTIN_TARGET)
                phase.clients.append(client)
                calls[c.name] = client.execute
        for name, call in calls.items():  # every worker has answered before anything is timed
            wait_until(lambda: all(call(b"1") == harness.in_process(b"1")
                                   for _ in range(2 * WORKERS)), phase.procs, name)
        progress = harness.counter(len(args.sizes) * args.be_rounds * len(calls), "break-even")
        # Sized once, from the median of three timings: sized anew for each
        # size (as floor.py does), a busy moment could make a larger size
        # smaller than the one before it.
        per_ms = statistics.median(rounds_per_ms() for _ in range(3))
        measured = [harness.measure_size(calls, ms, args.jobs or jobs_for(ms) // 2,
                                         args.be_rounds, i, progress, BREAK_EVEN_THREADS,
                                         per_ms)
                    for i, ms in enumerate(args.sizes)]
        print(file=sys.stderr)
        phase.procs.check()
        return measured
    finally:
        phase.close()


# -- reporting -----------------------------------------------------------------


def report(contestants, skipped, lat, tput, measured, args):
    out = [describe_machine(args.rst), ""]
    names = [c.name for c in contestants]
    out.append(table(["contestant", "broker", "engine", "compiled", "broker module"],
                     [[c.name, c.source, c.engine, c.compiled, c.module]
                      for c in contestants]))
    out += [""] + [f"skipped: {line}" for line in skipped] + ([""] if skipped else [])

    out.append(f"Round trip of a {len(PAYLOAD)}-byte echo, one client thread, {WORKERS} "
               f"workers: {args.rounds} rounds x {args.count} round trips, taking turns "
               f"every {harness.BLOCK}; median across rounds [range of the rounds' medians].")
    out.append("")
    rows, verdicts = [], {name: {} for name in names}
    for name in names:
        medians = [s[1] for s in lat[name]]
        row = [name, f"{statistics.median(medians):.1f}",
               f"[{min(medians):.1f}-{max(medians):.1f}]",
               f"{statistics.median(s[2] for s in lat[name]):.1f}"]
        if "relay" in lat:
            value, per_round = harness.ratio([(a[1], b[1])
                                              for a, b in zip(lat[name], lat["relay"])])
            verdicts[name]["round trip"] = value
            row += [f"{value:.2f}", per_round]
        rows.append(row)
    out.append(table(["round trip (us)", "median", "range", "p99", "x relay", "per round"]
                     [:6 if "relay" in lat else 4], rows))
    out.append("")

    out.append(f"{THREADS} client threads, {WORKERS} workers: {args.rounds} rounds x "
               f"{args.tput_count} jobs; median across rounds [range].")
    out.append("")
    rows = []
    ref = "baseline-native" if "baseline-native" in tput else None
    for name in names:
        row = [name, f"{statistics.median(tput[name]):.0f}",
               f"[{min(tput[name]):.0f}-{max(tput[name]):.0f}]"]
        if ref:
            value, per_round = harness.ratio(list(zip(tput[name], tput[ref])))
            verdicts[name]["jobs/s"] = value
            row += [f"{value:.2f}", per_round]
        rows.append(row)
    out.append(table(["jobs/s", "median", "range", "x baseline-native", "per round"]
                     [:5 if ref else 3], rows))
    out.append("")

    out.append(f"Break-even: {BREAK_EVEN_THREADS} threads, {WORKERS} workers, the built-in job "
               f"({BUILTIN_TARGET}); speed-up over in-process threads, median over "
               f"{args.be_rounds} rounds of the ratio within a round.  CPU ms: the "
               "in-process runs' CPU time per job.")
    out.append("")
    rows, evens = harness.break_even_table(args.sizes, measured, names)
    out.append(table(["job ms", "CPU ms", "in-process jobs/s", *names], rows))
    out.append("")

    relay_even = evens.get("relay", False)
    rows = []
    for name in names:
        if name == "relay":
            continue
        cells, met = [name], []
        for key in ("round trip", "jobs/s"):
            value = verdicts[name].get(key)
            if value is None:
                cells.append("n/a")
                continue
            ok = value <= TARGETS[key] if key == "round trip" else value >= TARGETS[key]
            met.append(ok)
            cells.append(f"{value:.2f} {'met' if ok else 'NOT met'}")
        if relay_even is False:
            cells.append("n/a")
        else:
            mine = evens[name]
            ok = mine is not None and (relay_even is None or mine <= relay_even)
            met.append(ok)
            cells.append((f"{mine:.3f} ms" if mine else "not reached")
                         + f" {'met' if ok else 'NOT met'}")
        # "all met" only if all three were measured and met
        cells.append("no" if not all(met) else "all met" if len(met) == 3 else "n/a")
        rows.append(cells)
    relay_text = ("n/a" if relay_even is False else
                  f"{relay_even:.3f} ms" if relay_even else "not reached")
    out.append(table(["targets (from the issue)",
                      f"round trip <= {TARGETS['round trip']} x relay",
                      f"jobs/s >= {TARGETS['jobs/s']} x baseline-native",
                      f"break-even <= relay's ({relay_text})", "verdict"], rows))
    return "\n".join(out)


# -- main ----------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Broker implementations side by side: round trip, jobs/s and "
        "break-even, against a zmq.proxy relay and a baseline commit's engines.")
    parser.add_argument("--only", default=",".join(CONTESTANTS), metavar="A,B",
                        help="contestants to run, comma-separated (default: all of "
                        "%(default)s)")
    parser.add_argument("--baseline", default=BASELINE, metavar="REV",
                        help="the commit whose broker is the baseline (default %(default)s)")
    parser.add_argument("--before", default="HEAD", metavar="REV",
                        help="the commit whose broker is 'before' (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="rounds of every measure, the contestants taking turns "
                        "(default %(default)s)")
    parser.add_argument("--count", type=int, default=2000,
                        help="round trips per contestant per round; the jobs/s runs make "
                        "twice as many (default %(default)s)")
    parser.add_argument("--sizes", type=float, nargs="+", default=list(SIZES_MS),
                        metavar="MS", help="job sizes for the break-even, milliseconds of "
                        "CPU (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="break-even: jobs per path per round (default: about 1 s "
                        "of work)")
    parser.add_argument("--rst", action="store_true",
                        help="the machine header as one sentence, for an RST document")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 rounds of 200 round trips, break-even at 2 "
                        "sizes, 1 round of 40 jobs")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(CONTESTANTS)
    if unknown or not args.only:
        parser.error(f"--only: choose among {', '.join(CONTESTANTS)}")
    args.only = [name for name in CONTESTANTS if name in args.only]
    args.be_rounds = args.rounds
    if args.quick:
        args.rounds, args.count, args.sizes, args.be_rounds, args.jobs = 2, 200, [0.1, 0.5], 1, 40
    if args.rounds < 1 or args.count < 1 or args.jobs < 0 or min(args.sizes) <= 0:
        parser.error("--rounds and --count must be at least 1, --jobs and --sizes positive")
    args.sizes = sorted(args.sizes)
    args.tput_count = 2 * args.count
    args.warmup = max(100, args.count // 5)
    return args


def main(argv=None):
    args = parse_args(argv)
    with harness.private_dir("ph-engines-") as work_dir:
        contestants, skipped = prepare(args.only, args.baseline, work_dir, args.before)
        for line in skipped:
            say(f"skipped: {line}")
        if not contestants:
            raise SystemExit("engines.py: no contestant can run")
        run_dir = os.path.join(work_dir, "r")
        os.mkdir(run_dir)
        lat, tput = round_trips(contestants, run_dir, args)
        measured = break_evens(contestants, run_dir, args)
        print(report(contestants, skipped, lat, tput, measured, args))
        return 0


if __name__ == "__main__":
    harness.run_script(main)
