"""A small Pyramid app for tests under real servers (gunicorn): ``/job`` runs
``tests.targets:sleep`` for the seconds in ``?s=`` and answers which worker
ran it and which server process asked, as JSON."""

import json
import os

from pyramid.config import Configurator
from pyramid.response import Response


def job(request):
    seconds = request.params.get("s", "0")
    worker_pid = request.powerhose.execute(seconds.encode()).decode()
    return Response(json.dumps({"worker": int(worker_pid), "server": os.getpid()}),
                    content_type="application/json", charset="utf-8")


def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.include("pyramid_powerhose")
        config.add_route("job", "/job")
        config.add_view(job, route_name="job")
    return config.make_wsgi_app()
