"""Running an HF speech foundation model with its CNN front end shared or slowed.

HF's ``HubertModel`` / ``WavLMModel`` / ``Wav2Vec2Model`` run CNN front end ->
feature projection -> transformer encoder in one ``forward``, and record hidden
states with hooks on that forward. To keep that machinery intact, the front end
is swapped for a parameter-free module that returns features computed earlier
(``student.frontend: shared``: the teacher's CNN output computed once per batch
serves teacher and student), and a trainable student CNN gets its gradient
scaled by a forward hook (``trainable``, DistilHuBERT-style).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by `scale`."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def scale_frontend_grad(model: nn.Module, scale: float) -> None:
    """Makes the CNN front end of `model` learn with its gradient multiplied by `scale`."""
    if scale != 1.0:
        model.get_submodule("feature_extractor").register_forward_hook(lambda module, args, out: scale_grad(out, scale))


class _Precomputed(nn.Module):
    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.features


@contextlib.contextmanager
def precomputed_frontend(model: nn.Module, features: torch.Tensor | None):
    """Within the block, `model`'s CNN front end returns `features` ([B, C, T], from :func:`cnn`) instead of running."""
    if features is None:
        yield
        return
    original = model._modules["feature_extractor"]
    model._modules["feature_extractor"] = _Precomputed(features)
    try:
        yield
    finally:
        model._modules["feature_extractor"] = original


def cnn(model: nn.Module, audio: torch.Tensor) -> torch.Tensor:
    """The CNN front end's output [B, C, T]."""
    return model.get_submodule("feature_extractor")(audio)


def receptive_field(kernels, strides) -> int:
    """Input samples one output frame of a conv stack sees: a shorter input gives the transformer no frame."""
    field, jump = 1, 1
    for kernel, stride in zip(kernels, strides):
        field += (kernel - 1) * jump
        jump *= stride
    return field


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size] bool, True where a position is real (audio samples or frames), False on padding."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def attention_mask(audio: torch.Tensor, audio_lens: torch.Tensor) -> torch.Tensor:
    """The HF ``attention_mask`` of a zero-padded audio batch [B, T]: 1 on samples, 0 on padding."""
    return length_mask(audio_lens.to(audio.device), audio.shape[1]).long()


def normalize_waveform(
    audio: torch.Tensor, audio_lens: torch.Tensor, padding_value: float = 0.0, eps: float = 1e-7
) -> torch.Tensor:
    """Each utterance of a padded batch `audio` [B, T] to zero mean and unit variance over its `audio_lens` samples;
    padding set to `padding_value`. On `audio`'s device, in its dtype.

    The formula of ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm`` with an attention mask:
    ``(x - mean) / sqrt(var + 1e-7)``, population variance of the valid samples.
    """
    valid = length_mask(audio_lens.to(audio.device), audio.shape[1])
    count = valid.sum(1, keepdim=True).clamp(min=1).to(torch.float64)
    # NOTE: sums in float64: a float32 sum over minutes of audio loses the digits the variance needs.
    mean = torch.where(valid, audio, 0).sum(1, keepdim=True, dtype=torch.float64) / count
    centered = audio - mean.to(audio.dtype)
    var = torch.where(valid, centered * centered, 0).sum(1, keepdim=True, dtype=torch.float64) / count
    normed = centered / torch.sqrt(var + eps).to(audio.dtype)
    return torch.where(valid, normed, torch.full_like(normed, padding_value))


def save_feature_extractor(
    out, feat_extract_norm: str, sampling_rate: int = 16000, *, do_normalize: bool = False
) -> None:
    """Writes the ``preprocessor_config.json`` of a raw-waveform SFM (what ``AutoFeatureExtractor`` loads).

    For a model whose teacher has none (a teacher's own is copied where it exists: ``export.py``).
    HF convention: models with a layer-norm CNN were trained with attention masks.
    """
    from transformers import Wav2Vec2FeatureExtractor

    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=sampling_rate,
        padding_value=0.0,
        do_normalize=do_normalize,
        return_attention_mask=feat_extract_norm == "layer",
    ).save_pretrained(out)


def hidden_states(
    model: nn.Module, audio: torch.Tensor, attention_mask: torch.Tensor | None, features: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Every hidden state (layers + 1) of `model`; `features` replaces the CNN front end's output."""
    with precomputed_frontend(model, features):
        return model(audio, attention_mask=attention_mask, output_hidden_states=True).hidden_states
