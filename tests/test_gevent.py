"""The client under gevent: a monkey-patched process whose greenlets wait on
jobs together, without one waiting greenlet stalling the others."""

import json
import subprocess
import sys

from pyramid_powerhose import Client

from .conftest import REPO, wait_for

WORKERS = 5

SCRIPT = """
from gevent import monkey
monkey.patch_all()
import json, sys, time
import gevent
from pyramid_powerhose import Client

client = Client(frontend=sys.argv[1], timeout=30)
client.ping()
ticks = []

def ticker():  # runs only if the hub is free while the jobs wait
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)

tick = gevent.spawn(ticker)
start = time.monotonic()
jobs = [gevent.spawn(client.execute, b"1") for _ in range(int(sys.argv[2]))]
gevent.joinall(jobs, raise_error=True)
took = time.monotonic() - start
tick.kill()
client.close()
print(json.dumps({"took": took, "pids": [job.value.decode() for job in jobs],
                  "ticks": len(ticks)}))
"""


def test_greenlets_wait_on_their_jobs_together(start_broker, start_worker, endpoints):
    start_broker()
    for _ in range(WORKERS):
        start_worker("tests.targets:sleep", "--prefetch", "1")
    with Client(frontend=endpoints.frontend) as client:
        wait_for(lambda: client.stats()["services"].get("default", {}).get("workers")
                 == WORKERS, what="the workers")
    result = subprocess.run([sys.executable, "-c", SCRIPT, endpoints.frontend, str(WORKERS)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(set(out["pids"])) == WORKERS  # each job on its own worker...
    assert out["took"] < 2.5  # ...at the same time: about 1 s, not 5
    assert out["ticks"] > 30  # and the hub ran other greenlets meanwhile
