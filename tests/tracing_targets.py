"""A worker target that records its spans, for tests/test_tracing.py.

On import (in the worker process) it installs an OpenTelemetry SDK tracer
provider that writes each finished span, as a JSON line, to the file
named by POWERHOSE_TEST_SPANS.
"""

import json
import os

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult


class FileExporter(SpanExporter):
    def export(self, spans):
        with open(os.environ["POWERHOSE_TEST_SPANS"], "a") as f:
            for span in spans:
                f.write(json.dumps({
                    "name": span.name, "trace_id": span.context.trace_id,
                    "span_id": span.context.span_id,
                    "parent_id": span.parent.span_id if span.parent else None,
                    "status": span.status.status_code.name,
                    "attributes": dict(span.attributes)}) + "\n")
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
trace.set_tracer_provider(provider)


def echo_headers(job):
    """The headers the job arrived with, as JSON."""
    return json.dumps(job.headers)


def fail(job):
    raise ValueError("traced failure")
