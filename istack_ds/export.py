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

from .models.student import Student


def save_student(student: Student, full_state: dict[str, torch.Tensor], out: str | Path, *,
                 teacher_path: str = "", step: int = 0) -> Path:
    """Writes ``full_state`` (full fp32 tensors by parameter name) through a fresh copy of ``student``'s shape."""
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

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
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                             return_attention_mask=config.feat_extract_norm == "layer").save_pretrained(out)
    heads = {k.removeprefix("heads."): v.float() for k, v in full_state.items() if k.startswith("heads.")}
    torch.save(heads, out / "heads.pt")
    (out / "istack_student.json").write_text(json.dumps({
        "depth": student.depth, "supervised_layers": student.supervised, "teacher_layers": student.teacher_layers,
        "loss": student.loss_kind, "teacher": teacher_path, "step": step}, indent=1))
    return out
