"""Logging set-up for the command-line programs (never called by the library)."""

import logging
import sys

FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def configure(logfile="stdout", debug=False):
    if logfile == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    elif logfile == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(logfile)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    return handler.stream
