"""`python -m rankmerge ...`: the `rankmerge` command."""

import sys

from rankmerge.service.cli import main

if __name__ == "__main__":
    sys.exit(main())
