"""A trace that crosses the job: W3C trace context in the job's headers.

With ``opentelemetry-api`` installed (the ``[tracing]`` extra), a client
adds the current span's context to each job's headers (``traceparent``,
``tracestate``), and a worker runs the target inside a span that is that
context's child, so that one trace runs from a web request through the
broker to the worker.  Without it installed, nothing is imported and
nothing changes; without a current span, no header is added.
"""

from __future__ import annotations

import contextlib

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind
except ImportError:  # the [tracing] extra is not installed
    trace = None

TRACEPARENT = "traceparent"


def inject(headers: dict) -> dict:
    """``headers``, plus the current span's context if there is one."""
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return headers
    carrier = dict(headers)
    propagate.inject(carrier)
    return carrier


def traced(job) -> bool:
    """Whether ``job`` carries a trace to continue: without one, a worker
    calls the target directly (a context manager costs more than a small
    job's own work)."""
    return trace is not None and TRACEPARENT in job.headers


@contextlib.contextmanager
def job_span(job):
    """In a worker: the span of one job, the child of the client's, if it sent one."""
    if not traced(job):
        yield None
        return
    tracer = trace.get_tracer("pyramid_powerhose")
    with tracer.start_as_current_span(
            f"powerhose job {job.service}", context=propagate.extract(job.headers),
            kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "powerhose", "messaging.destination.name":
                        job.service, "messaging.message.id": job.id.decode("ascii", "replace"),
                        "messaging.message.body.size": len(job.data)}) as span:
        yield span
