"""powerhose-bench and the scripts in bench/, in smoke runs.

The reports are read as data: the tables they print (reStructuredText
simple tables) and the figures in them, never their sentences, which are
for people and free to change.  The scripts that study the machine rather
than the product (wakeups, threads, instructions, costs, floor), and the
runs of direct.py and engines.py with every path and contestant, are
marked ``diagnostic``: outside the default run, CI runs them with
``python -m pytest -m diagnostic``.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from pyramid_powerhose import Job, bench, multipart
from tests.conftest import REPO, command, mentioning, missing, wait_for

BENCH = os.path.join(REPO, "bench")
diagnostic = pytest.mark.diagnostic
RULE = re.compile(r"=+(?: +=+)*")


def tables(out):
    """Every simple table in ``out``: a list of rows (the header first) of cells."""
    lines, found, i = out.splitlines(), [], 0
    while i < len(lines):
        rule = lines[i]
        if RULE.fullmatch(rule) and i + 2 < len(lines) and lines[i + 2] == rule:
            spans = [m.span() for m in re.finditer("=+", rule)]
            end = lines.index(rule, i + 3)

            def cells(line):
                return [line[a:b if k < len(spans) - 1 else None].strip()
                        for k, (a, b) in enumerate(spans)]
            found.append([cells(line) for line in [lines[i + 1], *lines[i + 3:end]]])
            i = end + 1
        else:
            i += 1
    return found


def number(cell):
    """The figure in a cell: ``1.23x``, ``[0.9-1.1]``'s first, ``48.1k``, ``-3``."""
    return float(re.search(r"-?\d+(?:\.\d+)?", cell).group())


def column(table, name):
    """The cells of the column ``name`` (a header cell), below the header."""
    index = table[0].index(name)
    return [row[index] for row in table[1:]]


def run_bench(*args, tmp_dir):
    env = dict(os.environ, XDG_RUNTIME_DIR=tmp_dir, PYTHONPATH=REPO)
    result = subprocess.run(command("powerhose-bench") + ["--quick", "--quiet", *args],
                            capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def run_script(name, *args, tmp_path, timeout=180, env=None):
    """``python bench/NAME ARGS`` with TMPDIR (and the default endpoints) in ``tmp_path``."""
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(tmp_path),
               XDG_RUNTIME_DIR=str(tmp_path), **(env or {}))
    result = subprocess.run([sys.executable, os.path.join(BENCH, name), *args],
                            capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def ps_lines():
    """Every process's command line, whole (pytest sets COLUMNS, which ps obeys)."""
    return subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True,
                          text=True).stdout.splitlines()


def assert_nothing_left(*needles):
    """No live process mentions any of ``needles`` (private paths, script names),
    once those that were stopping have had a few seconds to exit."""
    needles = [str(needle) for needle in needles]
    try:
        wait_for(lambda: not mentioning(*needles), timeout=10, what="no process left")
    except AssertionError:
        assert [process.cmdline() for process in mentioning(*needles)] == []


def machine_header(out):
    """The names of the header's lines, which every report starts with."""
    names = [name for name, _ in bench.machine()]
    return [line.split()[0] for line in out.splitlines()[:len(names)]] == names


# -- powerhose-bench -----------------------------------------------------------------------

def test_one_job_report(run_dir):
    out = run_bench("--workers", "2", "--threads", "2", "--duration-ms", "0.5",
                    tmp_dir=run_dir)
    assert machine_header(out)
    [runs] = tables(out)
    assert len(runs) == 3  # the header, in-process, powerhose
    assert [int(jobs) for jobs in column(runs, "jobs")] == [20, 20]  # --quick
    local, remote = map(number, column(runs, "jobs/s"))
    speedup = number(out.rstrip().splitlines()[-1])  # the line under the table leads with it
    assert speedup == pytest.approx(remote / local, rel=0.05)
    assert_nothing_left(run_dir)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_sweep_stops_its_cluster(run_dir, sig, code):
    """Ctrl-C or SIGTERM mid-sweep: the calling threads stop, the cluster is
    stopped in order, and the command exits with 128 + the signal."""
    env = dict(os.environ, XDG_RUNTIME_DIR=run_dir, TMPDIR=run_dir, PYTHONPATH=REPO)
    # SIGINT as a terminal gives it, even if pytest runs as a shell's background job
    # (whose children inherit an ignored SIGINT, and would never see this one).
    proc = subprocess.Popen(command("powerhose-bench") + ["--sweep", "--quiet"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
    assert_nothing_left(run_dir)


def test_own_target_and_data(run_dir):
    out = run_bench("--target", "tests.targets:echo", "--data", "hello", "--workers", "1",
                    tmp_dir=run_dir)
    [runs] = tables(out)
    assert len(runs) == 3 and all(number(rate) > 0 for rate in column(runs, "jobs/s"))


def test_bad_target_says_one_line_and_exits_1(run_dir):
    """As every other command: no traceback, and no cluster started."""
    env = dict(os.environ, XDG_RUNTIME_DIR=run_dir, PYTHONPATH=REPO)
    result = subprocess.run(command("powerhose-bench") + ["--target", "no_such_module:job"],
                            capture_output=True, text=True, timeout=60, env=env, cwd=run_dir)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert os.listdir(run_dir) == []  # not even the default endpoints' directory


def test_sweep_with_plot(run_dir):
    plot = os.path.join(run_dir, "sweep.png")
    out = run_bench("--sweep", "--workers", "2", "--rounds", "2", "--plot", plot,
                    tmp_dir=run_dir)
    [sweep] = tables(out)
    assert [float(ms) for ms in column(sweep, "job ms")] == [0.05, 0.1, 0.25, 0.5]  # --quick
    assert [int(jobs) for jobs in column(sweep, "jobs")] == [20] * 4
    for median, spread in zip(column(sweep, "speed-up"), column(sweep, "rounds")):
        low, high = map(float, re.findall(r"[\d.]+", spread))
        assert low <= number(median) <= high  # the median round, within the lowest and highest
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert_nothing_left(run_dir)


def test_bench_script_is_the_same_command():
    script = subprocess.run([sys.executable, os.path.join(BENCH, "bench.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    installed = subprocess.run(command("powerhose-bench") + ["--help"], capture_output=True,
                               text=True, timeout=60)
    assert script.returncode == installed.returncode == 0
    assert script.stdout == installed.stdout


# -- the measuring library -----------------------------------------------------------------

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


def test_single_round_break_evens():
    crossing, flat = [(0.1, 0.5), (1.0, 1.5)], [(0.1, 0.2), (1.0, 0.9)]
    found, missed = bench.single_round_break_evens([crossing, [(0.1, 1.2), (1.0, 2.0)], flat])
    assert found == [0.1, pytest.approx(10 ** -0.5)] and missed == 1
    assert bench.single_round_break_evens([flat, flat]) == ([], 2)


def test_break_even_interpolation():
    assert bench.break_even([(0.1, 0.5), (1.0, 1.5)]) == pytest.approx(10 ** (-1 + 0.5),
                                                                       rel=1e-6)
    assert bench.break_even([(0.1, 1.2), (1.0, 2.0)]) == 0.1
    assert bench.break_even([(0.1, 0.2), (1.0, 0.9)]) is None


def test_builtin_job_is_a_real_hmac_chain():
    import hmac

    key = b"k" * 100  # longer than a block: hashed first, as RFC 2104 says
    for _ in range(3):
        key = hmac.digest(key, b"powerhose bench", "sha256")
    assert bench.hmac_chain(Job(b"3:" + b"k" * 100)) == key


def test_table_reads_back_as_a_simple_table():
    text = bench.table(["path", "jobs/s", "note"], [["in-process", 1200, "a b"],
                                                    ["powerhose", "15", ""]])
    assert tables(text) == [[["path", "jobs/s", "note"], ["in-process", "1200", "a b"],
                             ["powerhose", "15", ""]]]
    assert text.splitlines()[3].index("1200") == text.splitlines()[4].index("15") - 2


# -- the scripts that study the product ----------------------------------------------------

def needs_compiled_multipart():
    """bench/lease_fast.pyx (direct.py's compiled prototype) cimports it."""
    if not multipart.COMPILED:
        missing("pyramid_powerhose/multipart.py was not compiled: direct.py's compiled "
                "prototype cannot be built")


@diagnostic
def test_direct_script_times_every_path_and_leaves_nothing(tmp_path):
    """bench/direct.py, a smoke run of every path (half a minute: with the
    diagnostics, out of the default run, which runs the next test): the same
    paths in the round-trip and jobs/s tables, every figure positive, a
    verdict per goal, nothing left behind."""
    needs_compiled_multipart()
    out = run_script("direct.py", "--quick", tmp_path=tmp_path)
    assert machine_header(out)
    round_trip, rates, break_evens, verdicts = tables(out)
    paths = column(round_trip, "round trip (us)")
    assert paths[0].startswith("(i) ") and len(paths) == 13
    assert "(i-b) powerhose, relayed" in paths
    assert "(iv-f) lease, compiled" in paths  # built by the run, in its private dir
    assert all(number(cell) > 0 for cell in column(round_trip, "median") + column(round_trip, "p99"))
    assert set(column(rates, "8 threads")) < set(paths)
    assert all(number(cell) > 0 for cell in column(rates, "jobs/s"))
    assert [float(row[0]) for row in break_evens[1:-1]] == [0.1, 0.5]  # --quick
    assert all(number(cell) > 0 for row in break_evens[1:-1] for cell in row[1:])
    assert set(column(verdicts, "verdict")) <= {"met", "NOT met", "not reached"}
    assert list(tmp_path.glob("ph-direct-*")) == []
    assert_nothing_left("direct.py", tmp_path)


def test_direct_script_runs_only_the_paths_named(tmp_path):
    """--only: the 1-hop floor and the paths named, the compiled lease among them."""
    needs_compiled_multipart()
    out = run_script("direct.py", "--quick", "--no-break-even", "--only", "lease-fast",
                     "lease-lean", tmp_path=tmp_path)
    round_trip, rates, verdicts = tables(out)
    assert column(round_trip, "round trip (us)") == [
        "(iii) 1-hop floor", "(iv-e) lease, one socket, packed", "(iv-f) lease, compiled"]
    assert all(number(cell) > 0 for cell in column(round_trip, "median"))
    assert column(rates, "/ powerhose") == ["-", "-"]  # powerhose was not run
    assert set(column(verdicts, "verdict")) <= {"met", "NOT met"}
    assert list(tmp_path.glob("ph-direct-*")) == []
    assert_nothing_left("direct.py", tmp_path)


def test_direct_script_with_a_gap_times_jobs_one_at_a_time(tmp_path):
    """--gap: one round-trip table of the paths named, nothing else measured."""
    out = run_script("direct.py", "--quick", "--gap", "2", "--only", "relayed",
                     tmp_path=tmp_path)
    (round_trip,) = tables(out)
    assert column(round_trip, "round trip (us)") == [
        "(i-b) powerhose, relayed", "(iii) 1-hop floor"]
    assert all(number(cell) > 0 for cell in column(round_trip, "median"))
    assert column(round_trip, "/ 1-hop")[-1] == "1.00"
    assert list(tmp_path.glob("ph-direct-*")) == []
    assert_nothing_left("direct.py", tmp_path)


def test_ends_script_splits_a_direct_round_trip_and_leaves_nothing(tmp_path):
    """bench/ends.py, a smoke run: the three round trips, each end's share the
    difference of two medians, its cluster and echo loop gone."""
    out = run_script("ends.py", "--quick", tmp_path=tmp_path)
    assert machine_header(out)
    [trips] = tables(out)
    assert column(trips, "round trip (us)") == [
        "client -> worker", "DEALER -> worker", "DEALER -> echo"]
    medians = [number(cell) for cell in column(trips, "median")]
    assert all(median > 0 for median in medians)
    added = column(trips, "added")
    assert number(added[0]) == pytest.approx(medians[0] - medians[1], abs=0.11)
    assert number(added[1]) == pytest.approx(medians[1] - medians[2], abs=0.11)
    assert added[2] == ""
    assert list(tmp_path.glob("ph-ends-*")) == []
    assert_nothing_left("ends.py", tmp_path)


def test_engines_script_times_this_trees_brokers_and_leaves_nothing(tmp_path):
    """bench/engines.py, a smoke run of the contestants it builds nothing for:
    every figure positive, its brokers, workers and temp trees gone."""
    out = run_script("engines.py", "--quick", "--only", "relay,current,current-pure",
                     tmp_path=tmp_path)
    contestants, round_trip, rates, break_evens, targets = tables(out)
    names = column(contestants, "contestant")
    assert names == ["relay", "current", "current-pure"]
    assert dict(zip(names, column(contestants, "engine")))["current-pure"] == "python"
    assert column(round_trip, "round trip (us)") == column(rates, "jobs/s") == names
    assert all(number(cell) > 0 for cell in column(round_trip, "median") + column(rates, "median"))
    assert all(number(cell) > 0 for row in break_evens[1:-1] for cell in row[1:])
    assert [row[0] for row in targets[1:]] == names[1:]
    assert list(tmp_path.glob("ph-engines-*")) == []
    assert_nothing_left("engines.py", tmp_path)


@diagnostic
@pytest.mark.timeout(600)
def test_engines_script_times_every_contestant_and_leaves_nothing(tmp_path):
    """bench/engines.py, a smoke run with every contestant, two of them built
    from older commits (about 2 minutes: with the diagnostics, out of the
    default run): every contestant's round trip, jobs/s and speed-ups are
    positive, and its brokers, workers and temp trees are gone."""
    out = run_script("engines.py", "--quick", tmp_path=tmp_path, timeout=500)
    assert machine_header(out)
    contestants, round_trip, rates, break_evens, targets = tables(out)
    names = column(contestants, "contestant")
    engines = dict(zip(names, column(contestants, "engine")))
    assert engines["baseline-python"] == engines["current-pure"] == "python"
    assert column(round_trip, "round trip (us)") == names
    assert all(number(cell) > 0 for cell in column(round_trip, "median") + column(round_trip, "p99"))
    assert column(rates, "jobs/s") == names
    assert all(number(cell) > 0 for cell in column(rates, "median"))
    assert break_evens[0][3:] == names
    sizes = break_evens[1:-1]  # the last row: each path's break-even
    assert [float(row[0]) for row in sizes] == [0.1, 0.5]  # --quick
    assert all(number(cell) > 0 for row in sizes for cell in row[1:])
    assert [row[0] for row in targets[1:]] == names[1:]  # every contestant but the relay
    assert list(tmp_path.glob("ph-engines-*")) == []  # the baseline, the copy, the run dir
    assert_nothing_left("engines.py", tmp_path)
    if "baseline-native" not in names:
        missing("the baseline's native broker did not build (g++ and libzmq3-dev)")


# -- the diagnostics: the machine, not the product -----------------------------------------

@diagnostic
def test_threads_script_accounts_for_every_thread(tmp_path):
    """bench/threads.py, a few jobs: every row is there and nothing is left behind."""
    out = run_script("threads.py", "--ms", "0.05", "--jobs", "200", "--rounds", "1",
                     tmp_path=tmp_path, timeout=120)
    assert machine_header(out)
    [threads] = tables(out)
    rows = threads[1:]
    assert len(rows) == 10  # 7 kinds of thread, their sum, the job in the workers and here
    for row in rows[:7]:
        # CPU us/job: whole, and at 200 jobs a 10 ms tick is 50 us/job, so 0 or
        # negative where the job's own time is subtracted; sleeps and
        # preemptions per job.
        assert re.fullmatch(r"-?\d+", row[1]) and float(row[2]) >= 0 and float(row[3]) >= 0
    assert int(rows[-2][1]) > 0 and int(rows[-1][1]) > 0  # the job, in the workers and here
    # The broker's loop (the third row) sleeps between messages: at least
    # once per job would be 1.0; 200 jobs in a fresh round cannot all arrive
    # in one wake-up.
    assert float(rows[2][2]) > 0.1
    assert list(tmp_path.glob("powerhose-threads-*")) == []  # its run directory is removed
    assert_nothing_left(tmp_path)


@diagnostic
def test_wakeups_script_times_every_case_and_leaves_no_child(tmp_path):
    """bench/wakeups.py, a smoke run: a round trip per case, its children reaped."""
    if len(os.sched_getaffinity(0)) < 2:
        missing("bench/wakeups.py needs 2 CPUs")
    out = run_script("wakeups.py", "--quick", tmp_path=tmp_path, timeout=120)
    [cases] = tables(out)
    assert len(cases) == 5  # the header and four cases
    for row in cases[1:4]:
        median, p90 = float(row[1]), float(row[2])
        assert 0 < median <= p90  # a round trip takes time, and the median is no tail
    # The PM QoS case needs write access to /dev/cpu_dma_latency: timed, or not.
    polling = cases[4][1]
    assert not re.fullmatch(r"[\d.]+", polling) or float(polling) > 0
    assert_nothing_left("wakeups.py")  # the pongers and the busy loop were killed and reaped


@diagnostic
def test_floor_script_runs_every_path_and_leaves_nothing(tmp_path):
    """bench/floor.py, a smoke run: every path's speed-up, results checked
    against in-process ones (the script fails otherwise)."""
    out = run_script("floor.py", "--quick", tmp_path=tmp_path)
    assert machine_header(out)
    [sizes] = tables(out)
    assert [float(ms) for ms in column(sizes, "job ms")] == [0.1, 0.5]  # --quick
    assert all(number(cell) > 0 for row in sizes[1:] for cell in row[1:])
    assert list(tmp_path.glob("ph-floor-*")) == []  # its run directory is removed
    assert_nothing_left("floor.py", tmp_path)


@diagnostic
@pytest.mark.parametrize("where", [[], ["--one-cpu"]], ids=["any-cpu", "one-cpu"])
def test_costs_script_counts_each_process_of_every_path_and_leaves_nothing(tmp_path, where):
    """bench/costs.py, a smoke run: CPU and switches per job for each path's
    processes, the totals' ratio to the 1-hop floor's."""
    out = run_script("costs.py", "--quick", *where, tmp_path=tmp_path)
    assert machine_header(out)
    [costs] = tables(out)
    rows = costs[1:]
    assert sorted({row[0] for row in rows}) == ["1-hop", "1-hop+py", "powerhose", "relayed"]
    index = {name: i for i, name in enumerate(costs[0])}
    cpu, main = index["CPU (us)"], index["main thread"]
    totals = {row[0]: row for row in rows if row[1] == "all"}
    assert number(totals["1-hop"][index["CPU / 1-hop"]]) == 1.0
    for path, row in totals.items():
        parts = {r[1]: number(r[cpu]) for r in rows if r[0] == path and r[1] != "all"}
        assert parts["client"] > 0 and min(parts.values()) >= 0
        assert number(row[cpu]) == pytest.approx(sum(parts.values()), abs=0.5)
        for r in rows:
            if r[0] == path and r[1] != "all":  # the main thread is one of its threads
                assert 0 <= number(r[main]) <= number(r[cpu]) + 0.1
    relayed = [r[1] for r in rows if r[0] == "relayed"]
    assert "broker" in relayed  # every relayed job crosses it
    assert list(tmp_path.glob("ph-costs-*")) == []
    assert_nothing_left("costs.py", tmp_path)


@diagnostic
def test_instructions_script_counts_a_process_and_its_floor(tmp_path):
    """bench/instructions.py on the worker alone, a few jobs under valgrind."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        missing("bench/instructions.py needs valgrind: apt-get install valgrind")
    out = run_script("instructions.py", "--only", "worker", "--jobs", "20",
                     tmp_path=tmp_path, timeout=300)
    assert machine_header(out)
    [counts] = tables(out)
    [worker] = counts[1:]
    ours, floor, ratio = number(worker[1]), number(worker[2]), number(worker[3])
    assert ours > 0 and floor > 0 and ratio == pytest.approx(ours / floor, rel=0.02)
    assert list(tmp_path.glob("ph-*")) == []  # its run directory and valgrind's dumps
    assert_nothing_left("valgrind", tmp_path)


def test_curve_script_measures_both_clusters_and_leaves_nothing(tmp_path):
    """bench/curve.py, a smoke run: both rows carry numbers, CURVE's cluster
    really ran (its jobs/s are positive), and nothing is left."""
    out = run_script("curve.py", "--quick", tmp_path=tmp_path)
    (result,) = tables(out)
    assert column(result, "") == ["plain", "curve"]
    assert all(number(cell) > 0 for cell in column(result, "round trip (us)"))
    assert all(number(cell) > 0 for cell in column(result, "jobs/s"))
    assert list(tmp_path.glob("ph-curve-*")) == []
    assert_nothing_left("curve.py", tmp_path)


def test_metrics_cost_script_measures_both_clients_and_leaves_nothing(tmp_path):
    """bench/metrics_cost.py, a smoke run: metrics off and on, both measured."""
    out = run_script("metrics_cost.py", "--quick", tmp_path=tmp_path)
    (result,) = tables(out)
    assert column(result, "client") == ["metrics off", "metrics on"]
    assert all(number(cell) > 0 for cell in column(result, "jobs/s"))
    assert list(tmp_path.glob("ph-metrics-*")) == []
    assert_nothing_left("metrics_cost.py", tmp_path)


def test_brokers_script_measures_one_and_two_brokers_and_leaves_nothing(tmp_path):
    """bench/brokers.py, a smoke run: both clusters measured, nothing left."""
    out = run_script("brokers.py", "--quick", tmp_path=tmp_path)
    (result,) = tables(out)
    assert column(result, "") == ["one broker", "two brokers"]
    assert all(number(cell) > 0 for cell in column(result, "jobs/s"))
    assert list(tmp_path.glob("ph-brokers-*")) == []
    assert_nothing_left("brokers.py", tmp_path)
