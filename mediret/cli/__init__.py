"""The `mediret` command line: each command parses its options and calls one library function.

One module per command family; importing them registers their commands on ``cli``.
"""

from . import classify, info, ingest, search  # noqa: F401  (registers the commands)
from .common import cli, main

__all__ = ["cli", "main"]
