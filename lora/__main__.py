"""`python -m lora ...`: the same command line as the `lora` console script (lora/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
