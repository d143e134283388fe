"""Shared by the growth workers: tiny students, what engines are built from, batches, rank-aware checks.

Workers run under torchrun (tests.helpers.run_worker); each builds real engines on gloo.
"""

from __future__ import annotations

import os

import torch
from deepspeed.accelerator import get_accelerator
from torch import nn

from istack_ds.batching import plan_batches
from istack_ds.config import Config, DeepSpeedConfig, OptimConfig
from istack_ds.deepspeed_json import deepspeed_json
from istack_ds.startup import skip_shm_build

skip_shm_build()

DEVICE = torch.device(get_accelerator().current_device_name())  # cpu here; cuda:N on a GPU machine

TOY_PREFIX = "layers."
HUBERT_PREFIX = "sfm.encoder.layers."


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def log0(*args) -> None:
    if rank() == 0:
        print(*args, flush=True)


def engine_config(
    zero_stage: int,
    precision: str = "fp32",
    total_steps: int = 20,
    lr: float = 1e-2,
    grad_clip: float = 0.0,
    warmup_fraction: float = 0.25,
) -> tuple[dict, OptimConfig]:
    """The DeepSpeed JSON and the optim section every engine of a worker is built from."""
    cfg = Config(
        optim=OptimConfig(
            lr=lr, total_steps=total_steps, grad_clip=grad_clip, warmup_fraction=warmup_fraction, weight_decay=0.01
        ),
        # ZeRO-3: the toy's matrices (>= 128 elements) partitioned, its biases, norms and 16x3 head whole on
        # every rank (persistent), as a real student's matrices and biases are under the default threshold.
        deepspeed=DeepSpeedConfig(zero_stage=zero_stage, precision=precision, stage3_param_persistence_threshold=100),
    )
    return deepspeed_json(cfg, plan_batches(cfg.data, cfg.deepspeed, int(os.environ.get("WORLD_SIZE", 1)))), cfg.optim


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h):
        return h + self.fc2(torch.tanh(self.fc1(self.norm(h))))


class ToyStudent(nn.Module):
    """input linear + ``layers`` + head; the supervised layers' outputs are pulled towards zero."""

    def __init__(self, depth: int, supervised: list[int], width: int = 16):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)  # odd sizes: ZeRO pads the last partition
        self.supervised = list(supervised)

    def forward(self, x, y):
        h = self.inp(x)
        inter = 0.0
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i in self.supervised:
                inter = inter + 0.1 * h.pow(2).mean()
        return nn.functional.mse_loss(self.head(h), y) + inter


def build_toy(depth: int, supervised: list[int], width: int = 16) -> ToyStudent:
    torch.manual_seed(1000 + depth)
    return ToyStudent(depth, supervised, width)


def toy_batch(step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)  # the same batch on every rank
    return torch.randn(4, 8, generator=g).to(DEVICE, dtype), torch.randn(4, 3, generator=g).to(DEVICE, dtype)


class HubertStudent(nn.Module):
    """A tiny HF HubertModel wrapped as ``sfm`` (the real student's layout): weight-norm pos-conv included."""

    def __init__(self, depth: int, supervised: list[int]):
        super().__init__()
        from transformers import HubertConfig, HubertModel

        cfg = HubertConfig(
            hidden_size=32,
            num_hidden_layers=depth,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(32,) * 7,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            mask_time_prob=0.0,
            layerdrop=0.0,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            feat_proj_dropout=0.0,
            final_dropout=0.0,
        )
        self.sfm = HubertModel(cfg)
        self.supervised = list(supervised)

    def forward(self, audio, target):
        out = self.sfm(audio, output_hidden_states=True)
        loss = nn.functional.mse_loss(out.last_hidden_state, target)
        for i in self.supervised:
            loss = loss + 0.5 * out.hidden_states[i + 1].pow(2).mean()
        return loss


def build_hubert(depth: int, supervised: list[int]) -> HubertStudent:
    torch.manual_seed(2000 + depth)
    return HubertStudent(depth, supervised)


def hubert_batch(step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    audio = torch.randn(1, 4000, generator=g)
    return audio.to(DEVICE, dtype), torch.randn(1, 12, 32, generator=g).to(DEVICE, dtype)


def train_step(engine, batch) -> float:
    loss = engine(*batch)
    engine.backward(loss)
    engine.step()
    return float(loss.detach().float())


def current_lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])
