"""SUPERB-style probes of a frozen speech model: phoneme recognition (PR) and speaker identification (SID).

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

import hashlib
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.index import DataError, read_index
from .data.tario import BadMember, decode_member, iter_tar_samples

TASKS = ("pr", "sid")
JSON_FILE = "probe.json"
PLOT_FILE = "probe_layers.png"

#: audio float32 [samples] -> hidden states [layers, frames, hidden] (index i = output of layer i).
HiddenStates = Callable[[np.ndarray], torch.Tensor]


@dataclass
class ProbeSettings:
    """How long and how each probe trains (the same for every task)."""

    steps: int = 400
    """Optimizer steps per task."""
    batch: int = 8
    """Utterances per step."""
    lr: float = 0.05
    """Adam learning rate of layer weights and head (5x SUPERB's PR value: hundreds of steps, not 100k)."""
    held_out: float = 0.2
    """Fraction of each speaker's utterances of the train index held out for scoring."""
    seed: int = 0
    log_every: int = 100

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"probe: steps={self.steps} and batch={self.batch} must be >= 1")
        if not 0.0 < self.held_out < 1.0:
            raise ValueError(f"probe: held_out={self.held_out} must be in (0, 1)")


# ---- data ----------------------------------------------------------------------------


@dataclass
class Utterance:
    id: str
    speaker: str | None
    phonemes: list[str] | None
    frames: torch.Tensor | None = None
    """Layer-normed hidden states [frames, layers, hidden], fp16 (kept only for PR)."""
    pooled: torch.Tensor | None = None
    """The frames' mean [layers, hidden], fp32 (SID)."""


@dataclass
class LabelledIndex:
    path: str
    utterances: list[Utterance]
    counts: dict = field(default_factory=dict)
    """{"members", "seconds", "bad_members": {reason: n}, "without_speaker", "without_phonemes", "cached_mib"}."""


def read_labelled(
    index_path: str | Path,
    hidden_states: HiddenStates,
    sample_rate: int,
    *,
    keep_frames: bool,
    max_utterances: int | None = None,
    log: Callable[[str], None] = print,
) -> LabelledIndex:
    """Decodes every member of the index (at most `max_utterances`, in index order), runs `hidden_states` on it
    once and keeps its labels and layer-normed hidden states; counts members without labels and bad members."""
    index = read_index(index_path)
    utterances: list[Utterance] = []
    bad: Counter = Counter()
    no_speaker = no_phonemes = cached = 0
    seconds, t0, last = 0.0, time.perf_counter(), time.perf_counter()
    total = index.samples if max_utterances is None else min(index.samples, max_utterances)

    def on_error(reason: str, message: str) -> None:
        bad[reason] += 1

    samples = (sample for shard in index.shards for sample in iter_tar_samples(shard.path, on_error))
    for sample in samples:
        if max_utterances is not None and len(utterances) >= max_utterances:
            break
        try:
            audio, meta = decode_member(sample, sample_rate)
        except BadMember as e:
            bad[e.reason] += 1
            continue
        speaker = meta.get("speaker")
        speaker = str(speaker) if isinstance(speaker, str | int) and str(speaker) else None
        phonemes = meta.get("phonemes")
        phonemes = [str(p) for p in phonemes] if isinstance(phonemes, list) and phonemes else None
        no_speaker += speaker is None
        no_phonemes += phonemes is None
        hidden = hidden_states(audio).detach().float().cpu()
        if hidden.ndim != 3:
            raise ValueError(f"probe: hidden states of {sample['__key__']} are {tuple(hidden.shape)}, not 3-D")
        # NOTE: the layer norm has no parameters, so it is applied once here, not at every step.
        normed = F.layer_norm(hidden, hidden.shape[-1:]).transpose(0, 1).contiguous()  # [T, L, H]
        utterances.append(
            Utterance(
                id=str(meta.get("id", sample["__key__"])),
                speaker=speaker,
                phonemes=phonemes,
                frames=normed.half() if keep_frames and phonemes is not None else None,
                pooled=normed.mean(0),
            )
        )
        seconds += len(audio) / sample_rate
        cached += normed.numel() * 2 if keep_frames and phonemes is not None else 0
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            rate = seconds / max(last - t0, 1e-9)
            log(
                f"probe: hidden states of {index_path}: {len(utterances)}/{total} utterances, "
                f"{seconds:.0f} s of audio, {rate:.1f} audio s/s"
            )
    log(
        f"probe: hidden states of {index_path}: {len(utterances)} utterances, {seconds:.0f} s of audio in "
        f"{time.perf_counter() - t0:.1f} s; without speaker {no_speaker}, without phonemes {no_phonemes}, "
        f"bad members {dict(bad) or 0}; {cached / 2**20:.0f} MiB of hidden states cached"
    )
    counts = {
        "members": len(utterances),
        "seconds": round(seconds, 2),
        "bad_members": dict(bad),
        "without_speaker": no_speaker,
        "without_phonemes": no_phonemes,
        "cached_mib": round(cached / 2**20, 1),
    }
    return LabelledIndex(str(index_path), utterances, counts)


def held_out_ids(utterances: Sequence[Utterance], fraction: float, seed: int) -> set[str]:
    """Ids of the utterances held out for scoring: round(fraction * n) of each speaker's n utterances (at least 1
    and at most n - 1; a speaker with one utterance keeps it for fitting), the ones with the smallest
    sha256(seed, id); an utterance without a speaker is held out when its hash falls below `fraction`."""

    def rank(u: Utterance) -> str:
        return hashlib.sha256(f"{seed}\t{u.id}".encode()).hexdigest()

    by_speaker: dict[str, list[Utterance]] = {}
    out: set[str] = set()
    for u in utterances:
        if u.speaker is None:
            if int(rank(u)[:8], 16) / 16**8 < fraction:
                out.add(u.id)
        else:
            by_speaker.setdefault(u.speaker, []).append(u)
    for group in by_speaker.values():
        if len(group) < 2:
            continue
        n = min(len(group) - 1, max(1, round(fraction * len(group))))
        out.update(u.id for u in sorted(group, key=rank)[:n])
    return out


# ---- the featurizer and the probes ---------------------------------------------------


class WeightedSum(nn.Module):
    """s3prl's featurizer over hidden states already layer-normed: softmax(weights) . layers."""

    def __init__(self, layers: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(layers))  # s3prl starts from equal weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., layers, hidden] -> [..., hidden]."""
        return torch.einsum("...lh,l->...h", x, self.weights.softmax(0))

    def layer_weights(self) -> list[float]:
        return [round(float(w), 6) for w in self.weights.detach().softmax(0)]


def _progress(log, task: str, step: int, steps: int, loss: float, t0: float) -> None:
    dt = time.perf_counter() - t0
    eta = dt / step * (steps - step)
    log(
        f"probe {task}: step {step}/{steps} ({100 * step / steps:.0f}%) | loss {loss:.4f} | {dt:.1f} s "
        f"| eta {eta:.0f} s"
    )


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def probe_pr(
    fit: Sequence[tuple[torch.Tensor, Sequence[str]]],
    test: Sequence[tuple[torch.Tensor, Sequence[str]]],
    settings: ProbeSettings,
    log: Callable[[str], None] = print,
) -> dict:
    """Phoneme recognition on (layer-normed hidden states [frames, layers, hidden], phonemes) pairs: weighted sum
    -> Linear -> CTC on `fit`; greedy-decoding PER on `test`.

    ``chance_per`` is the PER of the better label-blind guess: nothing (PER 1), or the most frequent phoneme of
    `fit` repeated as often as `fit`'s phonemes per frame predict from the utterance's length.
    """
    vocab = sorted({p for _, phonemes in fit for p in phonemes})
    ids = {p: i + 1 for i, p in enumerate(vocab)}  # 0 is CTC's blank
    layers, hidden = fit[0][0].shape[1:]
    g = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        featurizer, head = WeightedSum(layers), nn.Linear(hidden, len(vocab) + 1)
    opt = torch.optim.Adam([*featurizer.parameters(), *head.parameters()], lr=settings.lr)
    t0, loss_value = time.perf_counter(), float("nan")
    for step in range(1, settings.steps + 1):
        batch = [fit[int(i)] for i in torch.randint(len(fit), (settings.batch,), generator=g)]
        frames = nn.utils.rnn.pad_sequence([f.float() for f, _ in batch], batch_first=True)
        lens = torch.tensor([len(f) for f, _ in batch])
        targets = torch.tensor([ids[p] for _, phonemes in batch for p in phonemes])
        target_lens = torch.tensor([len(phonemes) for _, phonemes in batch])
        log_probs = head(featurizer(frames)).log_softmax(-1).transpose(0, 1)  # [T, B, V]
        # zero_infinity: an utterance with fewer frames than CTC needs gives no gradient instead of inf
        loss = F.ctc_loss(log_probs, targets, lens, target_lens, blank=0, zero_infinity=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if step % settings.log_every == 0 or step == settings.steps:
            _progress(log, "pr", step, settings.steps, loss_value, t0)
    common = Counter(p for _, phonemes in fit for p in phonemes).most_common(1)[0][0]
    rate = sum(len(phonemes) for _, phonemes in fit) / sum(len(f) for f, _ in fit)
    errors = blind = length = unknown = 0
    with torch.no_grad():
        for frames, phonemes in test:
            best = head(featurizer(frames.float())).argmax(-1).tolist()
            hyp = [vocab[k - 1] for i, k in enumerate(best) if k != 0 and (i == 0 or best[i - 1] != k)]
            errors += edit_distance(hyp, phonemes)
            blind += edit_distance([common] * round(rate * len(frames)), phonemes)
            length += len(phonemes)
            unknown += sum(int(p not in ids) for p in phonemes)
    return {
        "per": errors / length,
        "chance_per": min(1.0, blind / length),
        "train_utterances": len(fit),
        "test_utterances": len(test),
        "test_phonemes": length,
        "vocab_size": len(vocab),
        "unknown_test_phonemes": unknown,
        "train_too_short_for_ctc": sum(int(len(f) < len(phonemes)) for f, phonemes in fit),
        "final_loss": loss_value,
        "layer_weights": featurizer.layer_weights(),
    }


def probe_sid(
    fit: Sequence[tuple[torch.Tensor, str]],
    test: Sequence[tuple[torch.Tensor, str]],
    settings: ProbeSettings,
    log: Callable[[str], None] = print,
) -> dict:
    """Speaker identification on (frame means of the layer-normed hidden states [layers, hidden], speaker) pairs:
    weighted sum -> Linear -> cross-entropy on `fit`; accuracy on `test` (speakers of `fit` only)."""
    speakers = sorted({speaker for _, speaker in fit})
    ids = {s: i for i, s in enumerate(speakers)}
    x_fit = torch.stack([x for x, _ in fit])
    y_fit = torch.tensor([ids[s] for _, s in fit])
    layers, hidden = x_fit.shape[1:]
    g = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        featurizer, head = WeightedSum(layers), nn.Linear(hidden, len(speakers))
    opt = torch.optim.Adam([*featurizer.parameters(), *head.parameters()], lr=settings.lr)
    t0, loss_value = time.perf_counter(), float("nan")
    for step in range(1, settings.steps + 1):
        pick = torch.randint(len(fit), (settings.batch,), generator=g)
        loss = F.cross_entropy(head(featurizer(x_fit[pick])), y_fit[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if step % settings.log_every == 0 or step == settings.steps:
            _progress(log, "sid", step, settings.steps, loss_value, t0)
    y_test = torch.tensor([ids[s] for _, s in test])
    with torch.no_grad():
        predicted = head(featurizer(torch.stack([x for x, _ in test]))).argmax(-1)
    return {
        "accuracy": float((predicted == y_test).float().mean()),
        "chance": Counter(y_test.tolist()).most_common(1)[0][1] / len(test),
        "speakers": len(speakers),
        "train_utterances": len(fit),
        "test_utterances": len(test),
        "final_loss": loss_value,
        "layer_weights": featurizer.layer_weights(),
    }


# ---- the model -----------------------------------------------------------------------


class FrozenModel:
    """A save_pretrained HuBERT / WavLM / wav2vec 2.0 directory as a :data:`HiddenStates` function, one utterance
    at a time (no padding, so no attention-mask question), its feature extractor's normalization applied."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from .models.teacher import Teacher, read_teacher_info

        info = read_teacher_info(path)
        self.teacher = Teacher(path, [info.num_layers]).to(device)
        self.info, self.device = info, torch.device(device)
        self.sample_rate = info.sample_rate

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(audio)[None].to(self.device)
        lens = torch.tensor([len(audio)], device=self.device)
        hidden = self.teacher.all_hidden_states(self.teacher.prepare_input(x, lens), lens)
        return torch.stack([h[0] for h in hidden])

    def describe(self) -> dict:
        return {
            "model_type": self.info.model_type,
            "num_layers": self.info.num_layers,
            "hidden_size": self.info.hidden_size,
        }


def is_checkpoint(path: str | Path) -> bool:
    from .checkpoint import META_FILE

    return (Path(path) / META_FILE).is_file()


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
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="probe_export_") as tmp:
        described: dict = {"model": str(model) if not callable(model) else getattr(model, "__name__", "function")}
        if callable(model):
            hidden_states, rate = model, getattr(model, "sample_rate", None)
        else:
            path = Path(model)
            if is_checkpoint(path):
                from .export import export_checkpoint

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
        "what": "SUPERB-style probe (istack_ds.probe): a bounded-step proxy, not SUPERB; compare only runs "
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
        _require(pr_pairs(train.utterances), train, "phonemes", "PR")
        if valid is not None:
            fit, test = pr_pairs(train.utterances), _require(pr_pairs(valid.utterances), valid, "phonemes", "PR")
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
        _require(sid_pairs(train.utterances), train, "speaker", "SID")
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


def _require(pairs: list, index: LabelledIndex, key: str, task: str) -> list:
    """`pairs`; raises DataError naming the index when there are none."""
    if not pairs:
        raise DataError(
            f"shard index {index.path}: none of its {index.counts['members']} members carries `{key}` in its json; "
            f"{task} needs it (shard a corpus with {key} labels, or leave {task.lower()} out of the tasks)"
        )
    return pairs


def pr_pairs(utterances: Iterable[Utterance]) -> list[tuple[torch.Tensor, list[str]]]:
    """(frames, phonemes) of the utterances that have both."""
    return [(u.frames, u.phonemes) for u in utterances if u.frames is not None and u.phonemes is not None]


def sid_pairs(utterances: Iterable[Utterance]) -> list[tuple[torch.Tensor, str]]:
    """(pooled hidden states, speaker) of the utterances with a speaker."""
    return [(u.pooled, u.speaker) for u in utterances if u.pooled is not None and u.speaker is not None]


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


__all__ = [
    "TASKS",
    "FrozenModel",
    "ProbeSettings",
    "WeightedSum",
    "edit_distance",
    "held_out_ids",
    "layer_table",
    "probe_pr",
    "probe_sid",
    "run_probes",
]
