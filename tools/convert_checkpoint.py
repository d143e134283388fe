"""`istack convert` as a script; its usage and code: istack_ds/commands/convert.py."""

from istack_ds.commands.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
