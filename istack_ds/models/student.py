"""The student: an HF ``HubertModel`` at the current depth plus distillation heads.

Parameters of transformer layer i are named ``sfm.encoder.layers.<i>.*``
(:data:`LAYER_PREFIX`): the growth manager clones layers by renaming along a
lineage, so this module knows nothing about growth or DeepSpeed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import LossConfig, StudentConfig
from . import sfm
from .teacher import TeacherInfo

LAYER_PREFIX = "sfm.encoder.layers."
log = logging.getLogger(__name__)


def initial_supervised_layers(depth: int, num_targets: int) -> list[int]:
    """Student layers (0-indexed) that carry the l2l targets at the initial depth, spread evenly.

    Depth 3 with targets (4, 8, 12) gives layers [0, 1, 2] (the paper's 1, 2, 3 -> 4, 8, 12).
    """
    if num_targets > depth:
        raise ValueError(f"{num_targets} supervised layers do not fit in a student of depth {depth}")
    return [(j + 1) * depth // num_targets - 1 for j in range(num_targets)]


def hubert_config(student: StudentConfig, teacher: TeacherInfo, depth: int):
    from transformers import HubertConfig

    return HubertConfig(
        hidden_size=student.hidden_size,
        num_hidden_layers=depth,
        num_attention_heads=student.num_attention_heads,
        intermediate_size=student.intermediate_size,
        # The CNN follows the teacher's kernels and strides, so both produce the same frames.
        conv_dim=tuple(student.conv_dim or teacher.conv_dim),
        conv_kernel=teacher.conv_kernel,
        conv_stride=teacher.conv_stride,
        conv_bias=teacher.conv_bias,
        feat_extract_norm=teacher.feat_extract_norm,
        num_conv_pos_embeddings=128 if teacher.hidden_size >= 256 else 16,
        num_conv_pos_embedding_groups=16 if student.hidden_size % 16 == 0 else 4,
        hidden_dropout=student.dropout,
        attention_dropout=student.dropout,
        activation_dropout=student.dropout,
        # No SpecAugment (it draws from numpy's global RNG) and no LayerDrop: with ZeRO every
        # rank must run the same layers, and growth tests need a deterministic student.
        mask_time_prob=0.0,
        mask_feature_prob=0.0,
        layerdrop=0.0,
    )


class Student(nn.Module):
    """HubertModel (``sfm``) + one linear head per teacher target (``heads.L<t>``).

    ``l2l``: head ``L<t>`` reads the student layer in ``supervised[j]`` for target t = teacher_layers[j].
    ``distilhubert``: every head reads the top layer (DistilHuBERT's prediction heads).
    With ``frontend: shared`` the student has no CNN of its own (``sfm.feature_extractor`` is None):
    it consumes the teacher's CNN output, and the export puts the teacher's CNN back in.
    """

    def __init__(
        self,
        student: StudentConfig,
        loss: LossConfig,
        teacher: TeacherInfo,
        depth: int,
        supervised: list[int] | None = None,
    ):
        super().__init__()
        from transformers import HubertModel

        self.depth = depth
        self.loss_kind = loss.kind
        self.teacher_layers = list(loss.teacher_layers)
        if supervised is None:
            supervised = (
                initial_supervised_layers(depth, len(self.teacher_layers))
                if loss.kind == "l2l"
                else [depth - 1] * len(self.teacher_layers)
            )
        if len(supervised) != len(self.teacher_layers) or any(not 0 <= s < depth for s in supervised):
            raise ValueError(
                f"supervised layers {supervised} do not fit depth {depth} and targets {self.teacher_layers}"
            )
        self.supervised = list(supervised)
        self.sfm = HubertModel(hubert_config(student, teacher, depth))
        self.heads = nn.ModuleDict(
            {f"L{t}": nn.Linear(student.hidden_size, teacher.hidden_size) for t in self.teacher_layers}
        )
        self.use_attention_mask = teacher.feat_extract_norm == "layer"
        self.frontend = student.frontend
        if self.frontend == "shared":
            self.sfm.feature_extractor = None  # type: ignore[assignment]  # no parameters, no state, no memory
        else:
            sfm.scale_frontend_grad(self.sfm, student.cnn_grad_scale)

    def copy_frontend_from(self, teacher_model: nn.Module) -> bool:
        """Copies the teacher's CNN feature extractor when every shape matches; returns whether it did."""
        if self.sfm.feature_extractor is None:
            return True  # shared: the teacher's CNN is used as it is
        src = teacher_model.get_submodule("feature_extractor").state_dict()
        dst = self.sfm.feature_extractor.state_dict()
        if src.keys() != dst.keys() or any(src[k].shape != dst[k].shape for k in src):
            log.warning("student CNN shapes differ from the teacher's: the front end stays random")
            return False
        self.sfm.feature_extractor.load_state_dict({k: v.float() for k, v in src.items()})
        return True

    def frame_lengths(self, audio_lens: torch.Tensor) -> torch.Tensor:
        return self.sfm._get_feat_extract_output_lengths(audio_lens).long()  # type: ignore[arg-type]

    def _encode(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, features: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        dtype = self.sfm.feature_projection.projection.weight.dtype  # bf16 under a bf16 engine: inputs follow
        if self.frontend == "shared" and features is None:
            raise ValueError("student.frontend=shared: pass the teacher's CNN features (Teacher.cnn)")
        mask = sfm.attention_mask(audio, audio_lens) if self.use_attention_mask else None
        return sfm.hidden_states(self.sfm, audio.to(dtype), mask, None if features is None else features.to(dtype))

    def forward(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, features: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Returns the prediction for each teacher target, in fp32: {"L<t>": [B, frames, teacher_hidden]}.

        `features`: the teacher's CNN output [B, T, C], required with ``frontend: shared``.
        """
        hidden = self._encode(audio, audio_lens, features)
        # NOTE: string keys: DeepSpeed's ZeRO-3 post-forward hook walks dict outputs with str methods.
        return {
            f"L{t}": self.heads[f"L{t}"](hidden[s + 1]).float() for t, s in zip(self.teacher_layers, self.supervised)
        }

    def hidden_states(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """All depth + 1 hidden states of the student transformer (index i = output of layer i), fp32."""
        return tuple(h.float() for h in self._encode(audio, audio_lens, features))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
