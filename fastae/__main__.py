"""Command line: `fastae demo` (the main job) and `fastae bench`."""

from __future__ import annotations

import argparse
import os
import signal
import sys

INTERRUPTED = 130  # main's status after Ctrl-C: the shell's for SIGINT


def main(argv: list[str] | None = None) -> int:
    # the installed script's name, else how the module was run
    prog = "fastae" if sys.argv and sys.argv[0].endswith("fastae") else "python -m fastae"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from . import benchmark, demo

    demo.add_arguments(
        commands.add_parser(
            "demo",
            help="train autoencoders on digits",
            description="Train plain, sparse, denoising and contractive autoencoders (and a "
            "deep and a stacked one, DEC and a VAE) on scikit-learn's digits, print one table "
            "comparing them with PCA, IsolationForest and logistic regression, and write PNGs "
            "to --out.",
        )
    )
    benchmark.add_arguments(
        commands.add_parser(
            "bench",
            help="time fastae against eager and compiled PyTorch",
            description="Time fastae's ops and training steps beside eager PyTorch and "
            "torch.compile of it (providers taking turns, one call each per round) and print "
            "the ratio table.",
        )
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return demo.run(args)
        return benchmark.run(args)  # the subparsers are required: the command is bench
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback
        print(f"\n{prog} {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


def entry() -> None:
    """The command: exits with :func:`main`'s status; after Ctrl-C, by SIGINT itself (as
    Python does for an uncaught KeyboardInterrupt), so that a shell's loop running the command
    stops too."""
    status = main()
    if status == INTERRUPTED and os.name == "posix":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(status)


if __name__ == "__main__":
    entry()
