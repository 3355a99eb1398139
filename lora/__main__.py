"""`python -m lora ...`: the same command line as the `lora` console script
(lora/cli/commands.py)."""

import sys

from .cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
