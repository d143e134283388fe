"""`python -m istack_ds.commands COMMAND ...`: `istack` without the installed script."""

import sys

from istack_ds.cli import istack

sys.exit(istack())
