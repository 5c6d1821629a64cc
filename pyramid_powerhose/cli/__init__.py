"""Thin argparse front ends: parse, build Settings, run, map to exit codes.

The options themselves are declared once, in :mod:`pyramid_powerhose.settings`;
each command adds those of its role with ``settings.add_arguments`` and
builds its Settings with ``settings.from_arguments``.
"""

from ..exc import SettingsError


def parse_or_exit(parser, build, argv):
    """Parse argv and build settings; bad values exit 2 with a usage message."""
    args = parser.parse_args(argv)
    try:
        return args, build(args)
    except (SettingsError, ValueError) as exc:
        parser.error(str(exc))


__all__ = ["parse_or_exit"]
