"""Seconds per search step by configuration: see ``entrannas/bench.py`` (``entrannas-tune bench``)."""

import sys

from entrannas.bench import main

if __name__ == "__main__":
    sys.exit(main())
