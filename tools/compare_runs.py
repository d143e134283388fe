"""`istack compare` as a script; its usage and code: istack_ds/commands/compare.py."""

from istack_ds.commands.compare import *  # noqa: F403 -- tests and notebooks use its helpers too
from istack_ds.commands.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
