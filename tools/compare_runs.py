"""`istack compare` as a script; its usage: istack_ds/commands/compare.py, its code: istack_ds/evidence/compare.py."""

from istack_ds.commands.compare import main
from istack_ds.evidence.compare import *  # noqa: F403 -- tests and notebooks use its helpers too

if __name__ == "__main__":
    raise SystemExit(main())
