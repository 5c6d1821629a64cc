"""Smoke runs of bench/soak.py and bench/killstorm.py: short, but the same checks."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def run(script, *args):
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), "--json",
                          "--threads", "4", "--workers", "2", *args],
                         capture_output=True, timeout=180, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def test_soak_smoke():
    report = run("soak.py", "--jobs", "2000")
    assert report["jobs"] == 2000
    assert report["wrong"] == 0 and report["hung"] == 0
    assert report["errors"] == {}
    assert set(report["broker"]) == {"start", "middle", "end"}
    assert all(sample["rss_kib"] > 0 and sample["fds"] > 0
               for sample in report["broker"].values())


def test_killstorm_smoke():
    report = run("killstorm.py", "--jobs", "3000", "--interval", "0.2", "--kills", "3")
    assert report["jobs"] >= 3000  # and more, if 3000 took less than 3 kills
    assert report["wrong"] == 0 and report["hung"] == 0
    assert report["disturbance"]["kills"] >= 3
    assert set(report["errors"]) <= {"WorkerLostError", "NoWorkerError"}, report["examples"]
