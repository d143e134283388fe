"""`istack shard` as a script; its usage and code: istack_ds/commands/shard.py."""

from istack_ds.commands.shard import main

if __name__ == "__main__":
    raise SystemExit(main())
