"""Every subcommand's `--help`: each option says what it does and shows its default (commands/HelpFormatter).

The parsers are taken from each command's own ``main`` (its ``parse_args`` is stopped before anything runs)."""

import argparse
import importlib

import pytest

from istack_ds.commands import COMMANDS, HelpFormatter


class _Parsed(Exception):
    pass


def _parser(command: str, monkeypatch) -> argparse.ArgumentParser:
    captured = []

    def stop(self, args=None, namespace=None):
        captured.append(self)
        raise _Parsed

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # set by some commands before parsing
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    module = importlib.import_module(f"istack_ds.commands.{COMMANDS[command][0]}")
    with pytest.raises(_Parsed):
        module.main([], prog=f"istack {command}")
    return captured[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(command, monkeypatch):
    parser = _parser(command, monkeypatch)
    formatter = parser.formatter_class(prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"istack {command}: {name} has no help"
        default = action.default
        if action.option_strings and default is not None and default is not False and default != []:
            assert "default" in formatter._get_help_string(action), f"istack {command}: {name} hides {default!r}"
    assert issubclass(parser.formatter_class, HelpFormatter), f"istack {command}: --help hides the defaults"
    assert "(default: " in parser.format_help(), parser.format_help()


def test_the_formatter_shows_a_zero_default_and_leaves_none_and_flags_alone():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--out", default=None, help="output")
    parser.add_argument("--force", action="store_true", help="overwrite")
    parser.add_argument("--lr", default=0.1, help="rate (default: fast)")
    text = " ".join(parser.format_help().split())
    assert "seed (default: 0)" in text and "output --force" in text and "overwrite" in text
    assert text.count("default") == 2  # --seed's, and --lr's own
