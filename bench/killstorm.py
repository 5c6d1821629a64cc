#!/usr/bin/env python
"""Kill storm: the soak's load while workers are kill -9-ed; Circus restarts them.

Every ``--interval`` seconds one worker of the cluster, picked at random,
gets SIGKILL.  A job it held fails with a typed error (WorkerLostError);
none may come back wrong or hang.  Prints what ``bench/soak.py`` prints,
plus the number of kills.

    python bench/killstorm.py                                  # 60,000 jobs
    python bench/killstorm.py --jobs 3000 --interval 0.3 --json   # smoke run
"""

from __future__ import annotations

import os
import random
import signal
import sys

import soak  # bench/soak.py, beside this file


def kill_workers(interval):
    def storm(cluster, stop) -> dict:
        kills = 0
        while not stop.wait(interval):
            workers = cluster.pids()["workers"]
            if workers:
                try:
                    os.kill(random.choice(workers), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
        return {"kills": kills}
    return storm


def main(argv=None):
    p = soak.parser(__doc__.splitlines()[0])
    p.set_defaults(jobs=60_000)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between kills")
    args = p.parse_args(argv)
    report = soak.run(args, kill_workers(args.interval))
    soak.show(report, args.json)
    return 1 if report["wrong"] or report["hung"] else 0


if __name__ == "__main__":
    sys.exit(main())
