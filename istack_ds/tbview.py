"""How a run looks in TensorBoard: where its events go, the custom-scalars layout, the hparams order, the series
drawn as steps or spikes, and the notes that explain what a reader sees.

No torch and no writing: :mod:`istack_ds.metrics` writes what this module shapes, and readers of a run
directory (``istack compare``, the tests) find a run's events through :func:`find_events`.

TensorBoard names a run by the path of its event files under ``--logdir``: the events go into
``<out_dir>/tb/<run.name>/``, so ``tensorboard --logdir <out_dir>/tb`` lists the run by its name (events
written straight into ``tb/`` would be the run ".").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

RANDOM_MARKER = "RANDOM_WEIGHTS.txt"
"""The file :func:`istack_ds.models.teacher.make_random_teacher` leaves in a teacher directory of random weights."""

STEP_TAGS = ("model/depth", "model/params")
"""Scalars that change only at a growth: drawn as steps (at a change the old value is written again one step
earlier, so the line jumps instead of sloping from the last log step)."""

SPIKE_TAGS = ("growth/pause_s",)
"""Scalars of a single moment: drawn as spikes (0 one step before and one step after the value)."""

CUSTOM_SCALARS: dict[str, dict[str, list]] = {
    "losses": {
        "train and valid loss": ["Multiline", [r"^train/loss$", r"^valid/loss$"]],
        "train loss per target": ["Multiline", [r"^train/loss_L\d+$"]],
        "valid loss per target": ["Multiline", [r"^valid/loss_L\d+$"]],
    },
    # NOTE: Margin charts are the custom-scalar charts TensorBoard never smooths: a step or a spike keeps its shape.
    # NOTE: a category of its own each: TensorBoard does not keep the layout's order of margin charts within one.
    "depth": {"depth (student layers)": ["Margin", ["model/depth"] * 3]},
    "growth": {
        "growth pause, seconds (a spike at each growth)": ["Margin", ["growth/pause_s"] * 3],
        "parameters": ["Margin", ["model/params"] * 3],
    },
    "learning rate": {"learning rate": ["Multiline", [r"^train/lr$"]]},
    "layer similarity (maps in IMAGES)": {
        "CKA, supervised student layer vs its teacher layer": ["Multiline", [r"^diag/cka_L\d+$"]],
        "CKA between student layers": [
            "Multiline",
            [r"^diag/cka_student_adjacent$", r"^diag/cka_student_first_last$"],
        ],
    },
    "throughput": {
        "audio seconds per second": ["Multiline", [r"^perf/audio_s_per_s$"]],
        "seconds per step": ["Multiline", [r"^perf/step_s$"]],
        "teacher share of a step": ["Multiline", [r"^perf/teacher_frac$"]],
        "padding share of the batches": ["Multiline", [r"^perf/pad_frac$"]],
    },
    "data": {
        "shards done": ["Multiline", [r"^data/shards_done$"]],
        "skipped samples": ["Multiline", [r"^data/skipped$"]],
        "epoch": ["Multiline", [r"^data/epoch$"]],
    },
}
"""The TensorBoard custom-scalar layout (category -> chart title -> [kind, tags]) of every run: the losses
first, then what the method does (depth, growth, LR, layer similarity), then how fast and on what data.
Multiline charts take tag regexes, Margin charts three exact tags (value, lower, upper)."""

METHOD_KEYS = ("growth.", "loss.", "student.", "optim.")
"""The hparams of the method: listed first in the HPARAMS tab, the first five of them shown as table columns."""


def run_dir_name(run_name: str) -> str:
    """The subdirectory of ``<out_dir>/tb`` that holds a run's events (TensorBoard shows it as the run's name)."""
    return re.sub(r"[^\w.=+-]+", "_", run_name).strip("._") or "run"


def events_dir(tb: str | Path, run_name: str) -> Path:
    """Where a run writes its event files: ``tb/<run name>/``, or ``tb/`` itself when a run written before
    runs were named left its events there (a resume continues them)."""
    tb = Path(tb)
    named = tb / run_dir_name(run_name)
    if not named.is_dir() and any(tb.glob("events.out.tfevents.*")):
        return tb
    return named


def find_events(tb: str | Path, run_name: str = "") -> Path:
    """The directory that holds a run's event files, for a reader: ``tb/<run name>/``, else ``tb/`` when it
    holds events itself, else its only subdirectory that does (a run directory whose config was renamed)."""
    tb = Path(tb)
    if run_name and (tb / run_dir_name(run_name)).is_dir():
        return tb / run_dir_name(run_name)
    if any(tb.glob("events.out.tfevents.*")):
        return tb
    found = sorted({p.parent for p in tb.glob("*/events.out.tfevents.*")})
    if len(found) != 1:
        raise SystemExit(f"{tb}: expected the events of one run, found {len(found)} run directories {found}")
    return found[0]


def flat_hparams(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as TensorBoard hparams: ``{"optim.lr": 0.001, ...}``.

    Numbers, bools and strings stay; None becomes ``"null"`` and a list its JSON text, so every run of
    one config schema has the same keys (the hparams plugin builds its columns from one run's keys).
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        elif value is None:
            out[name] = "null"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def method_keys_first(experiment) -> None:
    """Marks the :data:`METHOD_KEYS` hparams of an hparams experiment summary (``Summary``) as ``differs``.

    TensorBoard lists hparams by (``differs`` first, name) and shows the first five as columns, whatever order
    they were written in; ``differs`` is its flag for keys that vary between runs. Without it the alphabet
    puts ``checkpoint.*`` first."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    plugin = experiment.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name.startswith(METHOD_KEYS)
    plugin.content = data.SerializeToString()


def random_teacher_note(config: dict | None) -> str | None:
    """A note for the TEXT tab when the run's teacher directory holds :data:`RANDOM_MARKER`, else None."""
    path = ((config or {}).get("teacher") or {}).get("path")
    if not path or not (Path(path) / RANDOM_MARKER).is_file():
        return None
    return (
        f"**The teacher in `{path}` has random weights** ({RANDOM_MARKER} says so; the demo makes one with "
        "`istack make-teacher`). Its layers compute near-identical random features, so the CKA maps in IMAGES are "
        "flat (every student layer resembles every teacher layer about equally) and the losses say nothing about "
        "speech. That is expected here: the run exercises the machinery. With a trained teacher the maps show "
        "a diagonal band and the boxed supervised pairs stand out."
    )


class SeriesShaper:
    """Turns one write of scalars into the events that draw :data:`STEP_TAGS` as steps and :data:`SPIKE_TAGS`
    as spikes. Remembers each step tag's last value, written or not (a resumed run sees its start values
    before its purge step, and draws its next change from them)."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, float]] = {}

    def events(self, step: int, values: dict[str, float]) -> list[tuple[str, float, int]]:
        """[(tag, value, step)] in the order to write them (steps never go back within a tag)."""
        out: list[tuple[str, float, int]] = []
        for tag, value in values.items():
            value = float(value)
            if tag in STEP_TAGS:
                before = self.last.get(tag)
                # NOTE: also when the old value was written at this very step (the log line of a growth step):
                # TensorBoard keeps one value per step, the last, and drops what a step going back supersedes.
                if before is not None and before[1] != value and before[0] != step - 1:
                    out.append((tag, before[1], step - 1))
                self.last[tag] = (step, value)
                out.append((tag, value, step))
            elif tag in SPIKE_TAGS:
                out += [(tag, 0.0, step - 1), (tag, value, step), (tag, 0.0, step + 1)]
            else:
                out.append((tag, value, step))
        return out
