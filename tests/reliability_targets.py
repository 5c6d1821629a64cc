"""Worker targets for the reliability tests (powerhose-worker tests.reliability_targets:NAME)."""

import re

_leak = []


def regex(job):
    """b'ok' answers at once; anything else backtracks in C, holding the GIL for
    hours (each extra 'a' doubles the time: 24 take about 2 s)."""
    if job.data == b"ok":
        return b"ok"
    return str(bool(re.match(r"(a+)+$", "a" * 40 + "b")))


def leak(job):
    """Keeps the number of MiB in the data for ever; answers with the total kept."""
    _leak.append(bytearray(int(job.data or b"0") << 20))
    return str(sum(map(len, _leak)) >> 20)
