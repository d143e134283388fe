"""The trained teacher measured and reported: the phoneme error rate of its CTC head and the layer x layer linear
CKA on held-out speakers, a per-layer speaker-ID probe, written as ``teacher_report.json`` and ``layer_cka.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from istack_ds.diagnostics import cka_figure, cka_matrix, subsample
from istack_ds.evidence.ctc import edit_distance, greedy_ctc
from istack_ds.evidence.speech_corpus import Utterance
from istack_ds.evidence.teacher_data import Split, attention_mask, collate, frame_lengths

if TYPE_CHECKING:
    from transformers import HubertModel

    from istack_ds.evidence.teacher_training import TeacherTrainingSettings

REPORT = "teacher_report.json"
FIGURE = "layer_cka.png"
EVAL_BATCH = 8


def ridge_probe_accuracy(
    train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str], alpha: float = 10.0
) -> float:
    """Accuracy of a ridge classifier (one-hot targets, standardized features) fitted on train, scored on test."""
    classes = sorted(set(train_y))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xa, xb = (train_x - mean) / std, (test_x - mean) / std
    xa, xb = np.hstack([xa, np.ones((len(xa), 1))]), np.hstack([xb, np.ones((len(xb), 1))])
    onehot = np.eye(len(classes))[[classes.index(y) for y in train_y]]
    w = np.linalg.solve(xa.T @ xa + alpha * np.eye(xa.shape[1]), xa.T @ onehot)
    pred = [classes[i] for i in (xb @ w).argmax(1)]
    return float(np.mean([p == y for p, y in zip(pred, test_y)]))


@torch.no_grad()
def hidden_states(model: HubertModel, utts: list[Utterance], batch_size: int = EVAL_BATCH):
    """Per batch of `utts` (in order, similar lengths): (hidden states tuple, frame lengths)."""
    model.eval()
    for i in range(0, len(utts), batch_size):
        audio, lens = collate(utts[i : i + batch_size])
        states = model(
            audio, attention_mask=attention_mask(model, audio, lens), output_hidden_states=True
        ).hidden_states
        yield states, frame_lengths(model, lens)


def evaluate(
    model: HubertModel, head: nn.Linear, split: Split, vocab: list[str], settings: TeacherTrainingSettings
) -> dict:
    """PER of the CTC head and the layer x layer CKA on held-out speakers; per-layer speaker-ID probe accuracy."""
    index = {p: i for i, p in enumerate(vocab)}
    held = sorted(split.held_out, key=lambda u: (len(u.audio), u.id))
    errors = total = 0
    frames: list[list[torch.Tensor]] = []
    for k, (states, flens) in enumerate(hidden_states(model, held)):
        log_probs = head(states[-1]).log_softmax(-1)
        for b, n in enumerate(flens.tolist()):
            u = held[k * EVAL_BATCH + b]
            ref = [index[p] for p in u.phonemes]
            errors += edit_distance(greedy_ctc(log_probs[b], n), ref)
            total += len(ref)
            frames.append([h[b, :n] for h in states])
    layers = len(frames[0])
    pooled = [torch.cat([f[i] for f in frames]) for i in range(layers)]
    pick = subsample(len(pooled[0]), settings.cka_frames)
    cka = cka_matrix([p[pick] for p in pooled], [p[pick] for p in pooled])

    # Speaker probe: mean- and std-pooled states of sentences the teacher never trained on, half fit / half score.
    feats: list[list[np.ndarray]] = [[] for _ in range(layers)]
    probe = sorted(split.probe, key=lambda u: (len(u.audio), u.id))
    for states, flens in hidden_states(model, probe):
        for b, n in enumerate(flens.tolist()):
            for i in range(layers):
                h = states[i][b, :n]
                feats[i].append(torch.cat([h.mean(0), h.std(0)]).numpy())
    speakers = [u.speaker for u in probe]
    seen: dict[str, int] = {}
    fit = []
    for s in speakers:  # alternate sentences of each speaker between fit and score
        fit.append(seen.get(s, 0) % 2 == 0)
        seen[s] = seen.get(s, 0) + 1
    fit_arr = np.array(fit)
    sid = []
    for i in range(layers):
        x = np.stack(feats[i])
        y = np.array(speakers)
        if fit_arr.all() or not fit_arr.any():
            sid.append(float("nan"))
            continue
        sid.append(ridge_probe_accuracy(x[fit_arr], list(y[fit_arr]), x[~fit_arr], list(y[~fit_arr])))
    return {
        "per": errors / max(1, total),
        "held_out_utterances": len(held),
        "held_out_phonemes": total,
        "cka": [[round(float(v), 4) for v in row] for row in cka],
        "speaker_probe_accuracy": [round(a, 4) for a in sid],
        "speaker_probe_chance": round(1 / max(1, len(set(speakers))), 4),
    }


def write_report(out: Path, report: dict, train_seconds: float, log=print) -> None:
    """Writes `report` as ``teacher_report.json`` and its layer x layer CKA as ``layer_cka.png``; logs the summary."""
    layers = report["settings"]["num_hidden_layers"]
    (out / REPORT).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    fig = cka_figure(torch.tensor(report["cka"]), {}, title="trained teacher: linear CKA on held-out speakers")
    ax = fig.axes[0]
    ax.set_xlabel("hidden state (0 = CNN features)")
    ax.set_ylabel("hidden state")
    fig.savefig(out / FIGURE)
    log(
        f"teacher {out}: PER {report['per']:.3f} on held-out speakers {report['held_out_speakers']}, "
        f"CKA(4, {layers}) {report['cka_4_12']:.3f}, speaker probe by layer "
        f"{' '.join(f'{a:.2f}' for a in report['speaker_probe_accuracy'])}, trained in {train_seconds:.0f} s"
    )
