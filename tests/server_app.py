"""A small Pyramid app for tests under real servers (gunicorn): ``/job`` runs
``tests.targets:sleep`` for the seconds in ``?s=`` and answers which worker
ran it, which server process asked, and when the call began and ended
(``time.monotonic()``: one clock for every process of the machine), as JSON."""

import json
import os
import time

from pyramid.config import Configurator
from pyramid.response import Response


def job(request):
    seconds = request.params.get("s", "0")
    began = time.monotonic()
    worker_pid = request.powerhose.execute(seconds.encode()).decode()
    answer = {"worker": int(worker_pid), "server": os.getpid(),
              "began": began, "ended": time.monotonic()}
    return Response(json.dumps(answer),
                    content_type="application/json", charset="utf-8")


def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.include("pyramid_powerhose")
        config.add_route("job", "/job")
        config.add_view(job, route_name="job")
    return config.make_wsgi_app()
