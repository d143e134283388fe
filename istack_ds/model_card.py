"""The export's model card (README.md): Hub metadata through ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData``
and the text a reader of the Hub page needs.

Metadata: license (the project's, Apache-2.0), ``base_model`` (the teacher's Hub id when it is known, else left
out), datasets and language (LibriSpeech is recognised from the train index, others are given by
``istack export --dataset/--language``), ``pipeline_tag: feature-extraction``, tags, and the probe results
(``model-index``) when a ``probe.json`` comes with the export. Text: what the student is, how it was trained
(the schedule named as the paper names it), a warning when the teacher had random weights, how to load it and
run SUPERB on it, the probe results, limitations, provenance and the paper's citation.

No absolute local path is written: a path is shown relative as given, an absolute one by its last components
(:func:`public_path`), a local teacher by its directory name.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import provenance as prov

LICENSE = "apache-2.0"
PAPER = (
    'Kim & Lee, "Fast Speech Foundation Model Distillation Using Interleaved Stacking", Interspeech 2026, '
    "arXiv 2606.11766"
)
BIBTEX = """@inproceedings{kim2026interleaved,
  title         = {Fast Speech Foundation Model Distillation Using Interleaved Stacking},
  author        = {Kim and Lee},
  booktitle     = {Interspeech 2026},
  year          = {2026},
  eprint        = {2606.11766},
  archivePrefix = {arXiv}
}"""
#: Hub dataset ids and languages of the corpora recognised from a train index (its `settings.parts`).
LIBRISPEECH = ("openslr/librispeech_asr", "en")


def public_path(path: str | Path) -> str:
    """`path` as a card may show it: a relative path as given, an absolute one by its last three components."""
    p = Path(path)
    return str(p) if not p.is_absolute() else "…/" + "/".join(p.parts[-3:])


def schedule_name(growth) -> str:
    """The growth schedule of a ``GrowthConfig`` as the paper names it: ``EQL (alpha=0)`` (equal stages),
    ``PROP-a (alpha=a)``, explicit boundaries, or full depth without growth (:mod:`istack_ds.growth.schedule`)."""
    if len(growth.stage_depths) == 1:
        return "full depth, no growth"
    if growth.boundaries is not None:  # they override alpha
        return f"explicit stage boundaries {list(growth.boundaries)}"
    if growth.alpha == 0:
        return "EQL (alpha=0)"
    return f"PROP-{growth.alpha:g} (alpha={growth.alpha:g})"


def corpus_of(train_index: str | Path) -> tuple[list[str], str | None]:
    """(Hub dataset ids, language) of the corpus a train index was sharded from, where it is recognised
    (LibriSpeech, by its part names); ([], None) otherwise or when the index cannot be read."""
    try:
        settings = json.loads(Path(train_index).read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return [], None
    parts = settings.get("parts")
    names = [p for ps in parts.values() for p in ps] if isinstance(parts, dict) else list(parts or [])
    if any(str(p).startswith(("train-clean-", "train-other-")) for p in names):
        return [LIBRISPEECH[0]], LIBRISPEECH[1]
    return [], None


#: probe task -> (Hub task type, task name, metric key in probe.json, Hub metric type, metric name)
PROBE_METRICS = {
    "pr": ("automatic-speech-recognition", "phoneme recognition", "per", "per", "phoneme error rate"),
    "sid": ("audio-classification", "speaker identification", "accuracy", "accuracy", "speaker accuracy"),
}


def probe_results(probe: dict) -> list[EvalResult]:
    """The probe's PER and SID accuracy as Hub eval results (a bounded-step proxy, named so, not SUPERB)."""
    dataset = f"istack_ds probe on {public_path(probe.get('train_index') or 'unknown index')}"
    return [
        EvalResult(
            task_type=task_type,
            task_name=f"{task} (frozen model, linear probe; not SUPERB)",
            dataset_type="istack-probe",
            dataset_name=dataset,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=round(float(probe[key][value]), 4),
        )
        for key, (task_type, task, value, metric_type, metric_name) in PROBE_METRICS.items()
        if key in probe
    ]


def card_data(
    info: dict, config=None, *, datasets: list[str] | None = None, language: str | None = None, probe=None
) -> ModelCardData:
    """The card's YAML metadata. `info`: the export's istack_student.json."""
    found_datasets, found_language = corpus_of(config.data.train_index) if config is not None else ([], None)
    datasets = datasets or found_datasets
    language = language or found_language
    model_name = f"istack_ds student ({config.run.name})" if config is not None else "istack_ds student"
    tags = ["audio", "speech", "self-supervised-learning", "knowledge-distillation", "hubert", "istack_ds"]
    if info.get("teacher_random"):
        tags.append("random-teacher")
    return ModelCardData(
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="feature-extraction",
        base_model=info.get("base_model") or None,
        datasets=datasets or None,
        language=language,
        tags=tags,
        model_name=model_name,
        eval_results=probe_results(probe) if probe else None,
    )


def model_card(
    info: dict,
    sfm,
    extractor,
    config=None,
    *,
    datasets: list[str] | None = None,
    language: str | None = None,
    probe: dict | None = None,
    record: dict | None = None,
) -> ModelCard:
    """The export's card: what the student is, how it was trained, how to load it and run SUPERB on it.

    `info`: istack_student.json; `sfm`: the exported HubertModel; `extractor`: the teacher's feature extractor
    (None: one was built); `config`: the run's ``Config``; `probe`: a probe.json; `record`: the provenance.
    """
    data = card_data(info, config, datasets=datasets, language=language, probe=probe)
    body = _body(info, sfm, extractor, config, data, probe, record or prov.provenance())
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _body(info, sfm, extractor, config, data: ModelCardData, probe, record) -> str:
    depth, hidden = info["depth"], sfm.config.hidden_size
    params = sum(p.numel() for p in sfm.parameters()) / 1e6
    teacher = f"`{info['teacher'] or 'unknown'}`" + ("" if info.get("base_model") else " (a local directory)")
    rate = extractor.sampling_rate if extractor is not None else 16000
    pairs = ", ".join(
        f"`hidden_states[{s + 1}]` -> teacher layer {t}"
        for s, t in zip(info["supervised_layers"], info["teacher_layers"])
    )
    masked = extractor.return_attention_mask if extractor is not None else sfm.config.feat_extract_norm == "layer"
    norm = "zero mean, unit variance per utterance" if extractor is not None and extractor.do_normalize else "none"
    lines = [f"# Distilled HuBERT student, {depth} layers", ""]
    if info.get("teacher_random"):
        lines += [
            "> **The teacher had RANDOM weights** (it carried `RANDOM_WEIGHTS.txt`: made by `istack make-teacher` "
            "to exercise the machinery). This student learned to imitate noise: it knows nothing about speech.",
            "",
        ]
    lines += [
        f"A `HubertModel` ({depth} layers, hidden size {hidden}, {params:.1f}M parameters) distilled with "
        f"istack_ds from the teacher {teacher} after {info['step']} optimizer steps, by the method of {PAPER}.",
        "",
        "## Training",
        "",
        f"- teacher: {teacher}{' (RANDOM weights)' if info.get('teacher_random') else ''}; targets: its hidden "
        f"states {info['teacher_layers']} (loss `{info['loss']}`)",
        f"- supervised student layers: {pairs}"
        if info["loss"] == "l2l"
        else f"- every head reads the top layer `hidden_states[{depth}]`"
        + (
            f" (teacher layer {info['teacher_layers'][-1]} through a Linear, the others through prediction heads "
            "Linear -> GELU -> Linear)"
            if info["loss"] == "output_heads"
            else " (prediction heads Linear -> GELU -> Linear)"
        ),
        f"- steps: {info['step']}; final depth: {depth}",
        f"- input: {rate} Hz raw waveform; normalization: {norm} (`preprocessor_config.json`, copied from the "
        f"teacher{'' if extractor is not None else ': the teacher had none, this one is built'})",
    ]
    if config is not None:
        growth = config.growth
        lines += [
            f"- data: `{public_path(config.data.train_index)}`"
            + (f" ({', '.join(data.datasets)})" if data.datasets else ""),
            f"- schedule: {schedule_name(growth)}; depths {list(growth.depths)}, operator `{growth.operator}`, "
            f"{config.optim.total_steps} steps planned",
            f"- student CNN front end: `{config.student.frontend}`"
            f"{' (the teacher CNN, frozen: this export holds a copy)' if config.student.frontend == 'shared' else ''}"
            f"; init: `{config.student.init}`",
        ]
    lines += _load_section(info, rate)
    lines += [
        "",
        "## SUPERB with s3prl",
        "",
        "s3prl's upstream `hf_hubert_custom` loads this directory with `HubertModel.from_pretrained` and "
        "`Wav2Vec2FeatureExtractor.from_pretrained`, so it applies the normalization above:",
        "",
        "```bash",
        "cd s3prl/s3prl",
        "python run_downstream.py -m train -u hf_hubert_custom -k THIS_DIRECTORY -d DOWNSTREAM -n NAME",
        "```",
        "",
        "It pads each batch and always passes the attention mask (this student was trained "
        f"{'with' if masked else 'without'} one), and offers every hidden state to the downstream's weighted sum.",
    ]
    if probe:
        lines += ["", "## Probe results", "", _probe_text(probe)]
    lines += [
        "",
        "## Limitations",
        "",
        "- A feature extractor, not a recognizer: the hidden states need a downstream model (SUPERB, a CTC head).",
        "- It reproduces its teacher's layers and inherits the teacher's biases and the training data's coverage "
        f"(language{'s' if isinstance(data.language, list) else ''}: {data.language or 'not recorded'}).",
        "- Its quality follows the steps it was trained for; probe and SUPERB numbers, where given, are the only "
        "evidence of it.",
        "",
        "## Provenance",
        "",
        f"Exported with {prov.describe(record)} (also in `{prov.PROVENANCE_FILE}`).",
        "",
        "## Citation",
        "",
        "```bibtex",
        BIBTEX,
        "```",
        "",
    ]
    return "\n".join(lines)


def _probe_text(probe: dict) -> str:
    parts = []
    if "pr" in probe:
        parts.append(f"phoneme error rate {probe['pr']['per']:.3f} (label-blind {probe['pr']['chance_per']:.3f})")
    if "sid" in probe:
        parts.append(f"speaker accuracy {probe['sid']['accuracy']:.3f} (chance {probe['sid']['chance']:.3f})")
    return (
        f"`istack probe` ({', '.join(parts)}; `probe.json`): a bounded-step proxy of SUPERB on "
        f"`{public_path(probe.get('train_index') or 'unknown index')}`, comparable only with runs probed with the "
        "same index, steps and seed; not SUPERB."
    )


def _load_section(info: dict, rate: int) -> list[str]:
    from .models.student import HEADS_FILE

    lines = [
        "",
        "## Load",
        "",
        "```python",
        "import torch",
        "from safetensors.torch import load_file",
        "from transformers import AutoFeatureExtractor, AutoModel",
        "",
        'path = "THIS_DIRECTORY"',
        "model = AutoModel.from_pretrained(path).eval()",
        "extractor = AutoFeatureExtractor.from_pretrained(path)",
        f'inputs = extractor(waveforms, sampling_rate={rate}, padding=True, return_tensors="pt")  # a list of 1-D '
        "float arrays",
        "with torch.no_grad():",
        "    hidden = model(**inputs, output_hidden_states=True).hidden_states  # depth + 1 tensors [B, T, H]",
        "",
        f'heads = load_file(f"{{path}}/{HEADS_FILE}")  # the distillation heads, one per teacher target',
    ]
    t, s = info["teacher_layers"][0], info["supervised_layers"][0]
    if info.get("heads", {}).get(f"L{t}", "linear") == "prediction":
        lines += [
            f'inner = torch.nn.functional.gelu(hidden[{s + 1}] @ heads["L{t}.0.weight"].T + heads["L{t}.0.bias"])',
            f'prediction = inner @ heads["L{t}.2.weight"].T + heads["L{t}.2.bias"]  # teacher layer {t}',
        ]
    else:
        lines.append(f'prediction = hidden[{s + 1}] @ heads["L{t}.weight"].T + heads["L{t}.bias"]  # teacher layer {t}')
    return lines + ["```"]
