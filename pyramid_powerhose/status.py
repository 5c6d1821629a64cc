"""What ``powerhose status`` shows: the broker's stats (``mmi.stats``) as tables.

Pure functions of the stats object (PROTOCOL.rst lists its fields): the
percentiles are read from the broker's histograms the way Prometheus'
``histogram_quantile`` reads them, by linear interpolation within the
bucket the rank falls in.
"""

from __future__ import annotations


def quantile(q: float, histogram: dict):
    """The ``q`` quantile (0 to 1) of a cumulative histogram, in seconds, or
    None if it counted nothing.  Above the last finite bound: that bound."""
    count = histogram["count"]
    if not count:
        return None
    rank = q * count
    lower, below = 0.0, 0
    for bound, cumulative in histogram["buckets"]:
        if cumulative >= rank:
            if bound == "+Inf":
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def _ms(seconds) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def table(headers, rows) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines


def service_rows(stats: dict) -> list[list]:
    rows = []
    for name, svc in sorted(stats["services"].items()):
        errors = {code: n for code, n in svc["outcomes"].items() if code != "OK"}
        rows.append([
            name, svc["idle"], svc["busy"], svc["queued"], f"{svc['jobs_per_second']:g}",
            _ms(quantile(0.5, svc["wait_seconds"])), _ms(quantile(0.99, svc["wait_seconds"])),
            _ms(quantile(0.5, svc["run_seconds"])), _ms(quantile(0.99, svc["run_seconds"])),
            svc["done"],
            ", ".join(f"{code} {n}" for code, n in sorted(errors.items())) or "-",
        ])
    return rows


def worker_rows(stats: dict) -> list[list]:
    rows = []
    for w in sorted(stats["workers"], key=lambda w: (w["service"], -w["age"])):
        state = "paused" if w["paused"] else f"{w['holding']} job(s)" if w["holding"] else "idle"
        rows.append([w["address"], w["pid"] or "-", w["host"] or "-", w["service"], state,
                     w["jobs"], _age(w["age"]),
                     "-" if w["last_job_ms"] is None else f"{w['last_job_ms']:g}",
                     "powerhose/1" if w["extended"] else "MDP"])
    return rows


def render(stats: dict) -> str:
    """The report: the broker, then a line per service, then a line per worker."""
    events = stats["worker_events"]
    lines = [
        f"broker pid {stats['pid']} ({stats['engine']}), up {_age(stats['uptime'])}, "
        f"frontend {stats['frontend']}, backend {stats['backend']}"
        + (", STOPPING" if stats["stopping"] else ""),
        f"workers registered {events['registered']}, left {events['left']}, "
        f"lost {events['lost']}, expired {events['expired']}",
        "",
    ]
    lines += table(["service", "idle", "busy", "queued", "jobs/s", "wait p50 ms",
                    "wait p99 ms", "run p50 ms", "run p99 ms", "done", "errors"],
                   service_rows(stats))
    lines.append("")
    lines += table(["worker", "pid", "host", "service", "state", "jobs", "age", "last job ms",
                    "speaks"],
                   worker_rows(stats))
    return "\n".join(lines)
