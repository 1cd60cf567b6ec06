"""The `fisherfast` command.

    fisherfast info                 versions, backends, CPU features
    fisherfast demo                 the main job on the embedded default model
                                    (model, FisherSketch, metric, steering)
    fisherfast spectrum --layer L   pullback-metric diagnostics + spectrum plot
    fisherfast sketch ...           FisherSketch state of a text file or datasets corpus
    fisherfast align SIG...         alignment tables + heatmap of sketch states
    fisherfast select TARGET CAND...  candidate sources ranked by alignment with a target
    fisherfast index add|query|list INDEX ...
                                    a signature index of many domains: append states,
                                    the top-k domains for a target, the domains held
    fisherfast steer --prompt P --target W --layer L
                                    FishBack vs Euclidean steering of p(W | P)

Every argument (layers, sizes, input files, output paths) is checked before a
model loads; a mistake ends in one line on stderr and exit status 2. Outputs
are written atomically and never replace an existing file without --force.
`fisherfast COMMAND --help` shows each command's options and defaults.

Each subcommand is one module of this package that defines
``register(subparsers)``: it adds its parser and sets ``run(args) -> int``.
Modules whose names start with "_" are shared helpers.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from fisherfast.cli._args import OneLineParser, UsageError


def _subcommand_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            if hasattr(module, "register"):
                yield module


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subparser per subcommand module."""
    parser = OneLineParser(prog="fisherfast", description=__doc__.split("\n\nEach subcommand")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _subcommand_modules():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit status.

    0: done. 1: the results were computed but an output went to a fallback
    path (said on stderr). 2: a usage mistake (one line on stderr, nothing
    run). 130: interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a parse error already printed (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.run(args)
    except UsageError as err:
        print(f"fisherfast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fisherfast {args.command}: interrupted", file=sys.stderr)
        return 130
