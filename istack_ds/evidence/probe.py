"""SUPERB-style probes of a frozen speech model, the whole run: phoneme recognition (PR) and speaker
identification (SID) probed, reported (``probe.json``) and plotted (``probe_layers.png``).

The data it reads is :mod:`istack_ds.evidence.probe_data`; the heads it trains, :mod:`istack_ds.evidence.probe_heads`.

What it is: the SUPERB recipe shrunk to a CPU-hour proxy. The model is frozen; every hidden state of every
utterance is computed once and kept in memory; each task learns s3prl's featurizer (one weight per hidden
state, softmax, each hidden state layer-normed without affine parameters first, as s3prl's ``Featurizer``
with ``normalize`` on) and SUPERB's head for that task:

    PR   a linear layer over frames, CTC over the member json's ``phonemes``; scored by phoneme error rate
         (edit distance of the greedy CTC output to the reference, summed, over the references' length)
    SID  mean over frames, then a linear layer over the member json's ``speaker``; scored by accuracy

and reports the learned layer weights (which hidden states each task reads), as ``probe.json`` and a bar plot
``probe_layers.png``.

What it is not: SUPERB. It trains for a bounded number of steps (hundreds, not SUPERB's 100k-200k), on
whatever labelled shards it is given (hundreds of utterances, not LibriSpeech 100 h or VoxCeleb1), with
greedy decoding and no learning-rate schedule. Its numbers rank models probed with the same index, steps
and seed against each other; they are not comparable with published SUPERB results. Run s3prl for those
(the export's README.md says how).

Data: ``run_probes`` reads a shard index (``istack shard``) whose member json carries ``speaker`` and/or
``phonemes`` (a member without a label is counted and left out of that task). SID needs the same speakers
when fitting and scoring: a fixed fraction of each speaker's utterances of the train index (chosen by a hash
of seed and utterance id, so the same for any shard order) is held out for scoring. PR scores on the
held-out index when one is given (its speakers may be new), else on the same held-out utterances.

Models: a ``save_pretrained`` directory of a HubertModel / WavLMModel / Wav2Vec2Model (an HF teacher, or an
istack_ds export: both load through :class:`istack_ds.models.teacher.Teacher`, which applies the feature
extractor's normalization), or an istack_ds training checkpoint (exported to a temporary directory first),
or any function from audio to hidden states (tests, other tools).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from istack_ds.data.index import DataError, read_index
from istack_ds.evidence.probe_data import (
    FrozenModel,
    HiddenStates,
    LabelledIndex,
    check_labels,
    held_out_ids,
    is_checkpoint,
    missing_label,
    pr_pairs,
    read_labelled,
    sid_pairs,
)
from istack_ds.evidence.probe_heads import ProbeSettings, probe_pr, probe_sid

TASKS = ("pr", "sid")
JSON_FILE = "probe.json"
PLOT_FILE = "probe_layers.png"


# ---- the whole probe -----------------------------------------------------------------


def run_probes(
    model: str | Path | HiddenStates,
    train_index: str | Path,
    *,
    valid_index: str | Path | None = None,
    tasks: Iterable[str] = TASKS,
    steps: int = 400,
    batch: int = 8,
    lr: float = 0.05,
    held_out: float = 0.2,
    seed: int = 0,
    max_utterances: int | None = None,
    teacher: str | Path | None = None,
    device: str = "cpu",
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Probes `model` (a save_pretrained dir, an istack_ds checkpoint dir, or a :data:`HiddenStates` function) on
    the labelled members of `train_index` (and `valid_index` for PR); returns the report, and with `out` writes
    it as ``probe.json`` with the layer-weight plot ``probe_layers.png``.

    `teacher`: for a checkpoint, the teacher dir its export reads (default its config's). Raises DataError naming
    the index when no member carries a task's label, ValueError for an unknown task.
    """
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"probe: tasks {list(tasks)}: choose from {list(TASKS)}")
    settings = ProbeSettings(steps=steps, batch=batch, lr=lr, held_out=held_out, seed=seed)
    # NOTE: before any hidden state: computing them for every member takes minutes on a real index.
    check_labels(train_index, tasks, max_utterances)
    if valid_index is not None and "pr" in tasks:
        check_labels(valid_index, ["pr"], max_utterances)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="probe_export_") as tmp:
        described: dict = {"model": str(model) if not callable(model) else getattr(model, "__name__", "function")}
        if callable(model):
            hidden_states, rate = model, getattr(model, "sample_rate", None)
        else:
            path = Path(model)
            if is_checkpoint(path):
                from istack_ds.export import export_checkpoint

                log(f"probe: exporting checkpoint {path} to a temporary directory")
                path = export_checkpoint(path, Path(tmp) / "student", teacher)
                described["checkpoint"] = str(model)
            frozen = FrozenModel(path, device)
            hidden_states, rate = frozen, frozen.sample_rate
            described.update(frozen.describe())
        sample_rate = int(rate or read_index(train_index).sample_rate)
        # no_grad, not inference_mode: the cached states are the probes' inputs later
        with torch.no_grad():
            train = read_labelled(
                train_index,
                hidden_states,
                sample_rate,
                keep_frames="pr" in tasks,
                max_utterances=max_utterances,
                log=log,
            )
            valid = (
                read_labelled(
                    valid_index, hidden_states, sample_rate, keep_frames=True, max_utterances=max_utterances, log=log
                )
                if valid_index is not None and "pr" in tasks
                else None
            )
    t_extract = time.perf_counter() - t_start
    layers = len(train.utterances[0].pooled) if train.utterances else 0  # type: ignore[arg-type]
    held = held_out_ids(train.utterances, settings.held_out, settings.seed)
    report: dict = {
        "what": "SUPERB-style probe (istack_ds.evidence.probe): a bounded-step proxy, not SUPERB; compare only runs "
        "with the same index, steps and seed",
        **described,
        "hidden_states": layers,
        "train_index": str(train_index),
        "valid_index": str(valid_index) if valid_index is not None else None,
        "tasks": list(tasks),
        "settings": {
            "steps": settings.steps,
            "batch": settings.batch,
            "lr": settings.lr,
            "held_out": settings.held_out,
            "seed": settings.seed,
            "max_utterances": max_utterances,
            "featurizer": "layer norm (no affine) per hidden state, softmax-weighted sum (s3prl, normalize on)",
        },
        "data": {"train": train.counts, "valid": valid.counts if valid is not None else None},
    }
    timing = {"hidden_states_s": round(t_extract, 2)}
    fitting = [u for u in train.utterances if u.id not in held]
    scoring = [u for u in train.utterances if u.id in held]
    where = f"held-out {settings.held_out:.0%} of each speaker's utterances of the train index"
    if "pr" in tasks:
        t0 = time.perf_counter()
        _require(pr_pairs(train.utterances), train, "pr")
        if valid is not None:
            fit, test = pr_pairs(train.utterances), _require(pr_pairs(valid.utterances), valid, "pr")
            scored_on = f"held-out index {valid_index}"
        else:
            fit, test, scored_on = pr_pairs(fitting), pr_pairs(scoring), where
        if not fit or not test:
            raise DataError(
                f"shard index {train_index}: too few members with phonemes to fit and score PR "
                f"({len(fit)} to fit, {len(test)} to score)"
            )
        log(f"probe pr: {len(fit)} utterances to fit, {len(test)} to score ({scored_on})")
        report["pr"] = {**probe_pr(fit, test, settings, log), "scored_on": scored_on}
        timing["pr_s"] = round(time.perf_counter() - t0, 2)
        log(
            f"probe pr: PER {report['pr']['per']:.3f} (label-blind {report['pr']['chance_per']:.3f}) on "
            f"{len(test)} utterances"
        )
    if "sid" in tasks:
        t0 = time.perf_counter()
        _require(sid_pairs(train.utterances), train, "sid")
        fit_sid, test_sid = sid_pairs(fitting), sid_pairs(scoring)
        speakers = len({s for _, s in fit_sid})
        if not test_sid or speakers < 2:
            raise DataError(
                f"shard index {train_index}: SID needs at least 2 speakers with 2 or more utterances each "
                f"({speakers} speakers to fit, {len(test_sid)} utterances held out)"
            )
        log(f"probe sid: {len(fit_sid)} utterances to fit, {len(test_sid)} to score, {speakers} speakers")
        report["sid"] = {**probe_sid(fit_sid, test_sid, settings, log), "scored_on": where}
        timing["sid_s"] = round(time.perf_counter() - t0, 2)
        log(f"probe sid: accuracy {report['sid']['accuracy']:.3f} (chance {report['sid']['chance']:.3f})")
    timing["total_s"] = round(time.perf_counter() - t_start, 2)
    report["timing"] = timing
    report["layer_weights"] = {t: report[t]["layer_weights"] for t in tasks}
    log(layer_table(report))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / JSON_FILE).write_text(json.dumps(report, indent=1))
        plot_layer_weights(report, out / PLOT_FILE)
        report["files"] = [str(out / JSON_FILE), str(out / PLOT_FILE)]
        log(f"probe: wrote {out / JSON_FILE} and {out / PLOT_FILE}")
    return report


def _require(pairs: list, index: LabelledIndex, task: str) -> list:
    """`pairs`; raises DataError naming the index when there are none."""
    if not pairs:
        raise missing_label(index.path, index.counts["members"], task)
    return pairs


def layer_table(report: dict) -> str:
    """The learned layer weights as a markdown table: one row per hidden state, one column per task."""
    tasks = list(report["layer_weights"])
    lines = ["| hidden state | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for i in range(report["hidden_states"]):
        lines.append(f"| {i} | " + " | ".join(f"{report['layer_weights'][t][i]:.3f}" for t in tasks) + " |")
    return "\n".join(lines)


def plot_layer_weights(report: dict, path: Path) -> None:
    """A bar per hidden state and task: the softmax layer weights each probe learned."""
    # A figure with its own Agg canvas: no pyplot, so a caller's matplotlib backend stays as it is.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    weights = report["layer_weights"]
    n = report["hidden_states"]
    fig = Figure(figsize=(max(5.0, 0.5 * n + 2), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(weights))
    for k, (task, w) in enumerate(weights.items()):
        score = f"PER {report['pr']['per']:.3f}" if task == "pr" else f"acc {report['sid']['accuracy']:.3f}"
        ax.bar(np.arange(n) + (k - (len(weights) - 1) / 2) * width, w, width, label=f"{task.upper()} ({score})")
    ax.axhline(1 / max(n, 1), color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(n))
    ax.set_xlabel("hidden state (0 = input of the first layer)")
    ax.set_ylabel("softmax layer weight")
    ax.set_title(f"probe layer weights: {Path(str(report['model'])).name}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


__all__ = ["JSON_FILE", "PLOT_FILE", "TASKS", "layer_table", "plot_layer_weights", "run_probes"]
