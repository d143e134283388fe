"""The distillation losses, over valid (unpadded) frames only.

Each takes ``pred`` and ``target`` as {teacher_layer: [B, T, H]} (keys ``t`` or
``"L<t>"``, as the student returns them) and a frame mask [B, T] (True = real
audio: :func:`istack_ds.models.sfm.length_mask`), and returns ``(total, parts)``
where ``parts[f"L{t}"]`` is the unweighted loss of target t (logged as
``train/loss_L<t>``). :func:`distillation_loss` picks one by ``loss.kind``:

============  ===========================================  ============================================
kind          where the predictions come from (Student)    total
============  ===========================================  ============================================
l2l           target t through a Linear from its own       MSE(last) + inter_weight x SUM of the other
              supervised student layer (the paper)         targets' MSE
output_heads  last target: a Linear from the top layer;    the same as l2l: MSE(last) + inter_weight x
              the others: prediction heads on the top      SUM of the other targets' MSE
              layer (GradStack / MIDAS in the paper)
distilhubert  prediction heads on the top layer            MEAN over targets of L1 + cos_weight x
                                                           -log sigmoid(cos) (s3prl's distiller)
============  ===========================================  ============================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..config import LossConfig


def _by_layer(x: dict) -> dict[int, torch.Tensor]:
    return {int(k[1:]) if isinstance(k, str) else int(k): v for k, v in x.items()}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T] over positions where mask [B, T] is True."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _align(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
    # Student and teacher share CNN strides, so frame counts agree; trim defensively anyway.
    n = min(pred.shape[1], target.shape[1], mask.shape[1])
    return pred[:, :n], target[:, :n], mask[:, :n]


def l2l_loss(
    pred: dict[int, torch.Tensor], target: dict[int, torch.Tensor], mask: torch.Tensor, inter_weight: float = 0.5
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's layer-to-layer loss: MSE on the last target (weight 1) + inter_weight x the SUM of the other
    targets' MSEs (each a mean over valid frames and channels)."""
    pred, target = _by_layer(pred), _by_layer(target)
    last = max(pred)
    total = pred[last].new_zeros(())
    parts = {}
    for t in sorted(pred):
        p, y, m = _align(pred[t], target[t], mask)
        loss = _masked_mean(((p - y) ** 2).mean(-1), m)
        parts[f"L{t}"] = loss.detach()
        total = total + (1.0 if t == last else inter_weight) * loss
    return total, parts


def output_heads_loss(
    pred: dict[int, torch.Tensor], target: dict[int, torch.Tensor], mask: torch.Tensor, inter_weight: float = 0.5
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output MSE + prediction-head intermediate MSE: the l2l sum (last target weight 1, every other target
    inter_weight), over predictions that all come from the student's top layer (``Student`` with this kind)."""
    return l2l_loss(pred, target, mask, inter_weight)


def distilhubert_loss(
    pred: dict[int, torch.Tensor], target: dict[int, torch.Tensor], mask: torch.Tensor, cos_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DistilHuBERT: per head, L1 + cos_weight x -log sigmoid(cos); the MEAN over heads, as s3prl's distiller
    averages its loss over targets (its mean runs over padded frames too; here valid frames only)."""
    pred, target = _by_layer(pred), _by_layer(target)
    total = next(iter(pred.values())).new_zeros(())
    parts = {}
    for t in sorted(pred):
        p, y, m = _align(pred[t], target[t], mask)
        l1 = (p - y).abs().mean(-1)
        cos = -F.logsigmoid(F.cosine_similarity(p, y, dim=-1))
        loss = _masked_mean(l1 + cos_weight * cos, m)
        parts[f"L{t}"] = loss.detach()
        total = total + loss
    return total / len(pred), parts


def distillation_loss(
    loss: LossConfig, pred: dict, target: dict, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss ``loss.kind`` names (`loss`: the run's ``LossConfig``), with its weights."""
    if loss.kind == "l2l":
        return l2l_loss(pred, target, mask, loss.inter_weight)
    if loss.kind == "output_heads":
        return output_heads_loss(pred, target, mask, loss.inter_weight)
    if loss.kind == "distilhubert":
        return distilhubert_loss(pred, target, mask, loss.cos_weight)
    raise ValueError(f"loss.kind={loss.kind!r} is not a loss")
