"""What made a run or an export: the versions of the packages it ran on and the git commit of istack_ds.

:func:`provenance` is recorded in ``summary.json`` (:mod:`istack_ds.report`), the export (``provenance.json``
beside the model card, and in the card: :mod:`istack_ds.model_card`), TensorBoard (``run/provenance``,
:mod:`istack_ds.metrics`) and printed by ``istack --version``. It never fails: a package that is not installed
has version None, and the commit is None where istack_ds is not a git checkout (an installed wheel) or git
is missing.
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

#: The packages whose versions decide what a run computes (the distribution names pip knows).
PACKAGES = ("istack_ds", "torch", "deepspeed", "transformers", "lhotse", "webdataset")
#: The file beside an export's model card that holds :func:`provenance`.
PROVENANCE_FILE = "provenance.json"

_GIT_TIMEOUT_S = 10


def package_version(name: str) -> str | None:
    """The installed version of distribution `name`; None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """{package: version or None} of :data:`PACKAGES` (istack_ds: the running package's ``__version__``, installed
    or not), and the Python version."""
    from . import __version__

    versions = {name: package_version(name) for name in PACKAGES}
    return {"python": platform.python_version(), **versions, "istack_ds": __version__}


def _git(source: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit(source: str | Path | None = None) -> dict | None:
    """{"commit": sha, "dirty": bool} of the git checkout whose top level holds the istack_ds package (`source`:
    another package directory); None when that package is not in a git checkout's top level (an installed wheel,
    even one inside some other repository) or git cannot answer. `dirty`: tracked files differ from the commit."""
    package = Path(source) if source is not None else Path(__file__).resolve().parent
    top = _git(package, "rev-parse", "--show-toplevel")
    # NOTE: a wheel installed in a venv inside some repository would report that repository's commit.
    if top is None or Path(top).resolve() / package.name != package.resolve():
        return None
    commit = _git(package, "rev-parse", "HEAD")
    status = _git(package, "status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return None
    return {"commit": commit, "dirty": bool(status)}


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """{"packages": {name: version}, "git": {"commit", "dirty"} or None}: what this process runs (cached: the
    same answer for every caller of one process)."""
    return {"packages": package_versions(), "git": git_commit()}


def describe(record: dict | None = None) -> str:
    """One line: istack_ds's version, the commit (``+dirty``, or ``no git checkout``) and the other packages."""
    record = record or provenance()
    packages = dict(record["packages"])
    own = packages.pop("istack_ds", None)
    git = record["git"]
    commit = "no git checkout" if git is None else f"commit {git['commit'][:12]}{'+dirty' if git['dirty'] else ''}"
    others = ", ".join(f"{name} {version or 'not installed'}" for name, version in packages.items())
    return f"istack_ds {own or 'not installed'} ({commit}); {others}"


def as_markdown(record: dict | None = None) -> str:
    """The record as a fenced JSON block (TensorBoard text, the model card)."""
    return f"```json\n{json.dumps(record or provenance(), indent=1)}\n```"
