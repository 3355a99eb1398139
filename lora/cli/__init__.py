"""lora.cli: the `lora` command (commands.py parses, info.py and demo.py do the work).

`lora demo` (demo.py) trains the shipped digits MLP at several ranks; `lora info DIR`
(info.py) describes an adapter; `lora merge` runs lora.io.checkpoint.merge_checkpoint.
"""

from .info import describe_adapter
from .commands import build_parser, main

__all__ = ["main", "build_parser", "describe_adapter"]
