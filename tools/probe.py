"""`istack probe` as a script; its usage and code: istack_ds/commands/probe.py."""

from istack_ds.commands.probe import main

if __name__ == "__main__":
    raise SystemExit(main())
