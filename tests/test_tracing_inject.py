"""tracing.inject alone: the current span's context goes into a job's headers,
and nothing is added (nor copied) without one.  No broker, no SDK: a span
made from a span context is enough to be current."""

import pytest
from opentelemetry import baggage, context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from pyramid_powerhose import tracing

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


def span(valid=True):
    return NonRecordingSpan(SpanContext(
        trace_id=TRACE_ID if valid else 0, span_id=SPAN_ID if valid else 0, is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED)))


@pytest.fixture
def attached():
    """Makes a context current for the test, and restores the one before."""
    tokens = []
    yield lambda ctx: tokens.append(context.attach(ctx))
    for token in reversed(tokens):
        context.detach(token)


def test_without_a_current_span_the_headers_are_returned_as_they_are():
    headers = {"k": "v"}
    assert tracing.inject(headers) is headers
    assert headers == {"k": "v"}


def test_a_current_span_is_injected_in_a_copy():
    headers = {"k": "v"}
    with trace.use_span(span()):
        carried = tracing.inject(headers)
    assert carried["traceparent"] == f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"
    assert carried["k"] == "v"
    assert headers == {"k": "v"}  # the caller's dict is not changed


def test_after_the_span_ends_nothing_is_injected():
    with trace.use_span(span()):
        pass
    headers = {}
    assert tracing.inject(headers) is headers


def test_a_context_with_values_but_no_valid_span_adds_nothing(attached):
    attached(baggage.set_baggage("user", "alice"))  # not empty, but no span
    headers = {"k": "v"}
    assert tracing.inject(headers) is headers
    with trace.use_span(span(valid=False)):
        assert tracing.inject(headers) is headers


def test_a_span_within_a_context_with_other_values_is_injected(attached):
    attached(baggage.set_baggage("user", "alice"))
    with trace.use_span(span()):
        carried = tracing.inject({})
    assert carried["traceparent"].split("-")[1] == f"{TRACE_ID:032x}"
