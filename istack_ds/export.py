"""Student -> an HF ``save_pretrained`` directory that ``transformers.AutoModel`` loads.

The directory holds the HubertModel (config.json + model.safetensors), the
teacher's feature-extractor config (``preprocessor_config.json``: the input the
student was trained on), the distillation heads (``heads.safetensors``),
``istack_student.json`` (depth, supervised layers, targets, the kind of each head, the teacher), a model card
(``README.md``, :mod:`istack_ds.model_card`), ``provenance.json`` (package versions and git commit,
:mod:`istack_ds.provenance`) and, when the export was probed, ``probe.json``.

An export never writes over what it did not make: a directory that holds anything but an earlier export
(recognised by ``istack_student.json``) is refused (:class:`ExportError`) unless `force` is given.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .dist import is_main
from .model_card import model_card
from .models.sfm import save_feature_extractor
from .models.student import HEADS_FILE, Student
from .models.teacher import is_random_teacher, read_feature_extractor, resolve_teacher_path, teacher_hub_name
from .provenance import PROVENANCE_FILE, provenance

#: The file that marks a directory as an export of this project (written by :func:`save_student`).
STUDENT_FILE = "istack_student.json"


class ExportError(ValueError):
    """An export refused before anything was written; the message names the directory and what is in it."""


def check_out(out: str | Path, force: bool = False) -> None:
    """Refuses an `out` that holds files of something other than an earlier export (unless `force`), naming it."""
    out = Path(out)
    if force or not out.is_dir() or (out / STUDENT_FILE).is_file():
        return
    found = sorted(p.name for p in out.iterdir())
    if found:
        shown = ", ".join(sorted(found, key=lambda n: n != "config.json")[:3]) + (", ..." if len(found) > 3 else "")
        raise ExportError(
            f"{out} holds {shown} and is not an istack_ds export (no {STUDENT_FILE}): the export would overwrite "
            "it; choose another --out, or pass --force to write over it"
        )


def save_student(
    student: Student,
    full_state: dict[str, torch.Tensor],
    out: str | Path,
    *,
    teacher_path: str = "",
    step: int = 0,
    config=None,
    probe: dict | None = None,
    datasets: list[str] | None = None,
    language: str | None = None,
    force: bool = False,
) -> Path:
    """Writes ``full_state`` (full fp32 tensors by parameter name) through a fresh copy of ``student``'s shape.

    The feature-extractor config is the teacher's (`teacher_path`, a directory or cached Hub id); one is built
    only when the teacher has none. `config`: the run's ``Config``, for the model card; `probe`: an
    ``istack probe`` report (default: the ``probe.json`` already in `out`, if any), written beside the card and
    summarized in it; `datasets` / `language`: the card's metadata where the train index does not say;
    `force`: write into a directory :func:`check_out` refuses.
    """
    from safetensors.torch import save_file
    from transformers import HubertModel

    out = Path(out)
    check_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = copy.deepcopy(student.sfm.config)
    sfm = HubertModel(hf_config)
    sfm_state = {k.removeprefix("sfm."): v.float() for k, v in full_state.items() if k.startswith("sfm.")}
    missing, unexpected = sfm.load_state_dict(sfm_state, strict=False)
    missing = [m for m in missing if m in dict(sfm.named_parameters())]
    if missing or unexpected:
        raise RuntimeError(f"export: state does not match the student (missing {missing}, unexpected {unexpected})")
    sfm.eval().save_pretrained(out)
    extractor = read_feature_extractor(resolve_teacher_path(teacher_path)) if teacher_path else None
    if extractor is not None:
        extractor.save_pretrained(out)
    else:
        save_feature_extractor(out, hf_config.feat_extract_norm)
    # .cpu(): states gathered from a GPU engine live on the GPU; the heads must load anywhere
    heads = {
        k.removeprefix("heads."): v.float().cpu().contiguous() for k, v in full_state.items() if k.startswith("heads.")
    }
    save_file(heads, str(out / HEADS_FILE), metadata={"format": "pt"})
    info = {
        "depth": student.depth,
        "supervised_layers": student.supervised,
        "teacher_layers": student.teacher_layers,
        "loss": student.loss_kind,
        "heads": {f"L{t}": student.head_kind(t) for t in student.teacher_layers},
        **teacher_facts(teacher_path),
        "step": step,
    }
    (out / STUDENT_FILE).write_text(json.dumps(info, indent=1))
    record = provenance()
    (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=1))
    if probe is None and (out / "probe.json").is_file():
        probe = json.loads((out / "probe.json").read_text())
    elif probe is not None:
        (out / "probe.json").write_text(json.dumps(probe, indent=1))
    card = model_card(info, sfm, extractor, config, datasets=datasets, language=language, probe=probe, record=record)
    card.save(out / "README.md")
    return out


def teacher_facts(teacher_path: str) -> dict:
    """What an export says of its teacher: its name (the Hub id when known, else the directory's name: never a
    local path), its Hub id as ``base_model`` (None when unknown) and whether its weights were random."""
    if not teacher_path:
        return {"teacher": "", "base_model": None, "teacher_random": False}
    hub = teacher_hub_name(teacher_path)
    return {
        "teacher": hub or resolve_teacher_path(teacher_path).name,
        "base_model": hub,
        "teacher_random": is_random_teacher(teacher_path),
    }


def read_heads(path: str | Path) -> dict[str, torch.Tensor]:
    """The distillation heads of an export, by parameter name: ``L<t>.weight`` [teacher_hidden, student_hidden] and
    ``L<t>.bias`` for a Linear head; ``L<t>.0.*`` (student_hidden -> student_hidden) and ``L<t>.2.*``
    (-> teacher_hidden) for a prediction head (Linear -> GELU -> Linear); ``istack_student.json`` names each kind."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / HEADS_FILE))


def with_frontend(state: dict[str, torch.Tensor], student: Student, teacher_cnn: nn.Module) -> dict[str, torch.Tensor]:
    """`state` completed by the teacher's CNN as ``sfm.feature_extractor.*`` when the student has no CNN of its
    own (``student.frontend: shared``: it was trained on the teacher's CNN output); else `state` as it is."""
    if student.sfm.feature_extractor is not None:
        return state
    return {**state, **{f"sfm.feature_extractor.{k}": v.float() for k, v in teacher_cnn.state_dict().items()}}


def export_engine(
    engine, student: Student, teacher_cnn: nn.Module, out: str | Path, *, teacher_path: str, step: int, config=None
) -> Path:
    """The student inside a live engine -> an HF directory, written by rank 0. COLLECTIVE (every rank calls it)."""
    from .zero_states import gather_full_states

    states = gather_full_states(engine)
    if is_main():
        full = with_frontend({name: s.param for name, s in states.items()}, student, teacher_cnn)
        # force: the run's own <out_dir>/student, which the run directory's owner writes at every end
        save_student(student, full, out, teacher_path=teacher_path, step=step, config=config, force=True)
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
    """(Student at the checkpoint's depth and supervised layers holding its fp32 weights, meta, teacher path,
    config).

    The student's shape comes from the checkpoint's resolved config; the teacher's
    config.json (its CNN shape) is read from `teacher_path`, default the config's teacher.path.
    """
    from .checkpoint import CheckpointError, verify
    from .config import Config
    from .models.teacher import read_teacher_info

    meta = verify(checkpoint)  # a truncated or missing file is named here, not by torch's unpickler
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
    try:
        state = checkpoint_state(checkpoint)
    except Exception as e:  # noqa: BLE001 -- torch and DeepSpeed raise many types on a corrupt file
        first = (str(e).strip().splitlines() or [""])[0]  # one line: the cause, not a torch trace
        raise CheckpointError(f"checkpoint {checkpoint} does not load ({type(e).__name__}: {first})") from e
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

        teacher = AutoModel.from_pretrained(str(resolve_teacher_path(teacher_path)), local_files_only=True)
        state = with_frontend(state, student, teacher.feature_extractor)
    return student.eval(), state, meta, teacher_path, cfg


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, teacher_path: str | Path | None = None, force: bool = False, **card
) -> Path:
    """Any istack_ds checkpoint (any stage, any ZeRO stage, universal too) -> an HF save_pretrained dir.
    `card`: :func:`save_student`'s `probe`, `datasets` and `language`; `out` is checked (:func:`check_out`)
    before the checkpoint is read."""
    check_out(out, force)
    student, state, meta, teacher_path, cfg = student_from_checkpoint(checkpoint, teacher_path)
    step = int(meta["step"])
    return save_student(student, state, out, teacher_path=str(teacher_path), step=step, config=cfg, force=force, **card)
