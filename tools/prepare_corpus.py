"""`istack prepare` as a script for any corpus layout (LibriLight, LibriSpeech, lhotse manifests); its usage and code:
istack_ds/commands/prepare.py."""

from istack_ds.commands.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
