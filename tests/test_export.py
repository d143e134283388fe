"""The export (istack_ds/export.py through tools/export_student.py): a checkpoint of a real 2-rank engine ->
a Hugging Face directory -> AutoModel.

The exported HF model must reproduce the hidden states the framework's student computed
inside the engine (max abs diff <= 1e-5), for ZeRO 2 and 3, a shared CNN front end, and a
universal checkpoint.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from istack_ds.models.teacher import make_random_teacher
from tests.helpers import ROOT, child_env, load_tool, run_worker


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_random_teacher(tmp_path_factory.mktemp("teacher") / "hubert", size="tiny")


def _hidden_states(model_dir, audio):
    from transformers import AutoFeatureExtractor, AutoModel

    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(model_dir, local_files_only=True)
    assert type(model).__name__ == "HubertModel" and extractor.sampling_rate == 16000
    inputs = extractor(list(audio.numpy()), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        return model(inputs["input_values"], output_hidden_states=True).hidden_states


@pytest.mark.parametrize(
    "zero_stage, frontend, universal", [(2, "trainable", True), (3, "trainable", False), (2, "shared", False)]
)
def test_export_reproduces_the_framework_hidden_states(tmp_path, teacher_dir, zero_stage, frontend, universal):
    export_main = load_tool("tools/export_student.py").main

    run = tmp_path / "run"
    result = run_worker(
        "export_student.py",
        "--teacher",
        teacher_dir,
        "--run-dir",
        run,
        "--zero-stage",
        zero_stage,
        "--frontend",
        frontend,
        timeout=300,
    )[0]
    reference = torch.load(result["reference"])
    ckpt = Path(result["checkpoint"])
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0  # a run dir: latest checkpoint

    hidden = _hidden_states(tmp_path / "hf", reference["audio"])
    assert len(hidden) == len(reference["hidden"]) == 5  # depth 4 (+ the input of layer 1)
    diff = max((a - b).abs().max().item() for a, b in zip(hidden, reference["hidden"]))
    assert diff <= 1e-5, diff
    info = json.loads((tmp_path / "hf/istack_student.json").read_text())
    assert info["depth"] == 4 and info["supervised_layers"] == [2, 3] and info["step"] == 3
    assert set(torch.load(tmp_path / "hf/heads.pt")) == {"L4.weight", "L4.bias", "L8.weight", "L8.bias"}

    if universal:
        proc = subprocess.run(
            [sys.executable, "tools/convert_checkpoint.py", str(ckpt)],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=200,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (
            export_main(
                ["--checkpoint", str(ckpt.with_name(ckpt.name + "_universal")), "--out", str(tmp_path / "hf_universal")]
            )
            == 0
        )
        hidden_u = _hidden_states(tmp_path / "hf_universal", reference["audio"])
        assert max((a - b).abs().max().item() for a, b in zip(hidden_u, reference["hidden"])) <= 1e-5


def test_export_names_a_missing_checkpoint(tmp_path):
    export_main = load_tool("tools/export_student.py").main

    with pytest.raises(SystemExit, match="neither a complete istack_ds checkpoint"):
        export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")])
