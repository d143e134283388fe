"""The teacher trainer's data: the corpus split into training, speaker-probe and held-out speakers, and the
batches the model gets (padded, normalized audio, its attention mask and frame lengths, time masks).

The corpus is :mod:`istack_ds.evidence.speech_corpus`'s, read whole into memory (minutes of audio).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from istack_ds.evidence.speech_corpus import Utterance
from istack_ds.models import sfm

if TYPE_CHECKING:
    from transformers import HubertModel


@dataclass
class Split:
    train: list[Utterance]
    probe: list[Utterance]
    """The training speakers' left-out sentences (speaker probe)."""
    held_out: list[Utterance]
    """The held-out speakers' sentences (PER, CKA)."""


def split_corpus(utts: list[Utterance], held_out_speakers: int, probe_sentences: int) -> Split:
    speakers = sorted({u.speaker for u in utts})
    if len(speakers) <= held_out_speakers:
        raise ValueError(
            f"the corpus has {len(speakers)} speakers: cannot hold out {held_out_speakers} and train on the rest"
        )
    held = set(speakers[-held_out_speakers:])
    split = Split([], [], [])
    by_speaker: dict[str, list[Utterance]] = {}
    for u in utts:
        if u.speaker in held:
            split.held_out.append(u)
        else:
            by_speaker.setdefault(u.speaker, []).append(u)
    for spk in sorted(by_speaker):
        mine = by_speaker[spk]
        n_probe = min(probe_sentences, len(mine) - 1)
        split.train.extend(mine[: len(mine) - n_probe])
        split.probe.extend(mine[len(mine) - n_probe :])
    return split


def corpus_digest(corpus: Path) -> str:
    """sha256 of the manifests: a teacher is reused only on the corpus it was trained on."""
    h = hashlib.sha256()
    for name in ("recordings.jsonl.gz", "supervisions.jsonl.gz"):
        with open(corpus / name, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


# ---- batches -----------------------------------------------------------------------------


def length_batches(
    utts: list[Utterance], batch_size: int, gen: torch.Generator, shuffle: bool = True
) -> list[list[int]]:
    """Indices of `utts` in batches of similar length (little padding), in random order or, with `shuffle` False,
    longest first (the list is consumed from its end: shortest first, SortaGrad's first epoch)."""
    order = sorted(range(len(utts)), key=lambda i: (len(utts[i].audio), utts[i].id))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if not shuffle:
        return batches[::-1]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def collate(utts: list[Utterance]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded audio [B, T] and lengths [B], normalized per utterance as the saved feature extractor says.

    The model gets an attention mask when its CNN has layer norm (what the saved feature extractor says), as
    the teacher path runs it: :func:`attention_mask`."""
    lens = torch.tensor([len(u.audio) for u in utts])
    audio = torch.zeros(len(utts), int(lens.max()))
    for i, u in enumerate(utts):
        audio[i, : len(u.audio)] = torch.from_numpy(u.audio)
    return sfm.normalize_waveform(audio, lens), lens


def span_mask(frame_lens: torch.Tensor, prob: float, length: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T] bool: spans of `length` frames starting at a `prob` fraction of each utterance's frames."""
    size = int(frame_lens.max())
    mask = torch.zeros(len(frame_lens), size, dtype=torch.bool)
    for b, n in enumerate(frame_lens.tolist()):
        starts = max(1, round(prob * n))
        if n <= length:
            continue
        for s in torch.randint(0, n - length, (starts,), generator=gen).tolist():
            mask[b, s : s + length] = True
    return mask


# ---- what the model gets ------------------------------------------------------------------


def frame_lengths(model: HubertModel, lens: torch.Tensor) -> torch.Tensor:
    """Frames the transformer gets for `lens` audio samples."""
    return model._get_feat_extract_output_lengths(cast(torch.LongTensor, lens.long())).long()


def attention_mask(model: HubertModel, audio: torch.Tensor, lens: torch.Tensor) -> torch.Tensor | None:
    return sfm.attention_mask(audio, lens) if model.config.feat_extract_norm == "layer" else None
