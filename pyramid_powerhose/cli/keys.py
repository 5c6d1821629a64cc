"""``powerhose keys DIR NAME...``: CURVE key pairs for a broker, clients and workers.

Writes ``DIR/NAME.key`` (the public key, to hand out: a broker's to its
clients and workers, theirs to the broker's allow-list directory) and
``DIR/NAME.key_secret`` (the pair, to keep), both mode 0600, with
:func:`zmq.auth.create_certificates`.  Never overwrites a key.
"""

import argparse
import os
import sys

import zmq.auth

from ..curve import require_curve
from ..exc import SettingsError


def make_parser():
    parser = argparse.ArgumentParser(
        prog="powerhose keys",
        description="Write CURVE key pairs: DIR/NAME.key (public) and DIR/NAME.key_secret "
        "(secret), mode 0600.")
    parser.add_argument("dir", help="where to write them (created, mode 0700, if missing)")
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help="one pair per name, e.g. broker web1 worker1")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    try:
        require_curve()
    except SettingsError as exc:
        print(f"powerhose keys: {exc}", file=sys.stderr)
        return 1
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    taken = [path for name in args.names for path in (
        os.path.join(args.dir, f"{name}.key"), os.path.join(args.dir, f"{name}.key_secret"))
        if os.path.exists(path)]
    if taken:
        print(f"powerhose keys: {taken[0]} exists; not overwriting a key", file=sys.stderr)
        return 1
    old = os.umask(0o077)  # no moment at which another user could read a secret
    try:
        for name in args.names:
            for path in zmq.auth.create_certificates(args.dir, name):
                os.chmod(path, 0o600)
                print(path)
    finally:
        os.umask(old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
