"""The distillation losses against values computed by hand on small tensors."""

import math

import torch

from istack_ds.config import LossConfig
from istack_ds.models.losses import distilhubert_loss, distillation_loss, l2l_loss
from istack_ds.models.sfm import length_mask


def test_length_mask():
    assert length_mask(torch.tensor([2, 0, 3]), 3).tolist() == [
        [True, True, False],
        [False, False, False],
        [True, True, True],
    ]


def test_l2l_by_hand_weights_last_target_one_and_others_inter_weight():
    # B=1, T=2 frames (second is padding), H=2.
    pred = {4: torch.tensor([[[1.0, 2.0], [9.0, 9.0]]]), 8: torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])}
    target = {4: torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]), 8: torch.tensor([[[3.0, 1.0], [0.0, 0.0]]])}
    mask = length_mask(torch.tensor([1]), 2)
    total, parts = l2l_loss(pred, target, mask, inter_weight=0.5)
    # L4: mean((1-0)^2, (2-0)^2) = 2.5 ; L8: mean(9, 1) = 5.0 ; padded frame ignored.
    assert parts["L4"].item() == 2.5 and parts["L8"].item() == 5.0
    assert total.item() == 5.0 + 0.5 * 2.5


def test_l2l_masked_mean_over_batch_frames():
    pred = {12: torch.tensor([[[2.0], [2.0]], [[4.0], [0.0]]])}
    target = {12: torch.zeros(2, 2, 1)}
    total, parts = l2l_loss(pred, target, length_mask(torch.tensor([2, 1]), 2))
    assert math.isclose(total.item(), (4 + 4 + 16) / 3)


def test_distilhubert_by_hand():
    pred = {4: torch.tensor([[[1.0, 0.0]]]), 8: torch.tensor([[[1.0, 1.0]]])}
    target = {4: torch.tensor([[[0.0, 1.0]]]), 8: torch.tensor([[[2.0, 2.0]]])}
    mask = torch.ones(1, 1, dtype=torch.bool)
    total, parts = distilhubert_loss(pred, target, mask, cos_weight=1.0)
    # L4: L1 = mean(1, 1) = 1, cos = 0 -> -log sigmoid(0) = log 2
    # L8: L1 = mean(1, 1) = 1, cos = 1 -> -log sigmoid(1) = log(1 + e^-1)
    expect4, expect8 = 1 + math.log(2), 1 + math.log(1 + math.exp(-1))
    assert math.isclose(parts["L4"].item(), expect4, rel_tol=1e-6)
    assert math.isclose(parts["L8"].item(), expect8, rel_tol=1e-6)
    # s3prl's distiller averages over targets (its mean runs over B x N x T x D), so the MEAN of the heads
    assert math.isclose(total.item(), (expect4 + expect8) / 2, rel_tol=1e-6)
    again, _ = distillation_loss(
        LossConfig(kind="distilhubert", teacher_layers=[4, 8], cos_weight=0.5), pred, target, mask
    )
    assert math.isclose(again.item(), (2 + 0.5 * (math.log(2) + math.log(1 + math.exp(-1)))) / 2, rel_tol=1e-6)


def test_output_heads_is_output_mse_plus_inter_weight_times_the_sum_of_intermediate_mses():
    """loss.kind output_heads: MSE(last) + inter_weight x (MSE(4) + MSE(8)), padded frames left out."""
    mask = length_mask(torch.tensor([1]), 2)  # second frame is padding
    pred = {
        "L4": torch.tensor([[[1.0, 1.0], [7.0, 7.0]]]),
        "L8": torch.tensor([[[2.0, 0.0], [7.0, 7.0]]]),
        "L12": torch.tensor([[[0.0, 3.0], [7.0, 7.0]]]),
    }
    target = {4: torch.zeros(1, 2, 2), 8: torch.zeros(1, 2, 2), 12: torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])}
    total, parts = distillation_loss(LossConfig(kind="output_heads", inter_weight=0.25), pred, target, mask)
    # L4: mean(1, 1) = 1; L8: mean(4, 0) = 2; L12: mean(1, 9) = 5
    assert [parts[k].item() for k in ("L4", "L8", "L12")] == [1.0, 2.0, 5.0]
    assert total.item() == 5.0 + 0.25 * (1.0 + 2.0)
    none, _ = distillation_loss(LossConfig(kind="output_heads", inter_weight=0.0), pred, target, mask)
    assert none.item() == 5.0  # the ablation: the output term alone
    l2l, _ = distillation_loss(LossConfig(kind="l2l", inter_weight=0.25), pred, target, mask)
    assert l2l.item() == total.item()  # the same weighting as l2l; only where the predictions come from differs


def test_losses_backpropagate_only_through_valid_frames():
    pred = {4: torch.zeros(1, 3, 2, requires_grad=True)}
    target = {4: torch.ones(1, 3, 2)}
    total, _ = l2l_loss(pred, target, length_mask(torch.tensor([2]), 3))
    total.backward()
    assert pred[4].grad[0, 2].abs().sum() == 0 and pred[4].grad[0, :2].abs().sum() > 0
