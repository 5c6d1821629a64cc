"""Logging set-up for the command-line programs (never called by the library).

A failure storm (a broker down, an attacker sending garbage, a target
that always raises) logs the same line thousands of times a second and
can fill a disk; :class:`RepeatFilter` keeps a few of each kind per
interval and says how many it dropped.
"""

import logging
import sys
import time

FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"

BURST = 20  # records of one kind let through per interval
INTERVAL = 10.0  # seconds


class RepeatFilter(logging.Filter):
    """At most ``burst`` records of one kind per ``interval`` seconds.

    A kind is a logger, a level and a message *template* (``record.msg``,
    before its arguments), so "job 'a1' failed" and "job 'b2' failed" are
    one kind.  Records below ``level`` (debug output, asked for) all pass.
    The first record of a kind let through after some were dropped says
    how many, so nothing disappears without a trace.  ``clock`` is for tests.
    """

    MAX_KINDS = 1000  # a template built per call (an f-string) must not grow the table

    def __init__(self, burst=BURST, interval=INTERVAL, level=logging.INFO,
                 clock=time.monotonic):
        super().__init__()
        self.burst, self.interval, self.level, self.clock = burst, interval, level, clock
        self._kinds = {}  # kind -> [window start, records let through, records dropped]

    def filter(self, record) -> bool:
        if record.levelno < self.level:
            return True
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        kind = (record.name, record.levelno, template)
        now = self.clock()
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.interval:
            dropped = state[2] if state is not None else 0
            if state is None and len(self._kinds) >= self.MAX_KINDS:
                self._forget(now)
            state = self._kinds[kind] = [now, 0, dropped]
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        if state[2]:
            record.msg = (f"{record.msg} [and {state[2]} similar messages suppressed; "
                          f"at most {self.burst} per {self.interval:g}s]")
            state[2] = 0
        return True

    def _forget(self, now):
        """Drop the kinds whose window is over (or all, if none is)."""
        stale = [kind for kind, state in self._kinds.items()
                 if now - state[0] >= self.interval] or list(self._kinds)
        for kind in stale:
            del self._kinds[kind]


def configure(logfile="stdout", debug=False):
    if logfile == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    elif logfile == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(logfile)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    return handler.stream
