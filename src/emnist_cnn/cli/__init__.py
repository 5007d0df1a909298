"""The command line: flags (args), handlers (commands), the parser and entry point (main)."""

from .commands import config_from_args
from .main import build_parser, main

__all__ = ["build_parser", "config_from_args", "main"]
