"""The student: an HF ``HubertModel`` at the current depth plus distillation heads.

Parameters of transformer layer i are named ``sfm.encoder.layers.<i>.*``
(:data:`LAYER_PREFIX`): the growth manager clones layers by renaming along a
lineage, so this module knows nothing about growth or DeepSpeed.
:func:`init_student` gives a fresh student its first weights (``student.init``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LossConfig, StudentConfig
from . import sfm
from .teacher import Teacher, TeacherError, TeacherInfo, resolve_teacher_path

LAYER_PREFIX = "sfm.encoder.layers."
#: The distillation heads of an export (safetensors), the state of ``Student.heads``: per teacher target t,
#: {"L<t>.weight", "L<t>.bias"} for a Linear head, {"L<t>.0.weight", "L<t>.0.bias", "L<t>.2.weight", "L<t>.2.bias"}
#: for a prediction head (:func:`prediction_head`).
HEADS_FILE = "heads.safetensors"
#: Loss kinds whose heads all read the student's top layer (no intermediate student layer has a target).
TOP_LAYER_KINDS = ("output_heads", "distilhubert")
log = logging.getLogger(__name__)


def initial_supervised_layers(depth: int, num_targets: int) -> list[int]:
    """Student layers (0-indexed) that carry the l2l targets at the initial depth, spread evenly.

    Depth 3 with targets (4, 8, 12) gives layers [0, 1, 2] (the paper's 1, 2, 3 -> 4, 8, 12).
    """
    if num_targets > depth:
        raise ValueError(f"{num_targets} supervised layers do not fit in a student of depth {depth}")
    return [(j + 1) * depth // num_targets - 1 for j in range(num_targets)]


def prediction_head(in_size: int, out_size: int) -> nn.Sequential:
    """DistilHuBERT's prediction head for one target: Linear(in, in) -> GELU -> Linear(in, out).

    s3prl's distiller (``out_layer_type: expand-last``) computes all N targets with one
    ``Linear(in, N * in)`` -> GELU -> ``SplitLinear`` (N Linear(in, out) side by side); GELU acts per
    element, so that is N of these heads, head j holding rows ``[j * in, (j + 1) * in)`` of the shared
    first Linear and slice j of the SplitLinear, with the same initial distributions (uniform with bound
    ``in ** -0.5``, as nn.Linear's defaults for fan-in ``in``).
    """
    return nn.Sequential(nn.Linear(in_size, in_size), nn.GELU(), nn.Linear(in_size, out_size))


def hubert_config(student: StudentConfig, teacher: TeacherInfo, depth: int):
    from transformers import HubertConfig

    if student.init == "teacher_layers" and student.hidden_size == teacher.hidden_size:
        # The teacher's positional convolution, so that it can be copied too.
        pos_conv = (teacher.num_conv_pos_embeddings, teacher.num_conv_pos_embedding_groups)
    else:
        pos_conv = (
            128 if teacher.hidden_size >= 256 else 16,
            16 if student.hidden_size % 16 == 0 else 4,
        )
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
        num_conv_pos_embeddings=pos_conv[0],
        num_conv_pos_embedding_groups=pos_conv[1],
        hidden_dropout=student.dropout,
        attention_dropout=student.dropout,
        activation_dropout=student.dropout,
        # No SpecAugment (it draws from numpy's global RNG) and no LayerDrop: with ZeRO every
        # rank must run the same layers, and growth tests need a deterministic student.
        mask_time_prob=0.0,
        mask_feature_prob=0.0,
        layerdrop=0.0,
    )


#: Settings of two HF configs that must be equal for a layer of one to compute what a layer of the other does.
LAYER_SETTINGS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "hidden_act",
    "layer_norm_eps",
    "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups",
)


def layer_mismatch(student_config, source_config) -> str:
    """Why the layers of the HF model configured by `source_config` cannot be copied into a student configured
    by `student_config` (a ``HubertConfig``); "" when they can."""
    model_type = source_config.model_type
    if model_type not in ("hubert", "wav2vec2") or getattr(source_config, "do_stable_layer_norm", False):
        kind = "pre-norm (do_stable_layer_norm) " if model_type in ("hubert", "wav2vec2") else ""
        return (
            f"a {kind}{model_type} model's layers compute something else than the student's HuBERT layers: copy "
            "from a HuBERT or wav2vec 2.0 model with post-norm layers"
        )
    differ = [
        f"{k} {getattr(student_config, k)} (student) != {getattr(source_config, k)}"
        for k in LAYER_SETTINGS
        if getattr(student_config, k) != getattr(source_config, k)
    ]
    if differ:
        return f"its layers are not the student's: {'; '.join(differ)}"
    if student_config.num_hidden_layers > source_config.num_hidden_layers:
        return f"it has {source_config.num_hidden_layers} layers, the student {student_config.num_hidden_layers}"
    return ""


def check_init(cfg: StudentConfig, teacher: TeacherInfo, depth: int) -> None:
    """Checks, before any process group, that ``student.init`` can copy what it names into a student of
    `depth` layers (reads configs, no weights); raises ``ConfigError`` naming the key."""
    if cfg.init not in ("teacher_layers", "pretrained"):
        return
    from transformers import AutoConfig

    source = cfg.init_from or teacher.path
    try:
        path = resolve_teacher_path(source)
    except TeacherError as e:
        raise ConfigError(f"student.init_from={source}: {e}") from None
    if cfg.init == "pretrained" and not (path / HEADS_FILE).is_file():
        raise ConfigError(
            f"student.init=pretrained: {path / HEADS_FILE} does not exist; student.init_from must be an istack_ds "
            "export"
        )
    try:
        source_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"student.init_from={source}: no readable HF config.json ({e})") from None
    problem = layer_mismatch(hubert_config(cfg, teacher, depth), source_config)
    if problem:
        raise ConfigError(f"student.init={cfg.init} from {source}: {problem}")


class Student(nn.Module):
    """HubertModel (``sfm``) + one head per teacher target (``heads.L<t>``).

    ``l2l``: head ``L<t>``, a Linear, reads the student layer in ``supervised[j]`` for target t = teacher_layers[j].
    ``output_heads``: every head reads the top layer; the last target's is a Linear (the output projection), the
    others are prediction heads (:func:`prediction_head`).
    ``distilhubert``: every head is a prediction head on the top layer (s3prl's distiller).
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
        if loss.kind in TOP_LAYER_KINDS:
            # NOTE: heads on the top layer stay on the top layer: a growth's carry (which copy of a layer keeps
            # its target) and a checkpoint's record do not move them.
            supervised = [depth - 1] * len(self.teacher_layers)
        elif supervised is None:
            supervised = initial_supervised_layers(depth, len(self.teacher_layers))
        if len(supervised) != len(self.teacher_layers) or any(not 0 <= s < depth for s in supervised):
            raise ValueError(
                f"supervised layers {supervised} do not fit depth {depth} and targets {self.teacher_layers}"
            )
        self.supervised = list(supervised)
        self.sfm = HubertModel(hubert_config(student, teacher, depth))
        self.heads = nn.ModuleDict(
            {
                f"L{t}": prediction_head(student.hidden_size, teacher.hidden_size)
                if self.head_kind(t) == "prediction"
                else nn.Linear(student.hidden_size, teacher.hidden_size)
                for t in self.teacher_layers
            }
        )
        self.use_attention_mask = teacher.attention_mask
        self.frontend = student.frontend
        if self.frontend == "shared":
            self.sfm.feature_extractor = None  # type: ignore[assignment]  # no parameters, no state, no memory
        else:
            sfm.scale_frontend_grad(self.sfm, student.cnn_grad_scale)

    def head_kind(self, t: int) -> str:
        """`linear` or `prediction` (:func:`prediction_head`): the head of teacher target t under this loss."""
        if self.loss_kind == "distilhubert" or (self.loss_kind == "output_heads" and t != self.teacher_layers[-1]):
            return "prediction"
        return "linear"

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

    def copy_layers_from(self, source: nn.Module) -> int:
        """Copies every transformer weight of the student from the HF model `source`, student layer i from its
        layer i (DistilHuBERT's initialisation), with the CNN front end when the student has one; returns how many
        tensors it copied. The heads stay as they are.

        `source` must compute what the student computes: a HuBERT or wav2vec 2.0 model (post-norm layers) of the
        student's widths, attention heads and positional convolution; anything else raises ``ValueError``.
        """
        config: Any = source.config
        where = getattr(config, "name_or_path", "") or type(source).__name__
        problem = layer_mismatch(self.sfm.config, config)
        if problem:
            raise ValueError(f"{where}: {problem}")
        return self._copy_sfm(source.state_dict(), where)

    def load_export(self, sfm_state: dict[str, torch.Tensor], heads: dict[str, torch.Tensor], where: str) -> int:
        """Copies an istack_ds export (its HubertModel's state and its heads) into the student, layer i from
        layer i and every head of the same target; returns how many tensors it copied. Raises ``ValueError`` when
        a tensor of the student has no counterpart of its shape."""
        copied = self._copy_sfm(sfm_state, where)
        own = self.heads.state_dict()
        wrong = [k for k in own if k not in heads or heads[k].shape != own[k].shape]
        if wrong:
            raise ValueError(
                f"{where}: heads {sorted(wrong)} are missing or of another shape (the export's targets, head kinds "
                f"and widths must be the student's: loss.kind {self.loss_kind}, loss.teacher_layers "
                f"{self.teacher_layers})"
            )
        self.heads.load_state_dict({k: heads[k].float() for k in own})
        return copied + len(own)

    def _copy_sfm(self, state: dict[str, torch.Tensor], where: str) -> int:
        own = self.sfm.state_dict()
        missing = [k for k in own if k not in state]
        shapes = [
            f"{k} {tuple(own[k].shape)} vs {tuple(state[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        if missing or shapes:
            raise ValueError(
                f"{where} does not fit the student: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"other shapes {shapes[:5]}"
            )
        self.sfm.load_state_dict({k: state[k].float() for k in own})
        return len(own)

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


def init_student(student: Student, cfg: StudentConfig, teacher: Teacher) -> str:
    """Gives a fresh `student` its first weights as ``student.init`` says; returns a line for the log.

    `random`: as built. `teacher_cnn`: the teacher's CNN front end when shapes match. `teacher_layers`:
    :meth:`Student.copy_layers_from` the model at ``student.init_from`` (default the teacher), read from disk
    in fp32. `pretrained`: :meth:`Student.load_export` of the istack_ds export at ``student.init_from``.
    """
    if cfg.init == "random":
        return "random"
    if cfg.init == "teacher_cnn":
        copied = student.copy_frontend_from(teacher.model)
        return "CNN front end copied from the teacher" if copied else "random (student CNN shapes differ)"
    from transformers import AutoModel

    source = cfg.init_from or teacher.info.path
    try:
        path = resolve_teacher_path(source)
    except TeacherError as e:
        raise ConfigError(f"student.init_from={source}: {e}") from None
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    if cfg.init == "teacher_layers":
        try:
            n = student.copy_layers_from(model)
        except ValueError as e:
            raise ConfigError(f"student.init=teacher_layers: {e}") from None
        return (
            f"{n} tensors from {source}: its CNN, feature projection, positional convolution and layers "
            f"0-{student.depth - 1} of its {model.config.num_hidden_layers} (student layer i = its layer i)"
        )
    from safetensors.torch import load_file

    heads_file = Path(path) / HEADS_FILE
    if not heads_file.is_file():
        raise ConfigError(
            f"student.init=pretrained: {heads_file} does not exist; student.init_from must be an istack_ds export"
        )
    problem = layer_mismatch(student.sfm.config, model.config)
    if problem:
        raise ConfigError(f"student.init=pretrained from {source}: {problem}")
    try:
        n = student.load_export(model.state_dict(), load_file(str(heads_file)), str(path))
    except ValueError as e:
        raise ConfigError(f"student.init=pretrained: {e}") from None
    return (
        f"{n} tensors from the export {source}: layers 0-{student.depth - 1} of its "
        f"{model.config.num_hidden_layers} and the heads"
    )
