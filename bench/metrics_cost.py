#!/usr/bin/env python
"""What do the metrics cost a job?  The web process's metrics on and off, side by side.

One broker and 2 echo workers; two clients of it taking turns within every
round (:func:`harness.run_rounds`): a plain ``Client``, and the same
wrapped as ``pyramid_powerhose.metrics`` wraps it (``RecordingClient``: a
Prometheus histogram observation per call).  The broker's own statistics
(histograms of wait, run and total time, outcomes) are always kept, for
both: their cost is in every broker figure of ``engines.py``.

    python bench/metrics_cost.py            # 7 rounds, about a minute
    python bench/metrics_cost.py --quick    # smoke run
    PROMETHEUS_MULTIPROC_DIR=/tmp/m python bench/metrics_cost.py   # multiprocess mode
"""

from __future__ import annotations

import os

import harness

from pyramid_powerhose import Client
from pyramid_powerhose.metrics import RecordingClient

WORKERS = 2


def main(argv=None):
    args = harness.pair_args(__doc__.split("\n\n")[0], argv)
    mode = "multiprocess" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "single-process"
    with harness.private_dir("ph-metrics-") as run_dir:
        procs = harness.Processes(run_dir)
        try:
            plain, _, _ = harness.start_powerhose(
                procs, f"ipc://{run_dir}/f.sock", f"ipc://{run_dir}/b.sock",
                harness.ECHO_TARGET, WORKERS)
            recording = RecordingClient(Client(frontend=plain.frontend, timeout=60.0),
                                        "default")
            lat, tput = harness.run_pair({"metrics off": plain, "metrics on": recording}, args)
            procs.check()
        finally:
            procs.close()
        print(harness.pair_report(
            lat, tput, args, f"ipc, {WORKERS} echo workers, prometheus_client in {mode} mode",
            "client", "metrics off", "metrics on"))
        return 0


if __name__ == "__main__":
    harness.run_script(main)
