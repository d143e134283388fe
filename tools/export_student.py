"""`istack export` as a script; its usage and code: istack_ds/commands/export.py."""

from istack_ds.commands.export import main

if __name__ == "__main__":
    raise SystemExit(main())
