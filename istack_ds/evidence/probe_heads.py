"""The probes themselves: s3prl's featurizer (softmax-weighted layers) and SUPERB's PR and SID heads, each trained
on cached hidden states for a bounded number of steps and scored.

    PR   a linear layer over frames, CTC over the phonemes; scored by phoneme error rate (edit distance of the
         greedy CTC output to the reference, summed, over the references' length)
    SID  mean over frames, then a linear layer over the speaker; scored by accuracy

Both start from the same seeded weights and batches for a seed, so a probe is deterministic.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from istack_ds.evidence.ctc import ctc_loss, edit_distance, greedy_ctc


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
    """Seeds the heads' initial weights, the batches drawn and the held-out split."""
    log_every: int = 100
    """Steps between progress lines."""

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"probe: steps={self.steps} and batch={self.batch} must be >= 1")
        if not 0.0 < self.held_out < 1.0:
            raise ValueError(f"probe: held_out={self.held_out} must be in (0, 1)")


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


def _fit(
    featurizer: WeightedSum,
    head: nn.Module,
    batch_loss: Callable[[], torch.Tensor],
    settings: ProbeSettings,
    task: str,
    log: Callable[[str], None],
) -> float:
    """`settings.steps` Adam steps of featurizer and head on `batch_loss()` (which draws its batch); the last loss."""
    opt = torch.optim.Adam([*featurizer.parameters(), *head.parameters()], lr=settings.lr)
    t0, loss_value = time.perf_counter(), float("nan")
    for step in range(1, settings.steps + 1):
        loss = batch_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if step % settings.log_every == 0 or step == settings.steps:
            dt = time.perf_counter() - t0
            eta = dt / step * (settings.steps - step)
            log(
                f"probe {task}: step {step}/{settings.steps} ({100 * step / settings.steps:.0f}%) | loss "
                f"{loss_value:.4f} | {dt:.1f} s | eta {eta:.0f} s"
            )
    return loss_value


def probe_pr(
    fit: Sequence[tuple[torch.Tensor, Sequence[str]]],
    test: Sequence[tuple[torch.Tensor, Sequence[str]]],
    settings: ProbeSettings,
    log: Callable[[str], None] = print,
) -> dict:
    """Phoneme recognition on (layer-normed hidden states [frames, layers, hidden], phonemes) pairs: weighted sum
    -> Linear -> CTC on `fit`; greedy-decoding PER on `test`, with each test utterance's [errors, phonemes]
    (``per_utterance``, for intervals over utterances).

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

    def batch_loss() -> torch.Tensor:
        batch = [fit[int(i)] for i in torch.randint(len(fit), (settings.batch,), generator=g)]
        frames = nn.utils.rnn.pad_sequence([f.float() for f, _ in batch], batch_first=True)
        lens = torch.tensor([len(f) for f, _ in batch])
        targets = torch.tensor([ids[p] for _, phonemes in batch for p in phonemes])
        target_lens = torch.tensor([len(phonemes) for _, phonemes in batch])
        return ctc_loss(head, featurizer(frames), targets, lens, target_lens)

    loss_value = _fit(featurizer, head, batch_loss, settings, "pr", log)
    common = Counter(p for _, phonemes in fit for p in phonemes).most_common(1)[0][0]
    rate = sum(len(phonemes) for _, phonemes in fit) / sum(len(f) for f, _ in fit)
    errors = blind = length = unknown = 0
    each = []
    with torch.no_grad():
        for frames, phonemes in test:
            hyp = [vocab[k - 1] for k in greedy_ctc(head(featurizer(frames.float())))]
            each.append([edit_distance(hyp, phonemes), len(phonemes)])
            errors += each[-1][0]
            blind += edit_distance([common] * round(rate * len(frames)), phonemes)
            length += len(phonemes)
            unknown += sum(int(p not in ids) for p in phonemes)
    return {
        "per": errors / length,
        "chance_per": min(1.0, blind / length),
        "train_utterances": len(fit),
        "test_utterances": len(test),
        "test_phonemes": length,
        "per_utterance": each,
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
    weighted sum -> Linear -> cross-entropy on `fit`; accuracy on `test` (speakers of `fit` only), with each test
    utterance's 0/1 (``correct``)."""
    speakers = sorted({speaker for _, speaker in fit})
    ids = {s: i for i, s in enumerate(speakers)}
    x_fit = torch.stack([x for x, _ in fit])
    y_fit = torch.tensor([ids[s] for _, s in fit])
    layers, hidden = x_fit.shape[1:]
    g = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        featurizer, head = WeightedSum(layers), nn.Linear(hidden, len(speakers))

    def batch_loss() -> torch.Tensor:
        pick = torch.randint(len(fit), (settings.batch,), generator=g)
        return F.cross_entropy(head(featurizer(x_fit[pick])), y_fit[pick])

    loss_value = _fit(featurizer, head, batch_loss, settings, "sid", log)
    y_test = torch.tensor([ids[s] for _, s in test])
    with torch.no_grad():
        predicted = head(featurizer(torch.stack([x for x, _ in test]))).argmax(-1)
    return {
        "accuracy": float((predicted == y_test).float().mean()),
        "correct": (predicted == y_test).int().tolist(),
        "chance": Counter(y_test.tolist()).most_common(1)[0][1] / len(test),
        "speakers": len(speakers),
        "train_utterances": len(fit),
        "test_utterances": len(test),
        "final_loss": loss_value,
        "layer_weights": featurizer.layer_weights(),
    }
