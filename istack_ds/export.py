"""Student -> an HF ``save_pretrained`` directory that ``transformers.AutoModel`` loads.

The directory holds the HubertModel (config.json + model.safetensors), a
feature-extractor config (16 kHz raw waveform input), the distillation heads
(``heads.pt``) and ``istack_student.json`` (depth, supervised layers, targets).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .dist import is_main
from .models.sfm import save_feature_extractor
from .models.student import Student


def save_student(
    student: Student, full_state: dict[str, torch.Tensor], out: str | Path, *, teacher_path: str = "", step: int = 0
) -> Path:
    """Writes ``full_state`` (full fp32 tensors by parameter name) through a fresh copy of ``student``'s shape."""
    from transformers import HubertModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(student.sfm.config)
    sfm = HubertModel(config)
    sfm_state = {k.removeprefix("sfm."): v.float() for k, v in full_state.items() if k.startswith("sfm.")}
    missing, unexpected = sfm.load_state_dict(sfm_state, strict=False)
    missing = [m for m in missing if m in dict(sfm.named_parameters())]
    if missing or unexpected:
        raise RuntimeError(f"export: state does not match the student (missing {missing}, unexpected {unexpected})")
    sfm.eval().save_pretrained(out)
    save_feature_extractor(out, config.feat_extract_norm)
    # .cpu(): states gathered from a GPU engine live on the GPU; heads.pt must load anywhere
    heads = {k.removeprefix("heads."): v.float().cpu() for k, v in full_state.items() if k.startswith("heads.")}
    torch.save(heads, out / "heads.pt")
    (out / "istack_student.json").write_text(
        json.dumps(
            {
                "depth": student.depth,
                "supervised_layers": student.supervised,
                "teacher_layers": student.teacher_layers,
                "loss": student.loss_kind,
                "teacher": teacher_path,
                "step": step,
            },
            indent=1,
        )
    )
    return out


def with_frontend(state: dict[str, torch.Tensor], student: Student, teacher_cnn: nn.Module) -> dict[str, torch.Tensor]:
    """`state` completed by the teacher's CNN as ``sfm.feature_extractor.*`` when the student has no CNN of its
    own (``student.frontend: shared``: it was trained on the teacher's CNN output); else `state` as it is."""
    if student.sfm.feature_extractor is not None:
        return state
    return {**state, **{f"sfm.feature_extractor.{k}": v.float() for k, v in teacher_cnn.state_dict().items()}}


def export_engine(
    engine, student: Student, teacher_cnn: nn.Module, out: str | Path, *, teacher_path: str, step: int
) -> Path:
    """The student inside a live engine -> an HF directory, written by rank 0. COLLECTIVE (every rank calls it)."""
    from .engine import gather_full_states

    states = gather_full_states(engine)
    if is_main():
        full = with_frontend({name: s.param for name, s in states.items()}, student, teacher_cnn)
        save_student(student, full, out, teacher_path=teacher_path, step=step)
    return Path(out)


# ---- any checkpoint -> HF directory ---------------------------------------------------


def checkpoint_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of an istack_ds checkpoint, by parameter name, without a process group.

    Works for every ZeRO stage (DeepSpeed's ``zero_to_fp32`` merges the partitions) and for the
    universal checkpoints of tools/convert_checkpoint.py (one ``zero/<name>/fp32.pt`` per parameter).
    """
    checkpoint = Path(checkpoint)
    universal = checkpoint / "zero"
    if universal.is_dir():
        return {
            p.name: torch.load(p / "fp32.pt", weights_only=False)["param"].float()
            for p in sorted(universal.iterdir())
            if (p / "fp32.pt").is_file()
        }
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    return {k: v.float() for k, v in state.items()}


def student_from_checkpoint(checkpoint: str | Path, teacher_path: str | Path | None = None):
    """(Student at the checkpoint's depth and supervised layers holding its fp32 weights, meta, teacher path).

    The student's shape comes from the checkpoint's resolved config; the teacher's
    config.json (its CNN shape) is read from `teacher_path`, default the config's teacher.path.
    """
    from .checkpoint import read_meta
    from .config import Config
    from .models.teacher import read_teacher_info

    meta = read_meta(checkpoint)
    if "config" in meta:
        cfg = Config.from_dict(meta["config"])
    else:  # checkpoints written before the meta carried the config: the run's resolved config.yaml
        import yaml

        run_config = Path(checkpoint).resolve().parent.parent / "config.yaml"
        if not run_config.is_file():
            raise RuntimeError(f"checkpoint {checkpoint} records no config and {run_config} does not exist")
        cfg = Config.from_dict(yaml.safe_load(run_config.read_text()))
    teacher_path = str(teacher_path or cfg.teacher.path)
    student = Student(cfg.student, cfg.loss, read_teacher_info(teacher_path), meta["depth"], meta["supervised"])
    state = checkpoint_state(checkpoint)
    own = student.state_dict()
    for name, value in state.items():  # universal checkpoints keep flat tensors
        if name in own and value.shape != own[name].shape and value.numel() == own[name].numel():
            state[name] = value.view_as(own[name])
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not fit a depth-{meta['depth']} student "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if student.sfm.feature_extractor is None:
        from transformers import AutoModel

        teacher = AutoModel.from_pretrained(teacher_path, local_files_only=True)
        state = with_frontend(state, student, teacher.feature_extractor)
    return student.eval(), state, meta, teacher_path


def export_checkpoint(checkpoint: str | Path, out: str | Path, teacher_path: str | Path | None = None) -> Path:
    """Any istack_ds checkpoint (any stage, any ZeRO stage, universal too) -> an HF save_pretrained dir."""
    student, state, meta, teacher_path = student_from_checkpoint(checkpoint, teacher_path)
    return save_student(student, state, out, teacher_path=str(teacher_path), step=int(meta["step"]))
