"""powerhose-bench in quick mode: the report's shape and correct results."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pyramid_powerhose import bench
from tests.conftest import REPO, command


def run_bench(*args, tmp_dir):
    env = dict(os.environ, XDG_RUNTIME_DIR=tmp_dir, PYTHONPATH=REPO)
    result = subprocess.run(command("powerhose-bench") + ["--quick", "--quiet", *args],
                            capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def ps_lines():
    """Every process's command line, whole (pytest sets COLUMNS, which ps obeys)."""
    return subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True,
                          text=True).stdout.splitlines()


def no_cluster_left(tmp_dir):
    return not any(tmp_dir in line for line in ps_lines())


def test_one_job_report(run_dir):
    out = run_bench("--workers", "2", "--threads", "2", "--duration-ms", "0.5",
                    tmp_dir=run_dir)
    assert out.startswith("machine: ")
    rows = re.findall(r"^(in-process|powerhose)\s+(\d+)\s+([\d.]+)\s+(\d+)\s*$", out, re.M)
    assert [r[0] for r in rows] == ["in-process", "powerhose"]
    assert all(int(r[1]) == 20 for r in rows)  # --quick: 20 jobs each
    assert re.search(r"^speed-up: [\d.]+x   job: [\d.]+ ms   per-job overhead: -?\d+ us$",
                     out, re.M)
    assert no_cluster_left(run_dir)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_sweep_stops_its_cluster(run_dir, sig, code):
    """Ctrl-C or SIGTERM mid-sweep: the calling threads stop, the cluster is
    stopped in order, and the command exits with 128 + the signal."""
    env = dict(os.environ, XDG_RUNTIME_DIR=run_dir, TMPDIR=run_dir, PYTHONPATH=REPO)
    proc = subprocess.Popen(command("powerhose-bench") + ["--sweep", "--quiet"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any(run_dir in line and "cli.worker" in line  # the cluster is up
                      for line in ps_lines()):
            if proc.poll() is not None:
                pytest.fail(f"exited with {proc.returncode}: {proc.stdout.read()}")
            assert time.monotonic() < deadline, "no cluster after 60 s"
            time.sleep(0.2)
        time.sleep(2)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, out
    assert "Traceback" not in out and "Assertion failed" not in out, out
    assert no_cluster_left(run_dir)


def test_run_threads_raises_a_calling_threads_error():
    calls = []
    lock = threading.Lock()

    def call(data):
        with lock:
            calls.append(data)
            if len(calls) == 40:
                raise ValueError("job 40 failed")
        return data

    with pytest.raises(ValueError, match="job 40 failed"):
        bench.run_threads(call, b"x", 1000, 4)
    time.sleep(0.1)
    assert len(calls) < 50  # the other threads stopped too
    assert bench.run_threads(lambda data: data, b"y", 10, 3)[1] == [b"y"] * 10


def test_own_target_and_data(run_dir):
    out = run_bench("--target", "tests.targets:echo", "--data", "hello", "--workers", "1",
                    tmp_dir=run_dir)
    assert "target tests.targets:echo" in out and "speed-up:" in out


def test_sweep_with_plot(run_dir):
    plot = os.path.join(run_dir, "sweep.png")
    out = run_bench("--sweep", "--workers", "2", "--rounds", "2", "--plot", plot,
                    tmp_dir=run_dir)
    rows = re.findall(r"^([\d.]+)\s+[\d.]+\s+20\s+(\d+)\s+(\d+)\s+([\d.]+)x"
                      r"\s+([\d.]+)-([\d.]+)x\s+-?\d+\s*$", out, re.M)
    assert [r[0] for r in rows] == ["0.05", "0.1", "0.25", "0.5"]
    for row in rows:  # the median round lies within the lowest and highest rounds
        assert float(row[4]) <= float(row[3]) <= float(row[5])
    assert re.search(r"^break-even: ([\d.]+ ms \(offloading wins|not reached)", out, re.M)
    assert re.search(r"^one round per size, as --rounds 1 would measure: break-even "
                     r"([\d.]+ to [\d.]+ ms over the 2 rounds|not reached in any of the 2 "
                     r"rounds)", out, re.M)
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert no_cluster_left(run_dir)


def test_single_round_break_evens():
    from pyramid_powerhose.bench import _single_round_break_evens
    crossing, flat = [(0.1, 0.5), (1.0, 1.5)], [(0.1, 0.2), (1.0, 0.9)]
    assert _single_round_break_evens([crossing, [(0.1, 1.2), (1.0, 2.0)], flat]) == (
        "one round per size, as --rounds 1 would measure: break-even 0.10 to 0.32 ms "
        "over the 3 rounds (1 not reached)")
    assert _single_round_break_evens([flat, flat]).endswith("not reached in any of the 2 rounds")


def test_break_even_interpolation():
    from pyramid_powerhose.bench import break_even
    assert break_even([(0.1, 0.5), (1.0, 1.5)]) == \
        __import__("pytest").approx(10 ** (-1 + 0.5), rel=1e-6)
    assert break_even([(0.1, 1.2), (1.0, 2.0)]) == 0.1
    assert break_even([(0.1, 0.2), (1.0, 0.9)]) is None


def test_bench_script_is_the_same_command():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--sweep" in result.stdout


def test_builtin_job_is_a_real_hmac_chain():
    import hmac

    from pyramid_powerhose import Job
    from pyramid_powerhose.bench import hmac_chain
    key = b"k" * 100  # longer than a block: hashed first, as RFC 2104 says
    for _ in range(3):
        key = hmac.digest(key, b"powerhose bench", "sha256")
    assert hmac_chain(Job(b"3:" + b"k" * 100)) == key


def test_threads_script_accounts_for_every_thread(tmp_path):
    """bench/threads.py, a few jobs: every row is there and nothing is left behind."""
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "threads.py"), "--ms", "0.05",
         "--jobs", "200", "--rounds", "1"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^4 client threads, 2 workers, 200 jobs "
                     r"of 0.05 ms per round, median of 1 rounds: \d+ jobs/s, the jobs themselves "
                     r"\d+% of the machine's time, idle \d+%\.$", out, re.M)
    labels = ["client: the calling threads", "client: libzmq I/O thread",
              "broker: message loop", "broker: libzmq I/O thread",
              "workers: libzmq I/O threads", "workers: main threads, less the job"]
    for label in labels:
        # CPU us/job (may be 0 or slightly negative at this tick resolution),
        # sleeps and preemptions per job.
        assert re.search(rf"^{re.escape(label)}\s+-?\d+\s+[\d.]+\s+[\d.]+\s*$", out, re.M), label
    job = re.search(r"^the job itself, in the workers\s+(\d+)\s*$", out, re.M)
    assert job and int(job.group(1)) > 0  # timed in the workers, reported back
    local = re.search(r"^the job itself, in-process\s+(\d+)\s*$", out, re.M)
    assert local and int(local.group(1)) > 0  # the same jobs, timed in this process
    assert re.search(r"^In-process, the same jobs in the same threads: \d+ jobs/s; speed-up "
                     r"[\d.]+x; the job itself took [+-]\d+% in the workers\.$", out, re.M)
    # The broker's loop sleeps between messages: at least once per job would
    # be 1.0; 200 jobs in a fresh round cannot all arrive in one wake-up.
    sleeps = float(re.search(r"^broker: message loop\s+-?\d+\s+([\d.]+)", out, re.M).group(1))
    assert sleeps > 0.1
    assert list(tmp_path.glob("powerhose-threads-*")) == []  # its run directory is removed
    assert no_cluster_left(str(tmp_path))


def test_wakeups_script_times_every_case_and_leaves_no_child():
    """bench/wakeups.py, a smoke run: a round trip per case, its children reaped."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "wakeups.py"), "--quick"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "eventfd ping-pong between two processes, 200 round trips per case" in out
    for label in ["same CPU", "other CPU, idle", "other CPU, running a nice 5 busy loop"]:
        row = re.search(rf"^{re.escape(label)}\s+([\d.]+)\s+([\d.]+)\s+\[", out, re.M)
        assert row, label
        median, p90 = float(row.group(1)), float(row.group(2))
        assert 0 < median <= p90  # a round trip takes time, and the median is no tail
    # The PM QoS case needs write access to /dev/cpu_dma_latency: timed or said skipped.
    assert re.search(r"^other CPU, idle CPUs polling \(PM QoS 0\)\s+([\d.]+\s+[\d.]+\s+\[|"
                     r"skipped)", out, re.M)
    ps = "\n".join(ps_lines())
    assert "wakeups.py" not in ps  # the pongers and the busy loop were killed and reaped


def test_floor_script_runs_every_path_and_leaves_nothing(tmp_path):
    """bench/floor.py, a smoke run: every path's speed-up and break-even line,
    results checked against in-process ones (the script fails otherwise)."""
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(tmp_path),
               XDG_RUNTIME_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "floor.py"), "--quick"],
        capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    rows = re.findall(r"^([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)x\s+([\d.]+)x\s+([\d.]+)x"
                      r"\s+([\d.]+)\s*$", out, re.M)
    assert [row[0] for row in rows] == ["0.1", "0.5"]
    for row in rows:
        assert float(row[1]) > 0 and int(row[2]) > 0
        assert all(float(value) > 0 for value in row[3:])
    for path in ["powerhose", "relay", "direct"]:
        assert re.search(rf"^break-even, {path}: ([\d.]+ ms|not reached)$", out, re.M), path
    assert list(tmp_path.glob("ph-floor-*")) == []  # its run directory is removed
    ps = "\n".join(ps_lines())
    assert "floor.py" not in ps and str(tmp_path) not in ps


def test_engines_script_times_every_contestant_and_leaves_nothing(tmp_path):
    """bench/engines.py, a smoke run: every contestant's round trip, jobs/s and
    speed-ups are positive, and its brokers, workers and temp trees are gone."""
    from tests.conftest import missing
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(tmp_path),
               XDG_RUNTIME_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "engines.py"), "--quick"],
        capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^zmq\s+pyzmq [\d.]+, libzmq [\d.]+$", out, re.M)  # the machine header
    names = ["relay", "baseline-native", "baseline-python", "current", "current-pure"]
    if "skipped: baseline-native" in out:  # no compiler, or no libzmq headers
        names.remove("baseline-native")
    engines = dict(re.findall(r"^(baseline-\w+|current\S*)\s.*?\s(native|python)\s", out, re.M))
    assert engines.get("baseline-python") == "python" and engines.get("current-pure") == "python"
    for name in names:
        latency = re.search(rf"^{name}\s+([\d.]+)\s+\[[\d.-]+\]\s+[\d.]+\s+([\d.]+)\s+\[", out,
                            re.M)
        assert latency and float(latency.group(1)) > 0 and float(latency.group(2)) > 0, name
        rate = re.search(rf"^{name}\s+(\d+)\s+\[\d+-\d+\]", out, re.M)
        assert rate and int(rate.group(1)) > 0, name
    header = re.search(r"^job ms\s+CPU ms\s+in-process jobs/s\s+(.*)$", out, re.M)
    assert header and header.group(1).split() == names
    rows = re.findall(r"^(0\.1|0\.5)\s+([\d.]+)\s+(\d+)\s+((?:[\d.]+x\s*)+)$", out, re.M)
    assert [row[0] for row in rows] == ["0.1", "0.5"]
    for row in rows:
        speedups = [float(value.rstrip("x")) for value in row[3].split()]
        assert len(speedups) == len(names) and all(value > 0 for value in speedups)
    assert re.search(r"^break-even\s+((\d\.\d+ ms|not reached)\s*){%d}$" % len(names), out,
                     re.M)
    for name in names[1:]:
        assert re.search(rf"^{name}\s+(.*\s(met|NOT met|n/a)\s+){{3}}(all met|no)$", out,
                         re.M), name  # the targets table: three verdicts and the sum
    assert list(tmp_path.glob("ph-engines-*")) == []  # the baseline, the copy, the run dir
    ps = "\n".join(ps_lines())
    assert "engines.py" not in ps and str(tmp_path) not in ps
    if "baseline-native" not in names:
        missing("the baseline's native broker did not build (g++ and libzmq3-dev)")
