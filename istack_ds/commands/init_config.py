"""`istack init-config`: write one of the shipped configs (and the configs it builds on) to edit and train with.

Usage:
    istack init-config --list                                  # the shipped configs, each with its first line
    istack init-config paper_interleaved_eql                   # -> ./paper_interleaved_eql.yaml (+ its bases)
    istack init-config demo --out my_demo.yaml
    istack train --config paper_interleaved_eql.yaml --print-config

The configs ship inside the package (istack_ds/configs, the repository's configs/ directory), so this works after
`pip install` outside the repository. A config whose `base:` names another shipped config gets that file written
beside it too (under its own name, which `base:` reads). An existing file is left alone when it already holds the
same text, and refused otherwise unless --force.

Exit codes: 0 written (or already there), 2 an unknown name or a file that would be overwritten.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import yaml

from istack_ds.commands import HelpFormatter


def shipped() -> dict[str, str]:
    """{name: text} of the configs installed with the package (istack_ds/configs/*.yaml)."""
    folder = resources.files("istack_ds").joinpath("configs")
    if not folder.is_dir():
        return {}
    return {
        entry.name.removesuffix(".yaml"): entry.read_text()
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def with_bases(name: str, configs: dict[str, str]) -> list[str]:
    """`name` and the shipped configs its `base:` chain names, `name` first."""
    chain = [name]
    while True:
        base = (yaml.safe_load(configs[chain[-1]]) or {}).get("base")
        if base is None:
            return chain
        base_name = Path(base).name.removesuffix(".yaml")
        if base_name not in configs or base_name in chain:
            return chain
        chain.append(base_name)


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("name", nargs="?", help="a shipped config, e.g. demo or paper_interleaved_eql (.yaml optional)")
    parser.add_argument("--out", type=Path, default=None, help="file to write (default: ./NAME.yaml)")
    parser.add_argument("--list", action="store_true", help="list the shipped configs and exit")
    parser.add_argument("--force", action="store_true", help="overwrite files that differ")
    args = parser.parse_args(argv)

    configs = shipped()
    if args.list or args.name is None:
        for name, text in configs.items():
            first = next((line.lstrip("# ") for line in text.splitlines() if line.startswith("#")), "")
            print(f"{name:40s} {first}")
        return 0 if args.list else 2
    name = args.name.removesuffix(".yaml")
    if name not in configs:
        print(f"istack init-config: no shipped config {name!r}; choose one of {sorted(configs)}", file=sys.stderr)
        return 2
    out = args.out or Path(f"{name}.yaml")
    chain = with_bases(name, configs)
    targets = {out: configs[name], **{out.parent / f"{b}.yaml": configs[b] for b in chain[1:]}}
    clash = [str(p) for p, text in targets.items() if p.exists() and p.read_text() != text]
    if clash and not args.force:
        print(f"istack init-config: {', '.join(clash)} exists and differs (--force overwrites)", file=sys.stderr)
        return 2
    for path, text in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    bases = f" (with its base {', '.join(f'{b}.yaml' for b in chain[1:])})" if chain[1:] else ""
    print(f"wrote {out}{bases}; run: istack train --config {out} --dry-run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
