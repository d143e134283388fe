"""The distillation losses, over valid (unpadded) frames only.

Both take ``pred`` and ``target`` as {teacher_layer: [B, T, H]} (keys ``t`` or
``"L<t>"``, as the student returns them) and a frame mask [B, T] (True = real
audio: :func:`istack_ds.models.sfm.length_mask`), and return ``(total, parts)``
where ``parts[f"L{t}"]`` is the unweighted loss of target t (logged as
``train/loss_L<t>``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """The paper's layer-to-layer loss: MSE on the last target (weight 1) + inter_weight x MSE on the others."""
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


def distilhubert_loss(
    pred: dict[int, torch.Tensor], target: dict[int, torch.Tensor], mask: torch.Tensor, cos_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DistilHuBERT: per head, L1 + cos_weight x -log sigmoid(cos), summed over heads."""
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
    return total, parts
