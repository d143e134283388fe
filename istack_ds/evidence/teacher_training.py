"""Train a small HuBERT teacher that has learned something, on CPU, from the labelled espeak-ng corpus.

The distillation demo's random teacher has 13 hidden states that are nearly one representation, so
the place a student layer takes cannot matter. This trains a ``HubertModel`` of the paper's depth
(12 layers) at reduced width on :mod:`istack_ds.evidence.speech_corpus` and saves it as a plain
``save_pretrained`` directory with its feature extractor: :mod:`istack_ds.models.teacher` loads it
like any HF teacher.

Objective, on time-masked CNN features (HF's ``masked_spec_embed``, spans drawn from the seed):

- CTC on phonemes from the top layer (a linear head on ``hidden_states[12]``), plus the same head's
  CTC on ``hidden_states[8]`` (intermediate CTC, weight 0.3);
- log-mel regression of every frame, masked ones included, from ``hidden_states[4]`` (masked
  acoustic modelling, as TERA / Mockingjay), weight 3;
- the first epoch shortest sentences first (SortaGrad).

Why this one:

- It is what a few CPU minutes can learn. espeak-ng's phonemes are exact labels of its audio, but
  CTC alone from raw waveform sat on its all-blank plateau (loss ~3.7) for 300 steps here, post-LN
  or pre-LN; the log-mel target teaches the CNN spectral features within tens of steps, and CTC
  then leaves the plateau after ~150 steps. HuBERT's own masked prediction of k-means units
  needs far more steps before its layers differentiate.
- It gives the layer hierarchy SUPERB's weights show for HuBERT: the upper layers become
  speaker-independent phoneme detectors (CTC, measured on held-out speakers), while layer 4 must
  keep the spectrum, and with it who is speaking. So hidden states 4 and 12 differ (their
  linear CKA on held-out audio is measured).
- Masking makes the upper layers infer phonemes from context and layer 4 fill in the spectrum,
  as masked prediction does.

The layout is HuBERT Large's (pre-LN transformer, layer-norm CNN, attention masks): post-LN
(HuBERT Base's) trained more slowly here at any learning rate tried.

The CTC head is saved beside the model (``ctc_head.safetensors`` + ``phonemes.json``, blank = 0)
for the phoneme error rate in the report; a teacher user needs only the HF files.

Written into the teacher directory (``teacher_report.json``, ``layer_cka.png``), measured on
held-out speakers (never trained on): the phoneme error rate of the CTC head (greedy decoding),
the layer x layer linear CKA of all hidden states and CKA(4, 12), a per-layer speaker-ID linear
probe (ridge on mean- and std-pooled states; fitted on the training speakers' held-out sentences, scored
on others), and the training wall time. A directory whose report holds the same settings and
corpus is reused. Same seed, same corpus, same thread count -> same weights.

Usage: ``istack train-teacher --out data/teacher --corpus data/speech_corpus`` (istack_ds/commands/train_teacher.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from istack_ds.evidence.ctc import ctc_loss
from istack_ds.evidence.speech_corpus import read_speech_corpus
from istack_ds.evidence.teacher_data import (
    attention_mask,
    collate,
    corpus_digest,
    frame_lengths,
    length_batches,
    span_mask,
    split_corpus,
)
from istack_ds.evidence.teacher_eval import REPORT, evaluate, write_report
from istack_ds.models import sfm

if TYPE_CHECKING:
    from transformers import HubertModel

HEAD = "ctc_head.safetensors"
VOCAB = "phonemes.json"
BLANK = "<blank>"


@dataclass(frozen=True)
class TeacherTrainingSettings:
    """The teacher's shape and its training; a teacher directory made with other settings is retrained."""

    hidden_size: int = 96
    num_hidden_layers: int = 12
    num_attention_heads: int = 4
    intermediate_size: int = 384
    conv_channels: int = 32
    """Channels of each of the 7 CNN front-end layers."""
    stable_layer_norm: bool = True
    """Pre-LN transformer and layer-norm CNN (HuBERT Large's layout, with attention masks): trains from scratch at
    a learning rate where the post-LN layout of HuBERT Base stalls. False: HuBERT Base's layout."""
    dropout: float = 0.0
    """Dropout of the transformer and the feature projection (the time masking already regularizes)."""
    steps: int = 500
    batch_size: int = 8
    """Utterances per step (batches hold utterances of similar length)."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warmup, then cosine decay to 5% of it)."""
    warmup: float = 0.1
    """Fraction of the steps that warm up."""
    weight_decay: float = 0.01
    inter_ctc_layer: int = 8
    """A second CTC loss (same head) on this hidden state, weight `inter_ctc_weight`: a short gradient path that
    gets CTC past its all-blank plateau in few steps (intermediate CTC, Lee & Watanabe 2021). 0 disables it."""
    inter_ctc_weight: float = 0.3
    mel_layer: int = 4
    """This hidden state predicts the log-mel spectrum of every frame, masked ones included (masked acoustic
    modelling, as TERA / Mockingjay): the CNN learns spectral features within steps, which CTC needs to leave its
    plateau, and the lower layers keep the acoustics (and with them the speaker). 0 disables it."""
    mel_weight: float = 3.0
    mask_prob: float = 0.05
    """Fraction of frames that start a masked span (SpecAugment in time); 0 disables masking."""
    mask_length: int = 5
    """Frames per masked span."""
    held_out_speakers: int = 2
    """The last speakers (sorted names) are never trained on: PER and CKA are measured on them."""
    probe_sentences: int = 10
    """Per training speaker: its last sentences are left out of training; the speaker probe is fitted on half of
    them and scored on the other half."""
    cka_frames: int = 2000
    """Held-out frames (evenly spaced) the CKA uses."""
    seed: int = 0
    log_every: int = 20
    """Steps between progress lines."""

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of heads={self.num_attention_heads}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps}, batch_size={self.batch_size}: both must be >= 1")
        if self.held_out_speakers < 1:
            raise ValueError("held_out_speakers must be >= 1: PER and CKA are measured on held-out speakers")
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers={self.num_hidden_layers}: need at least 1")

    def hf_config(self):
        from transformers import HubertConfig

        return HubertConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            conv_dim=(self.conv_channels,) * 7,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            # masked_spec_embed exists only with mask_time_prob > 0; the masks are drawn here (seeded), not by HF
            mask_time_prob=self.mask_prob if self.mask_prob > 0 else 0.0,
            layerdrop=0.0,
            do_stable_layer_norm=self.stable_layer_norm,
            feat_extract_norm="layer" if self.stable_layer_norm else "group",
            hidden_dropout=self.dropout,
            attention_dropout=self.dropout,
            activation_dropout=self.dropout,
            feat_proj_dropout=self.dropout,
        )

    def training_fields(self) -> dict:
        """The settings that change the weights (what the cache compares)."""
        return {k: v for k, v in asdict(self).items() if k != "log_every"}


# ---- the model ---------------------------------------------------------------------------


def build(settings: TeacherTrainingSettings, vocab_size: int) -> tuple[HubertModel, nn.Linear]:
    from transformers import HubertModel

    torch.manual_seed(settings.seed)
    model = HubertModel(settings.hf_config())
    head = nn.Linear(settings.hidden_size, vocab_size)
    return model, head


N_MELS = 40


def mel_filters(n_fft: int = 400, n_mels: int = N_MELS, sample_rate: int = 16000) -> torch.Tensor:
    """Triangular mel filters [n_fft // 2 + 1, n_mels] (HTK mel scale, 0 .. Nyquist)."""
    hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel = lambda f: 2595.0 * torch.log10(1.0 + f / 700.0)  # noqa: E731
    edges = torch.linspace(0, float(mel(torch.tensor(sample_rate / 2))), n_mels + 2)
    m = mel(hz)[:, None]
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    return torch.clamp(torch.minimum((m - lo) / (mid - lo), (hi - m) / (hi - mid)), min=0.0)


def log_mel(audio: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, T] -> [B, frames, N_MELS]: log-mel of 25 ms windows every 20 ms, the CNN front end's frames (receptive
    field 400 samples, stride 320), zero-padded to `frames` (mel_loss standardizes it per utterance)."""
    window = torch.hann_window(400)
    spec = torch.stft(audio, 400, hop_length=320, window=window, center=False, return_complex=True).abs() ** 2
    feats = torch.log(spec.transpose(1, 2) @ mel_filters() + 1e-6)
    if feats.shape[1] < frames:
        feats = F.pad(feats, (0, 0, 0, frames - feats.shape[1]))
    return feats[:, :frames]


def mel_loss(pred: torch.Tensor, audio: torch.Tensor, frame_lens: torch.Tensor) -> torch.Tensor:
    """MSE of `pred` [B, T, N_MELS] against the per-utterance standardized log-mel of `audio`, on valid frames."""
    target = log_mel(audio, pred.shape[1])
    valid = sfm.length_mask(frame_lens, pred.shape[1])[..., None].float()
    count = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (target * valid).sum(1, keepdim=True) / count
    std = (((target - mean) ** 2 * valid).sum(1, keepdim=True) / count).sqrt() + 1e-3
    err = (pred - (target - mean) / std) ** 2 * valid
    return err.sum() / (valid.sum() * pred.shape[-1]).clamp(min=1)


def lr_at(step: int, settings: TeacherTrainingSettings) -> float:
    warm = max(1, int(settings.warmup * settings.steps))
    if step < warm:
        return settings.lr * (step + 1) / warm
    frac = (step - warm) / max(1, settings.steps - warm)
    return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


# ---- the run -----------------------------------------------------------------------------


def finished(out: Path, settings: TeacherTrainingSettings, corpus: Path) -> dict | None:
    """The report of a finished teacher in `out` made with these settings on this corpus, else None."""
    try:
        report = json.loads((out / REPORT).read_text())
    except (OSError, ValueError):
        return None
    same = report.get("settings") == settings.training_fields() and report.get("corpus_sha256") == corpus_digest(corpus)
    return report if same and (out / "model.safetensors").is_file() else None


def train_teacher(
    corpus: str | Path,
    out: str | Path,
    settings: TeacherTrainingSettings | None = None,
    *,
    force: bool = False,
    log=print,
) -> dict:
    """Trains (or reuses) the teacher in `out` on the labelled manifest directory `corpus`; returns its report."""

    settings = settings or TeacherTrainingSettings()
    corpus, out = Path(corpus), Path(out)
    if not force and (report := finished(out, settings, corpus)) is not None:
        log(f"teacher at {out} was trained with these settings on this corpus: reused ({REPORT})")
        return report
    t0 = time.monotonic()
    utts = read_speech_corpus(corpus)
    split = split_corpus(utts, settings.held_out_speakers, settings.probe_sentences)
    vocab = [BLANK] + sorted({p for u in utts for p in u.phonemes})
    index = {p: i for i, p in enumerate(vocab)}
    model, head = build(settings, len(vocab))
    mel_head = nn.Linear(settings.hidden_size, N_MELS)
    use_mel = 0 < settings.mel_layer <= settings.num_hidden_layers and settings.mel_weight > 0
    params = list(model.parameters()) + list(head.parameters()) + (list(mel_head.parameters()) if use_mel else [])
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.98), weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed)
    log(
        f"training a {settings.num_hidden_layers} x {settings.hidden_size} HuBERT teacher "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) with CTC on {len(vocab) - 1} "
        f"phonemes: {len(split.train)} sentences of {len({u.speaker for u in split.train})} speakers, "
        f"{settings.steps} steps of {settings.batch_size}, {torch.get_num_threads()} thread(s)"
    )
    batches: list[list[int]] = []
    epoch = 0
    t_train, loss_avg, mel_avg = time.monotonic(), None, None
    model.train()
    for step in range(settings.steps):
        if not batches:
            # NOTE: the first epoch goes shortest first: CTC finds its alignments on short sentences sooner
            batches = length_batches(split.train, settings.batch_size, gen, shuffle=epoch > 0)
            epoch += 1
        batch = [split.train[i] for i in batches.pop()]
        audio, lens = collate(batch)
        flens = frame_lengths(model, lens)
        mask = span_mask(flens, settings.mask_prob, settings.mask_length, gen) if settings.mask_prob > 0 else None
        inter = 0 < settings.inter_ctc_layer < settings.num_hidden_layers and settings.inter_ctc_weight > 0
        states = model(
            audio,
            attention_mask=attention_mask(model, audio, lens),
            mask_time_indices=mask,
            output_hidden_states=inter or use_mel,
        )
        targets = torch.tensor([index[p] for u in batch for p in u.phonemes])
        tlens = torch.tensor([len(u.phonemes) for u in batch])
        loss = ctc_loss(head, states.last_hidden_state, targets, flens, tlens)
        top_loss = loss.detach()
        if inter:
            w, hidden = settings.inter_ctc_weight, states.hidden_states[settings.inter_ctc_layer]
            loss = (1 - w) * loss + w * ctc_loss(head, hidden, targets, flens, tlens)
        if use_mel:
            mel = mel_loss(mel_head(states.hidden_states[settings.mel_layer]), audio, flens)
            loss = loss + settings.mel_weight * mel
            mel_avg = mel.item() if mel_avg is None else 0.9 * mel_avg + 0.1 * mel.item()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        loss_avg = top_loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * top_loss.item()
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            dt = time.monotonic() - t_train
            eta = dt / (step + 1) * (settings.steps - step - 1)
            log(
                f"step {step + 1}/{settings.steps} ({100 * (step + 1) / settings.steps:.0f}%) ctc {loss_avg:.3f} "
                + (f"mel {mel_avg:.3f} " if mel_avg is not None else "")
                + f"lr {lr_at(step, settings):.2e} {dt:.0f} s, ETA {eta:.0f} s"
            )
    train_seconds = time.monotonic() - t_train
    metrics = evaluate(model, head, split, vocab, settings)
    layers = settings.num_hidden_layers
    save_teacher(model, head, vocab, settings, out)
    report = {
        "settings": settings.training_fields(),
        "corpus": str(corpus.resolve()),
        "corpus_sha256": corpus_digest(corpus),
        "objective": (
            f"CTC on phonemes from hidden state {layers} (+ {settings.inter_ctc_weight} x CTC from "
            f"{settings.inter_ctc_layer}), log-mel regression from hidden state {settings.mel_layer} "
            f"(weight {settings.mel_weight}), time-masked CNN features"
        ),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "threads": torch.get_num_threads(),
        "final_ctc_loss": round(loss_avg or float("nan"), 4),
        "train_sentences": len(split.train),
        "train_speakers": sorted({u.speaker for u in split.train}),
        "held_out_speakers": sorted({u.speaker for u in split.held_out}),
        "phonemes": vocab[1:],
        **metrics,
        "cka_4_12": metrics["cka"][min(4, layers)][layers],
        "cka_first_last": metrics["cka"][1][layers],
    }
    write_report(out, report, train_seconds, log)
    return report


def save_teacher(model: HubertModel, head: nn.Linear, vocab: list[str], settings, out: Path) -> None:
    """The model as a plain HubertModel (no masking vector, mask_time_prob 0), its feature extractor, the CTC head."""
    from safetensors.torch import save_file
    from transformers import HubertModel

    config = dataclasses.replace(settings).hf_config()
    config.mask_time_prob = 0.0
    clean = HubertModel(config)
    state = {k: v for k, v in model.state_dict().items() if k != "masked_spec_embed"}
    clean.load_state_dict(state)
    out.mkdir(parents=True, exist_ok=True)
    clean.eval().save_pretrained(out)
    sfm.save_feature_extractor(out, config.feat_extract_norm, do_normalize=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / HEAD))
    (out / VOCAB).write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "RANDOM_WEIGHTS.txt").unlink(missing_ok=True)
