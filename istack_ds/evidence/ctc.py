"""CTC over phonemes as the probes and the teacher trainer use it: the loss of a linear head, greedy decoding, and
the edit distance that scores a decoded sequence against its reference (the phoneme error rate).

Blank is index 0 everywhere; a phoneme vocabulary starts at 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def ctc_loss(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, frame_lens: torch.Tensor, target_lens: torch.Tensor
) -> torch.Tensor:
    """CTC (blank 0) of the head on `hidden` [B, T, H] against the concatenated `targets`."""
    log_probs = head(hidden).log_softmax(-1).transpose(0, 1)  # [T, B, V]
    # zero_infinity: an utterance with fewer frames than CTC needs gives no gradient instead of inf
    return F.ctc_loss(log_probs, targets, frame_lens, target_lens, blank=0, zero_infinity=True)


def greedy_ctc(scores: torch.Tensor, frames: int | None = None) -> list[int]:
    """Best path of `scores` [T, C] (logits or log-probabilities) over its first `frames` frames (all by default):
    repeats merged, blanks (0) removed."""
    best = (scores if frames is None else scores[:frames]).argmax(-1).tolist()
    out, prev = [], 0
    for t in best:
        if t != prev and t != 0:
            out.append(t)
        prev = t
    return out


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]
