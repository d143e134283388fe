"""`istack check` as a script; its usage and code: istack_ds/commands/check.py."""

from istack_ds.commands.check import main

if __name__ == "__main__":
    raise SystemExit(main())
