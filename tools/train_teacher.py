"""`istack train-teacher` as a script; its usage and code: istack_ds/commands/train_teacher.py."""

from istack_ds.commands.train_teacher import main

if __name__ == "__main__":
    raise SystemExit(main())
