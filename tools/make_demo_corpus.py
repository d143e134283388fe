"""`istack make-demo-corpus` as a script; its usage and code: istack_ds/commands/make_demo_corpus.py."""

from istack_ds.commands.make_demo_corpus import main

if __name__ == "__main__":
    raise SystemExit(main())
