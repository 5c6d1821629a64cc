"""Prometheus metrics: the stats of a BrokerCore converted exactly, the
``powerhose metrics`` exporter against a real broker (and none), the
exporter as a cluster's watcher, and the client's view in real Pyramid apps
under prometheus_client's multiprocess mode."""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from pyramid_powerhose import get_cluster
from pyramid_powerhose import protocol as p
from pyramid_powerhose.broker_core import BUCKETS
from pyramid_powerhose.exc import BrokerLostError, ClusterError
from pyramid_powerhose.metrics import DEFAULT_LISTEN, BrokerCollector, parse_listen
from pyramid_powerhose.settings import Settings
from pyramid_powerhose.watchers import METRICS, circus_config

from .conftest import REPO, alive, command, read_log, wait_for
from .test_broker_core import command as command_from
from .test_broker_core import make_core, ready, reply, reply_error, submit

LE = [floatToGoString(bound) for bound in BUCKETS] + ["+Inf"]


# -- reading an exposition -------------------------------------------------------------

def parse(text):
    """{family name: family} of a text exposition."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families, sample_name, **labels):
    """The value of the one sample called ``sample_name`` with exactly ``labels``."""
    family_name = sample_name
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if family_name not in families and family_name.endswith(suffix):
            family_name = family_name[:-len(suffix)]
    found = [s.value for s in families[family_name].samples
             if s.name == sample_name and s.labels == labels]
    assert len(found) == 1, (sample_name, labels, families[family_name].samples)
    return found[0]


def buckets(families, name, **labels):
    """[(le, cumulative count), ...] of a histogram's series."""
    return [(s.labels["le"], s.value) for s in families[name].samples
            if s.name == name + "_bucket"
            and {k: v for k, v in s.labels.items() if k != "le"} == labels]


def expose(stats):
    registry = CollectorRegistry()
    registry.register(BrokerCollector(lambda: stats))
    return parse(generate_latest(registry).decode())


# -- the conversion, exactly -----------------------------------------------------------------

def core_stats():
    """One job OK in 4 ms, one failed in 20 ms, one running; one queued for a service
    without workers; of five workers, two left and one expired."""
    core = make_core(heartbeat=1.0, liveness=3)
    for worker in (b"w1", b"w2"):
        ready(core, 0.0, worker)
    for worker in (b"x1", b"x2"):
        ready(core, 0.0, worker, service=b"spare")
    submit(core, 1.0, b"c", b"1")  # to w1
    submit(core, 1.0, b"c", b"2")  # to w2
    reply(core, 1.004, b"w1", b"c", b"1")
    reply_error(core, 1.02, b"w2", b"c", b"2")
    for worker in (b"x1", b"x2"):
        command_from(core, 1.5, worker, p.DISCONNECT)
    submit(core, 2.0, b"c", b"3")  # to w1, idle the longest; it runs on
    command_from(core, 3.0, b"w1", p.HEARTBEAT)
    core.tick(4.1)  # w2, silent since 1.02, expires
    submit(core, 4.5, b"c", b"4", service=b"other")
    return core.stats(5.0)


def test_the_stats_of_a_core_become_these_metrics():
    stats = core_stats()
    families = expose(stats)
    assert all(name.startswith("powerhose_") for name in families)
    assert value(families, "powerhose_up") == 1
    assert value(families, "powerhose_broker_uptime_seconds") == 5.0
    assert value(families, "powerhose_broker_stopping") == 0
    assert value(families, "powerhose_broker_info",
                 pid=str(stats["pid"]), engine=stats["engine"]) == 1

    assert families["powerhose_jobs"].type == "counter"
    assert {(s.labels["service"], s.labels["outcome"]): s.value
            for s in families["powerhose_jobs"].samples} \
        == {("svc", "OK"): 1, ("svc", "ExecutionError"): 1}
    assert {s.labels["event"]: s.value for s in families["powerhose_worker_events"].samples} \
        == {"registered": 4, "left": 2, "lost": 0, "expired": 1}

    assert value(families, "powerhose_workers", service="svc", state="idle") == 0
    assert value(families, "powerhose_workers", service="svc", state="busy") == 1
    for service in ("spare", "other"):
        for state in ("idle", "busy"):
            assert value(families, "powerhose_workers", service=service, state=state) == 0
    assert value(families, "powerhose_queue_jobs", service="svc") == 0
    assert value(families, "powerhose_queue_jobs", service="other") == 1
    assert value(families, "powerhose_queue_bytes", service="other") \
        == stats["services"]["other"]["queued_bytes"] > 0

    run = dict(buckets(families, "powerhose_job_run_seconds", service="svc"))
    assert list(run) == LE
    assert (run["0.0025"], run["0.005"], run["0.01"], run["0.025"], run["+Inf"]) \
        == (0, 1, 1, 2, 2)
    assert value(families, "powerhose_job_run_seconds_count", service="svc") == 2
    assert value(families, "powerhose_job_run_seconds_sum", service="svc") \
        == pytest.approx(0.024)
    # Handed over at once: three waits of 0, in every bucket.
    assert set(dict(buckets(families, "powerhose_job_wait_seconds", service="svc"))
               .values()) == {3}
    total = dict(buckets(families, "powerhose_job_duration_seconds", service="svc"))
    assert (total["0.0025"], total["0.005"], total["0.025"], total["+Inf"]) == (0, 1, 2, 2)
    assert value(families, "powerhose_job_duration_seconds_count", service="other") == 0


def test_every_bucket_is_the_brokers_own():
    stats = core_stats()
    families = expose(stats)
    for field, name in (("wait_seconds", "powerhose_job_wait_seconds"),
                        ("run_seconds", "powerhose_job_run_seconds"),
                        ("total_seconds", "powerhose_job_duration_seconds")):
        for service, svc in stats["services"].items():
            assert [count for _, count in buckets(families, name, service=service)] \
                == [count for _, count in svc[field]["buckets"]]


def test_no_broker_is_up_0_and_nothing_else():
    def no_broker():
        raise BrokerLostError("nothing listens")

    registry = CollectorRegistry()
    registry.register(BrokerCollector(no_broker))
    families = parse(generate_latest(registry).decode())
    assert list(families) == ["powerhose_up"]
    assert value(families, "powerhose_up") == 0


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("[::1]:9100", ("::1", 9100)),
    (" localhost:80 ", ("localhost", 80)),
])
def test_listen_addresses(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9464", ":9464", "127.0.0.1", "127.0.0.1:", "host:0",
                                  "host:65536", "host:http", ""])
def test_bad_listen_addresses(text):
    with pytest.raises(ValueError):
        parse_listen(text)


def test_the_default_listens_on_loopback_only():
    assert parse_listen(DEFAULT_LISTEN)[0] == "127.0.0.1"


# -- the exporter's watcher ------------------------------------------------------------

def test_a_cluster_runs_the_exporter_only_when_asked(endpoints):
    base = Settings(target="tests.targets:echo", frontend=endpoints.frontend,
                    backend=endpoints.backend)
    config = circus_config(base, endpoints.dir, "ipc://x", background=True, python="py")
    assert METRICS not in [w["name"] for w in config["watchers"]]
    config = circus_config(base.replace(metrics_listen="127.0.0.1:9999"), endpoints.dir,
                           "ipc://x", background=True, python="py")
    (watcher,) = [w for w in config["watchers"] if w["name"] == METRICS]
    assert watcher["cmd"] == "py" and watcher["numprocesses"] == 1
    args = watcher["args"]
    assert args[:2] == ["-m", "pyramid_powerhose.cli.metrics"]
    assert args[args.index("--listen") + 1] == "127.0.0.1:9999"
    assert args[args.index("--frontend") + 1] == endpoints.frontend
    assert "--exit-with-parent" in args
    with pytest.raises(ClusterError):
        circus_config(base.replace(metrics_listen="9999"), endpoints.dir, "ipc://x",
                      background=True, python="py")


# -- the exporter process ------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url, timeout=10.0):
    """(status, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def start_exporter(procs, frontend, *args):
    port = free_port()
    proc = procs.start(command("powerhose") + [
        "metrics", "--listen", f"127.0.0.1:{port}", "--frontend", frontend, *args],
        "metrics")
    url = f"http://127.0.0.1:{port}/metrics"

    def answers():
        assert proc.poll() is None, read_log(proc)
        try:
            return scrape(url, timeout=5.0)
        except OSError:
            return None

    wait_for(answers, what="the exporter to answer")
    return proc, url


def test_the_exporter_serves_what_the_broker_counted(cluster, endpoints, client, procs):
    for i in range(7):
        assert client.execute(b"%d" % i) == b"%d" % i
    _, url = start_exporter(procs, endpoints.frontend)
    status, text = scrape(url)
    assert status == 200
    families = parse(text)
    assert value(families, "powerhose_up") == 1
    assert value(families, "powerhose_jobs_total", service="default", outcome="OK") == 7
    for name in ("powerhose_job_wait_seconds", "powerhose_job_run_seconds",
                 "powerhose_job_duration_seconds"):
        assert value(families, name + "_count", service="default") == 7
        assert dict(buckets(families, name, service="default"))["+Inf"] == 7
    assert value(families, "powerhose_workers", service="default", state="idle") \
        + value(families, "powerhose_workers", service="default", state="busy") == 2
    assert value(families, "powerhose_worker_events_total", event="registered") == 2
    client.execute(b"one more")
    # Read again on each scrape; a direct job reaches the broker's counts
    # once its worker is idle (PROTOCOL.rst, "The direct path"), so: soon.
    wait_for(lambda: value(parse(scrape(url)[1]), "powerhose_jobs_total",
                           service="default", outcome="OK") == 8, what="the eighth job")


def test_the_exporter_without_a_broker_answers_up_0(endpoints, procs, start_broker):
    proc, url = start_exporter(procs, endpoints.frontend)
    status, text = scrape(url)
    assert status == 200
    assert value(parse(text), "powerhose_up") == 0
    broker = start_broker()  # and it finds a broker that comes later
    families = parse(scrape(url)[1])
    assert value(families, "powerhose_up") == 1
    assert families["powerhose_broker_info"].samples[0].labels["pid"] == str(broker.pid)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_scrape_stops_the_exporter_once_it_is_answered(
        endpoints, procs, start_broker, sig):
    """socketserver and wsgiref catch what a request raises: a stop raised
    from the signal handler inside a request was swallowed, and the
    exporter served on (seen in CI: still running 10 s after SIGTERM)."""
    start_broker()
    proc, url = start_exporter(procs, endpoints.frontend)
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as scraper:
        scraper.sendall(b"GET /metrics HTTP/1.0\r\n")  # the exporter now waits in the request
        wait_for(lambda: any(c.raddr and c.raddr[1] == scraper.getsockname()[1]
                             for c in psutil.Process(proc.pid).net_connections("tcp")),
                 what="the exporter to take the connection")
        os.kill(proc.pid, sig)
        assert proc.poll() is None  # not while a scrape is being answered
        scraper.sendall(b"\r\n")
        answer = b""
        while chunk := scraper.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200")
    assert proc.wait(5) == 0, read_log(proc)


@pytest.mark.parametrize("listen", ["9464", "0.0.0.0", "127.0.0.1:99999", "127.0.0.1:x"])
def test_a_bad_listen_address_exits_2_with_one_line(listen):
    result = subprocess.run(command("powerhose") + ["metrics", "--listen", listen],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_a_taken_port_exits_1(endpoints):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(command("powerhose") + [
            "metrics", "--listen", f"127.0.0.1:{port}", "--frontend", endpoints.frontend],
            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_cluster_with_metrics_listen_runs_the_exporter(endpoints, client):
    port = free_port()
    cluster = get_cluster("tests.targets:echo", frontend=endpoints.frontend,
                          backend=endpoints.backend, heartbeat=0.2, numprocesses=2,
                          working_dir=REPO, background=True,
                          metrics_listen=f"127.0.0.1:{port}")
    try:
        cluster.start()
        for i in range(3):
            client.execute(b"%d" % i)
        url = f"http://127.0.0.1:{port}/metrics"

        def three_jobs():
            try:
                families = parse(scrape(url, timeout=5.0)[1])
            except OSError:
                return False
            return value(families, "powerhose_jobs_total", service="default",
                         outcome="OK") == 3 if "powerhose_jobs" in families else False

        wait_for(three_jobs, what="the cluster's exporter to count 3 jobs")
        circus = psutil.Process(cluster.pids()["circus"])
        (exporter,) = [p for p in circus.children()
                       if "pyramid_powerhose.cli.metrics" in " ".join(p.cmdline())]
        circus.kill()  # circus cannot stop it any more: it notices its parent is gone
        wait_for(lambda: not alive(exporter), timeout=15, what="the exporter to exit")
    finally:
        cluster.stop()


# -- the client's view in the Pyramid app ----------------------------------------------------

APP = """
import sys

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST, multiprocess
from pyramid.config import Configurator
from pyramid.response import Response
from waitress import create_server


def metrics_view(request):
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST,
                    charset=None)


def job_view(request):
    return Response(request.powerhose.execute(request.body or b"x"))


def nowhere_view(request):
    return Response(request.powerhose.execute(b"x", service="nowhere"))


def many_view(request):
    return Response(b"".join(request.powerhose.map([b"a", b"b", b"c"])))


def submit_view(request):
    return Response(request.powerhose.submit(b"s").result())


config = Configurator(settings={"powerhose.cluster": "attach",
                                "powerhose.frontend": sys.argv[1]})
config.include("pyramid_powerhose")
config.include("pyramid_powerhose.metrics")
for name, view in (("metrics", metrics_view), ("job", job_view),
                   ("nowhere", nowhere_view), ("many", many_view),
                   ("submit", submit_view)):
    config.add_route(name, "/" + name)
    config.add_view(view, route_name=name)
server = create_server(config.make_wsgi_app(), host="127.0.0.1", port=0)
print(server.effective_port, flush=True)
server.run()
"""


def start_app(procs, run_dir, frontend, multiproc_dir):
    script = os.path.join(run_dir, "metrics_app.py")
    with open(script, "w") as f:
        f.write(APP)
    proc = procs.start([sys.executable, script, frontend], "app",
                       env={"PROMETHEUS_MULTIPROC_DIR": multiproc_dir})

    def port():
        assert proc.poll() is None, read_log(proc)
        first = read_log(proc).split("\n", 1)[0]
        return int(first) if first.strip().isdigit() else None

    return f"http://127.0.0.1:{wait_for(port, what='the app to listen')}"


def test_two_app_processes_share_their_round_trips(cluster, endpoints, procs, run_dir):
    multiproc_dir = os.path.join(run_dir, "prometheus")
    os.mkdir(multiproc_dir)
    first = start_app(procs, run_dir, endpoints.frontend, multiproc_dir)
    second = start_app(procs, run_dir, endpoints.frontend, multiproc_dir)
    for app, jobs in ((first, 3), (second, 2)):
        for i in range(jobs):
            assert scrape(f"{app}/job")[0] == 200
    assert scrape(f"{second}/nowhere")[0] == 503  # NoWorkerError
    assert scrape(f"{first}/many") == (200, "abc")
    assert scrape(f"{first}/submit") == (200, "s")

    status, text = scrape(f"{first}/metrics")
    assert status == 200
    families = parse(text)
    name = "powerhose_client_round_trip_seconds"
    assert value(families, name + "_count", service="default", outcome="OK",
                 call="execute") == 5  # both processes'
    assert value(families, name + "_count", service="nowhere", outcome="NoWorkerError",
                 call="execute") == 1
    assert value(families, name + "_count", service="default", outcome="OK", call="map") == 1
    assert value(families, name + "_count", service="default", outcome="OK",
                 call="submit") == 1
    assert dict(buckets(families, name, service="default", outcome="OK",
                        call="execute"))["+Inf"] == 5
    assert scrape(f"{second}/metrics")[1].count(name + "_count") == text.count(name + "_count")


NOT_IMPORTED = """
import json
import sys

import webtest
from pyramid.config import Configurator
from pyramid.response import Response

import pyramid_powerhose

config = Configurator(settings={"powerhose.cluster": "attach",
                                "powerhose.frontend": sys.argv[1]})
config.include("pyramid_powerhose")
config.add_route("job", "/job")
config.add_view(lambda request: Response(request.powerhose.execute(b"x")), route_name="job")
assert webtest.TestApp(config.make_wsgi_app()).get("/job").body == b"x"
print(json.dumps(sorted(m for m in sys.modules if m.startswith("prometheus"))))
"""


def test_without_the_metrics_include_prometheus_client_is_not_imported(cluster, endpoints):
    result = subprocess.run([sys.executable, "-c", NOT_IMPORTED,
                             endpoints.frontend], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
