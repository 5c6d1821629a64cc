#!/usr/bin/env python
"""Kill storm: the soak's load while workers are kill -9-ed; Circus restarts them.

Every ``--interval`` seconds one worker of the cluster, picked at random,
gets SIGKILL.  A job it held fails with a typed error (WorkerLostError);
none may come back wrong or hang.  The load goes on past ``--jobs`` until
at least ``--kills`` workers were killed during it, so that a fast machine
cannot finish the jobs before the first kill.  Prints what
``bench/soak.py`` prints, plus the number of kills.

    python bench/killstorm.py                                  # 60,000 jobs
    python bench/killstorm.py --jobs 3000 --interval 0.2 --kills 3 --json   # smoke run
"""

from __future__ import annotations

import os
import random
import signal
import sys

import soak  # bench/soak.py, beside this file


class KillWorkers:
    """The disturbance: a worker kill -9-ed every ``interval`` seconds until stopped."""

    def __init__(self, interval, at_least):
        self.interval, self.at_least = interval, at_least
        self.kills = 0

    def wants_more(self) -> bool:
        """True until ``at_least`` kills: the load waits for them."""
        return self.kills < self.at_least

    def __call__(self, cluster, stop) -> dict:
        while not stop.wait(self.interval):
            workers = cluster.pids()["workers"]
            if workers:
                try:
                    os.kill(random.choice(workers), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass
        return {"kills": self.kills}


def main(argv=None):
    p = soak.parser(__doc__.splitlines()[0])
    p.set_defaults(jobs=60_000)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between kills")
    p.add_argument("--kills", type=int, default=1,
                   help="the load goes on past --jobs until this many workers were killed")
    args = p.parse_args(argv)
    if args.interval <= 0 or args.kills < 0:
        p.error("--interval must be above 0 and --kills at least 0")
    report = soak.run(args, KillWorkers(args.interval, args.kills))
    soak.show(report, args.json)
    return 1 if report["wrong"] or report["hung"] else 0


if __name__ == "__main__":
    sys.exit(main())
