"""One trace from a Pyramid request through the client and the broker to the
worker: the worker's span is the child of the request's, in another process.

The test process records its spans with the OpenTelemetry SDK's in-memory
exporter; the worker (tests/tracing_targets.py) writes its own to a file.
"""

import json
import os

import pytest
import webtest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pyramid.config import Configurator
from pyramid.response import Response

from pyramid_powerhose import Client, exc
from pyramid_powerhose.plugin import get_powerhose

from .conftest import command, wait_for

EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(_provider)  # once per process: this module's
TRACER = trace.get_tracer("tests")


def tracing_tween(handler, registry):
    """What an instrumented Pyramid app does: a span around each request."""
    def tween(request):
        with TRACER.start_as_current_span(f"HTTP {request.method} {request.path}"):
            return handler(request)
    return tween


def view(request):
    return Response(body=request.powerhose.execute(b"x"))


@pytest.fixture
def traced_worker(start_broker, procs, endpoints, run_dir):
    spans = os.path.join(run_dir, "spans.jsonl")
    start_broker()
    for target, service in (("tests.tracing_targets:echo_headers", "default"),
                            ("tests.tracing_targets:fail", "fail")):
        procs.start(command("powerhose-worker") + [
            target, "--backend", endpoints.backend, "--heartbeat", "0.2",
            "--service", service], "worker", env={"POWERHOSE_TEST_SPANS": spans})
    with Client(frontend=endpoints.frontend) as client:
        wait_for(lambda: client.has_service() and client.has_service("fail"),
                 what="the traced workers")
    return spans


def worker_spans(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_one_trace_from_the_request_to_the_worker(traced_worker, endpoints):
    EXPORTER.clear()
    config = Configurator(settings={"powerhose.frontend": endpoints.frontend,
                                    "powerhose.cluster": "attach"})
    config.include("pyramid_powerhose")
    config.add_tween("tests.test_tracing.tracing_tween")
    config.add_route("job", "/job")
    config.add_view(view, route_name="job")
    app = config.make_wsgi_app()
    try:
        headers = json.loads(webtest.TestApp(app).get("/job").body)
    finally:
        get_powerhose(app.registry).close()
    (request_span,) = EXPORTER.get_finished_spans()
    context = request_span.get_span_context()
    assert headers["traceparent"].split("-")[1] == f"{context.trace_id:032x}"
    wait_for(lambda: os.path.exists(traced_worker), what="the worker's span")
    (job_span,) = worker_spans(traced_worker)
    assert job_span["trace_id"] == context.trace_id  # one trace...
    assert job_span["parent_id"] == context.span_id  # ...the job's span under the request's
    assert job_span["attributes"]["messaging.destination.name"] == "default"


def test_submit_carries_the_trace_and_a_failure_marks_the_span(traced_worker, endpoints):
    with Client(frontend=endpoints.frontend) as client:
        with TRACER.start_as_current_span("caller") as caller:
            future = client.submit(b"x", service="fail")
            with pytest.raises(exc.ExecutionError):
                future.result(10)
    wait_for(lambda: os.path.exists(traced_worker), what="the worker's span")
    (job_span,) = worker_spans(traced_worker)
    assert job_span["trace_id"] == caller.get_span_context().trace_id
    assert job_span["status"] == "ERROR"


def test_without_a_current_span_no_header_is_added(traced_worker, endpoints):
    with Client(frontend=endpoints.frontend) as client:
        assert json.loads(client.execute(b"x", headers={"k": "v"})) == {"k": "v"}
    assert not os.path.exists(traced_worker)  # and the worker made no span


def test_without_opentelemetry_jobs_run_as_before(traced_worker, endpoints):
    """opentelemetry made unimportable: the client adds nothing, and works."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['opentelemetry'] = None\n"
            "from pyramid_powerhose import Client, tracing\n"
            "assert tracing.trace is None\n"
            f"c = Client(frontend={endpoints.frontend!r})\n"
            "print(c.execute(b'x', headers={'k': 'v'}).decode())\n"
            "c.close()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"k": "v"}
