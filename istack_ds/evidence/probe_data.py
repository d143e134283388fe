"""The probes' data: labelled shards read once through a frozen model, and the held-out split.

Every member of a shard index (``istack shard``) is decoded, run through the model once, and kept in memory as
its layer-normed hidden states (the frames for PR, their mean for SID) with its member json's ``speaker`` and
``phonemes``; a member without a label is counted and left out of that task. SID needs the same speakers when
fitting and scoring: :func:`held_out_ids` picks a fixed fraction of each speaker's utterances by a hash of seed
and utterance id, so the same for any shard order.

The model is a :data:`HiddenStates` function: :class:`FrozenModel` makes one of a ``save_pretrained`` directory;
tests and other tools pass their own.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from istack_ds.data.index import DataError, read_index
from istack_ds.data.tario import BadMember, decode_member, iter_tar_samples, member_meta

#: audio float32 [samples] -> hidden states [layers, frames, hidden] (index i = output of layer i).
HiddenStates = Callable[[np.ndarray], torch.Tensor]


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


#: The member json key each task needs.
TASK_LABELS = {"pr": "phonemes", "sid": "speaker"}


def labels(meta: dict) -> tuple[str | None, list[str] | None]:
    """(speaker, phonemes) of a member json; None for a label it does not carry (or carries empty)."""
    speaker = meta.get("speaker")
    speaker = str(speaker) if isinstance(speaker, str | int) and str(speaker) else None
    phonemes = meta.get("phonemes")
    phonemes = [str(p) for p in phonemes] if isinstance(phonemes, list) and phonemes else None
    return speaker, phonemes


def missing_label(index_path: str | Path, members: int, task: str) -> DataError:
    key = TASK_LABELS[task]
    return DataError(
        f"shard index {index_path}: none of its {members} members carries `{key}` in its json; "
        f"{task.upper()} needs it (shard a corpus with {key} labels, or leave {task} out of the tasks)"
    )


def check_labels(index_path: str | Path, tasks: Iterable[str], max_utterances: int | None = None) -> None:
    """DataError naming the index and the label when none of its members (the first `max_utterances`) carries
    the label a task needs; reads the members' json only, so a bad index is refused before any model runs."""
    index = read_index(index_path)
    missing, members = set(tasks), 0
    samples = (sample for shard in index.shards for sample in iter_tar_samples(shard.path, lambda *_: None))
    for sample in samples:
        if not missing or (max_utterances is not None and members >= max_utterances):
            break
        try:
            speaker, phonemes = labels(member_meta(sample))
        except BadMember:
            continue
        members += 1
        missing -= {task for task, found in (("sid", speaker), ("pr", phonemes)) if found is not None}
    if missing:
        raise missing_label(index_path, members, min(missing))


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
        speaker, phonemes = labels(meta)
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


def pr_pairs(utterances: Iterable[Utterance]) -> list[tuple[torch.Tensor, list[str]]]:
    """(frames, phonemes) of the utterances that have both."""
    return [(u.frames, u.phonemes) for u in utterances if u.frames is not None and u.phonemes is not None]


def sid_pairs(utterances: Iterable[Utterance]) -> list[tuple[torch.Tensor, str]]:
    """(pooled hidden states, speaker) of the utterances with a speaker."""
    return [(u.pooled, u.speaker) for u in utterances if u.pooled is not None and u.speaker is not None]


# ---- the model -----------------------------------------------------------------------


class FrozenModel:
    """A save_pretrained HuBERT / WavLM / wav2vec 2.0 directory as a :data:`HiddenStates` function, one utterance
    at a time (no padding, so no attention-mask question), its feature extractor's normalization applied."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from istack_ds.models.teacher import Teacher, read_teacher_info

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
    from istack_ds.checkpoint import META_FILE

    return (Path(path) / META_FILE).is_file()
