"""The subcommands of `istack`: one module each, with its argparse and ``main(argv) -> exit code``.

``COMMANDS`` maps a subcommand to its module here and its one-line summary; :mod:`istack_ds.cli`
dispatches to them. The scripts in tools/ are three-line wrappers around the same ``main``. Their parsers
use :class:`HelpFormatter` (`--help` shows each option's default).
"""

from __future__ import annotations

import argparse

#: subcommand -> (module of this package, one-line summary). A module that is not there is not offered.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a student (also --print-config, --dry-run); every rank runs this"),
    "prepare": ("prepare", "a corpus (any layout `shard` reads) -> lhotse manifests -> cuts per split"),
    "shard": ("shard", "a corpus -> WebDataset shards + index.json per split (resumable)"),
    "check": ("check", "check every shard of an index: sizes, sha256, decoding, duplicate keys"),
    "export": ("export", "a checkpoint -> a Hugging Face directory AutoModel loads"),
    "convert": ("convert", "a checkpoint -> a universal one that resumes on any number of ranks"),
    "compare": ("compare", "compare runs from their TensorBoard logs: a plot and a table"),
    "probe": ("probe", "probe a student's layers"),
    "init-config": ("init_config", "write a shipped config (demo, paper_*) to edit and train with"),
    "make-teacher": ("make_teacher", "save a RANDOM teacher with the real HF classes (tests, demo)"),
    "train-teacher": ("train_teacher", "train a small HuBERT teacher on a labelled espeak-ng corpus (CPU, cached)"),
    "make-demo-corpus": ("make_demo_corpus", "write a small synthetic corpus in LibriLight layout (demo, tests)"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The `--help` of every command: the description as written (its examples keep their lines), and each
    option's default after its help, ``(default: X)``, unless the help already names it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # NOTE: by identity: 0 == False, and a default of 0 is worth showing.
        none = default is None or default is False or default is argparse.SUPPRESS or default == []
        if "default" in text or none or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"
