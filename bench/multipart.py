#!/usr/bin/env python
"""Is the compiled multipart path as fast as the C++ module it replaced?

Round trips of an 8-frame message (a worker's request: 9 frames at the
ROUTER) between a DEALER and a ROUTER over ipc, then between two PAIR
sockets over inproc (no I/O thread: the calls' own cost), in one thread,
through:

(a) pyzmq's ``send_multipart`` / ``recv_multipart``;
(b) ``multipart.send_python`` / ``recv_python``: pyzmq, a call per frame;
(c) ``multipart.send_compiled`` / ``recv_compiled``: this module compiled
    by Cython, a call per message (only where it is built);
(d) the C++ module ``_nmultipart`` it replaced (``native/multipart.cpp`` at
    commit 73e07e2), built from git into a temp dir for this run, then
    removed (needs git and a C++ compiler; ``--without-old`` skips it).

The variants take turns every 50 round trips within each round (the order
rotates round after round) and the report gives each one's median over rounds, and (c) over
(d) per round: its median and quartiles.  The issue's rule: keep (c) if
it is within the rounds' spread of (d), or faster.

    python bench/multipart.py            # 25 rounds x 2000 round trips, 20 s to a minute
    python bench/multipart.py --quick    # smoke run, a second or two
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

from harness import REPO

from pyramid_powerhose import multipart
from pyramid_powerhose.bench import describe_machine, table
OLD_COMMIT = "73e07e2"
BLOCK = 50  # round trips a variant runs before the next one's turn
MESSAGE = [b"", b"MDPW01", b"\x02", b"\x00k\x8bEg", b"", b"PHX01",
           b"0123456789abcdef", bytes(range(100))]
# Over ipc, each message crosses libzmq's I/O threads, and a round trip
# mostly waits for them to wake up; over inproc, the receiving socket is
# this thread's, and what remains is the calls' own cost.
TRANSPORTS = {
    "ipc, DEALER -> ROUTER -> DEALER": (zmq.ROUTER, zmq.DEALER, "ipc://{run_dir}/router.sock"),
    "inproc, PAIR -> PAIR -> PAIR": (zmq.PAIR, zmq.PAIR, "inproc://bench-multipart"),
}
LABELS = {
    "pyzmq": "(a) pyzmq send_multipart/recv_multipart",
    "python": "(b) multipart, Python path",
    "compiled": "(c) multipart, compiled (Cython)",
    "cpp": "(d) _nmultipart, C++ (73e07e2)",
}
SETUP = """
from setuptools import Extension, setup
setup(name="old_nmultipart", ext_modules=[Extension(
    "_nmultipart", sources=["multipart.cpp"], language="c++",
    extra_compile_args=["-std=c++17", "-O2"])])
"""


@contextlib.contextmanager
def old_module():
    """The C++ module as it was at OLD_COMMIT, built and imported from a temp dir."""
    scratch = tempfile.mkdtemp(prefix="ph-nmultipart-")
    try:
        source = subprocess.run(["git", "-C", REPO, "show", f"{OLD_COMMIT}:native/multipart.cpp"],
                                check=True, capture_output=True).stdout
        with open(os.path.join(scratch, "multipart.cpp"), "wb") as f:
            f.write(source)
        with open(os.path.join(scratch, "setup.py"), "w") as f:
            f.write(SETUP)
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=scratch,
                       check=True, capture_output=True)
        sys.path.insert(0, scratch)
        try:
            module = importlib.import_module("_nmultipart")
        finally:
            sys.path.remove(scratch)
        from zmq.backend.cython import _zmq

        if not module.init(_zmq.__file__):
            raise RuntimeError("_nmultipart found no libzmq in pyzmq's backend")
        yield module
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def cpp_calls(nm):
    """send and recv over the old module, as the old multipart.py called it."""

    def send(sock, frames, flags=0):
        nm.send(sock.underlying, frames, flags)

    def recv(sock):
        return nm.recv(sock.underlying, -1)

    return send, recv


def round_trips(send, recv, dealer, router, count):
    """Seconds per round trip: the DEALER sends, the ROUTER answers."""
    started = time.perf_counter()
    for _ in range(count):
        send(dealer, MESSAGE)
        send(router, recv(router))
        recv(dealer)
    return (time.perf_counter() - started) / count


def run(rounds, count, with_old):
    """Seconds per round trip, round by round: {transport: {variant: [...]}}."""
    variants = {
        "pyzmq": (lambda s, f: s.send_multipart(f), lambda s: s.recv_multipart()),
        "python": (multipart.send_python, multipart.recv_python),
    }
    if multipart.COMPILED:
        variants["compiled"] = (multipart.send_compiled, multipart.recv_compiled)
    else:
        print("(c) skipped: multipart.py is not compiled here", file=sys.stderr)
    results = {}
    with contextlib.ExitStack() as stack:
        if with_old:
            variants["cpp"] = cpp_calls(stack.enter_context(old_module()))
        run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ph-bench-", dir="/tmp"))
        context = zmq.Context()
        stack.callback(context.destroy, linger=0)
        for transport, (server, client, endpoint) in TRANSPORTS.items():
            answering = context.socket(server)
            answering.bind(endpoint.format(run_dir=run_dir))
            asking = context.socket(client)
            asking.connect(endpoint.format(run_dir=run_dir))
            results[transport] = interleaved(variants, asking, answering, rounds, count)
    return results


def interleaved(variants, asking, answering, rounds, count):
    names = list(variants)
    for name in names:  # warm-up, and every path is checked to work
        send, recv = variants[name]
        send(asking, MESSAGE)
        assert recv(answering)[-len(MESSAGE):] == MESSAGE, name
        round_trips(send, recv, asking, answering, max(1, count // 10))
    times = {name: [] for name in names}
    block = min(BLOCK, count)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        spent = dict.fromkeys(names, 0.0)
        for _ in range(count // block):  # turns of BLOCK round trips each
            for name in order:
                spent[name] += round_trips(*variants[name], asking, answering, block)
        for name in names:
            times[name].append(spent[name] / (count // block))
    return times


def report(results, rounds, count):
    print(describe_machine())
    print(f"\n{rounds} rounds x {count} round trips of an {len(MESSAGE)}-frame message, "
          "one thread")
    for transport, times in results.items():
        print(f"\n{transport}\n")
        base = statistics.median(times["pyzmq"])
        rows = []
        for name, samples in times.items():
            median = statistics.median(samples)
            rows.append([LABELS[name], f"{median * 1e6:.1f}", f"{min(samples) * 1e6:.1f}",
                         f"{max(samples) * 1e6:.1f}", f"{base / median:.2f}x"])
        print(table(["path", "median us", "lowest", "highest", "vs (a)"], rows))
        if "compiled" in times and "cpp" in times:
            ratios = sorted(c / d for c, d in zip(times["compiled"], times["cpp"]))
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(f"\n(c)/(d), round by round: median {statistics.median(ratios):.3f}, "
                  f"quartiles {quartiles[0]:.3f} to {quartiles[2]:.3f}, "
                  f"range {ratios[0]:.3f} to {ratios[-1]:.3f} (below 1: the compiled path is "
                  "faster)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--count", type=int, default=2000, help="round trips per variant per round")
    parser.add_argument("--quick", action="store_true", help="3 rounds x 200: a smoke run")
    parser.add_argument("--without-old", action="store_true",
                        help="skip (d): building the old C++ module needs git and g++")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.count = 3, 200
    try:
        results = run(args.rounds, args.count, not args.without_old)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    report(results, args.rounds, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
