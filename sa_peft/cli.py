"""The ``sa-peft`` command: ``generate``, ``fisher``, ``evaluate`` and the adapter tools."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import report_input_errors

SUBCOMMANDS = ("generate", "fisher", "evaluate", "attack", "merge", "export", "inspect")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sa-peft", description="Selective Amnesia concept erasure as a forget LoRA for diffusers pipelines."
    )
    parser.add_argument("--version", action="version", version=f"sa-peft {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"sa_peft.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return report_input_errors(f"sa-peft {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
