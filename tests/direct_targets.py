"""A target for tests/test_direct_worker.py (powerhose-worker tests.direct_targets:NAME)."""

import time

from pyramid_powerhose import get_params


def ledger(job):
    """Appends the data to the file named by the ``log`` param (proof that the
    job ran), then: data ``sleep:S`` sleeps S seconds, data starting with
    ``fail`` raises ValueError, anything else is echoed."""
    with open(get_params()["log"], "ab") as f:
        f.write(job.data + b"\n")
    if job.data.startswith(b"sleep:"):
        time.sleep(float(job.data[len(b"sleep:"):]))
    elif job.data.startswith(b"fail"):
        raise ValueError("failed: " + job.data.decode())
    return job.data
