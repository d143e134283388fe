"""The command line: `istack <command>` and `istack-train` (= `istack train`, also `launchers/train.py`).

    istack --help                       # the commands
    istack --version                    # version, git commit, package versions
    istack train --config configs/demo.yaml --dry-run
    istack shard --corpus data/demo/corpus --out data/demo/shards
    python -m istack_ds.commands <command> ...    # the same without the installed script

``main`` is the training entry every rank runs (launchers/train.py, `istack-train`,
`python -m istack_ds.cli`): see :mod:`istack_ds.commands.train`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from .commands import COMMANDS

__all__ = ["istack", "main"]


def main(argv=None) -> int:
    """`istack-train`: :func:`istack_ds.commands.train.main` (imported here, so `istack --help` stays light)."""
    from .commands.train import main as train

    return train(argv, prog="istack-train")


def available() -> dict[str, tuple[str, str]]:
    """The commands whose module exists (a command listed before its module lands is left out)."""
    return {
        name: (module, summary)
        for name, (module, summary) in COMMANDS.items()
        if importlib.util.find_spec(f"istack_ds.commands.{module}") is not None
    }


class VersionAction(argparse.Action):
    """`--version`: istack_ds's version, its git commit (or that it is no checkout) and the packages it runs on,
    looked up only when asked (git runs a process)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .provenance import describe

        print(describe())
        parser.exit()


def istack(argv=None) -> int:
    """`istack COMMAND [ARGS]`: runs that command's ``main(ARGS)`` and returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = available()
    parser = argparse.ArgumentParser(
        prog="istack",
        description="Fast speech foundation model distillation by interleaved stacking, on DeepSpeed ZeRO.",
        epilog="`istack COMMAND --help` shows a command's options and examples.",
    )
    parser.add_argument("--version", action=VersionAction, help="the version, git commit and package versions")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in commands.items():
        sub.add_parser(name, help=summary, add_help=False)
    # Only the command name is parsed here; its own parser reads the rest (and its --help).
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(f"istack_ds.commands.{commands[args.command][0]}")
    return module.main(argv[1:], prog=f"istack {args.command}")


if __name__ == "__main__":
    sys.exit(main())
