"""``python -m duopool``: the same as the ``duopool`` command."""

import sys

from duopool.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
