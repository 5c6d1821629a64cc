"""Thin argparse front ends: parse, build Settings, run, map to exit codes.

The options themselves are declared once, in :mod:`pyramid_powerhose.settings`;
each command adds those of its role with ``settings.add_arguments`` and
builds its Settings with ``settings.from_arguments``.
"""

import os
import sys

from ..exc import SettingsError, TargetError
from ..worker import resolve_target


def parse_or_exit(parser, build, argv):
    """Parse argv and build settings; bad values exit 2 with a usage message."""
    args = parser.parse_args(argv)
    try:
        return args, build(args)
    except (SettingsError, ValueError) as exc:
        parser.error(str(exc))


def load_target(target, working_dir=None):
    """The ``target`` callable, imported from ``working_dir`` first if given.

    Every failure is a TargetError of one line, a module that raises while
    it is imported included: a mistyped target on a command line deserves
    a sentence, not a traceback.
    """
    if working_dir is not None:
        sys.path.insert(0, os.path.abspath(working_dir))
    try:
        return resolve_target(target)
    except TargetError as exc:
        message = str(exc)
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raised
        message = f"importing target {target!r} failed: {type(exc).__name__}: {exc}"
    raise TargetError(" ".join(message.split())) from None


__all__ = ["load_target", "parse_or_exit"]
