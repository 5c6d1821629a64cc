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
import contextvars

try:
    from opentelemetry import context, propagate, trace
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
    from opentelemetry.trace import SpanKind
except ImportError:  # the [tracing] extra is not installed
    trace = None

TRACEPARENT = "traceparent"


def _context_getter():
    """The cheapest call that returns OpenTelemetry's current context.

    Asking for the current span costs several Python calls per job, most
    often to learn there is none.  Its context is empty then (no span, no
    baggage), which one look at the context says: with the default runtime
    context, its ContextVar's ``get``, a C call.  Those are private names,
    so with another runtime context, or another layout of the API, the
    public ``context.get_current``.
    """
    runtime = getattr(context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    if type(runtime) is ContextVarsRuntimeContext and isinstance(var, contextvars.ContextVar):
        return var.get
    return context.get_current


_current_context = _context_getter() if trace is not None else None


def inject(headers: dict) -> dict:
    """``headers``, plus the current span's context if there is one."""
    if trace is None or not _current_context():  # an empty context holds no span
        return headers
    if not trace.get_current_span().get_span_context().is_valid:
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
