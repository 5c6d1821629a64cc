"""The seed's bench.py: ``python bench/bench.py --help`` (same as ``powerhose-bench``)."""

import sys

from pyramid_powerhose.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
