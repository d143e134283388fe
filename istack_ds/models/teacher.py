"""The teacher: a frozen speech foundation model loaded from a local directory.

Any HF ``HubertModel``, ``WavLMModel`` or ``Wav2Vec2Model`` saved with
``save_pretrained`` works. Nothing is ever downloaded: the path must exist,
and loading runs with ``local_files_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import sfm

#: The teacher families: HF ``model_type`` -> (config class, model class) in ``transformers``.
#: A family built like HuBERT (CNN front end, ``encoder.layers``) needs only its line here.
TEACHER_CLASSES = {
    "hubert": ("HubertConfig", "HubertModel"),
    "wavlm": ("WavLMConfig", "WavLMModel"),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
}
SUPPORTED_TEACHERS = tuple(TEACHER_CLASSES)


class TeacherError(ValueError):
    """A teacher directory that is missing, unreadable or of an unsupported model type."""


@dataclass(frozen=True)
class TeacherInfo:
    """What the student, the losses and preflight need to know about the teacher, read from config.json and
    preprocessor_config.json."""

    path: str
    model_type: str
    hidden_size: int
    num_layers: int
    conv_dim: tuple[int, ...]
    conv_kernel: tuple[int, ...]
    conv_stride: tuple[int, ...]
    conv_bias: bool
    feat_extract_norm: str
    sample_rate: int | None = None
    """``sampling_rate`` of the feature extractor's ``preprocessor_config.json``; None when the directory has none."""


def read_teacher_info(path: str | Path) -> TeacherInfo:
    """Reads and checks ``<path>/config.json`` (and ``preprocessor_config.json`` if present) without importing a
    model (cheap, pre-launch check)."""
    path = Path(path)
    if not path.is_dir():
        raise TeacherError(
            f"teacher directory {path} does not exist (teacher.path); make one with "
            f"`python tools/make_teacher.py --out {path}` or point to a local save_pretrained dir"
        )
    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise TeacherError(f"teacher directory {path} has no config.json: not a save_pretrained directory") from None
    except (OSError, json.JSONDecodeError) as e:
        raise TeacherError(f"teacher config {cfg_file} is unreadable: {e}") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_TEACHERS:
        raise TeacherError(
            f"teacher {cfg_file}: model_type={model_type!r} is not supported; use one of {list(SUPPORTED_TEACHERS)}"
        )
    if not any(
        (path / name).exists() for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    ):
        raise TeacherError(f"teacher directory {path} has no weights (model.safetensors or pytorch_model.bin)")
    sample_rate = None
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.exists():
        try:
            rate = json.loads(preprocessor.read_text()).get("sampling_rate")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise TeacherError(f"teacher feature extractor config {preprocessor} is unreadable: {e}") from None
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0):
            raise TeacherError(f"teacher {preprocessor}: sampling_rate={rate!r} is not a positive integer")
        sample_rate = rate
    return TeacherInfo(
        path=str(path),
        model_type=model_type,
        hidden_size=int(raw["hidden_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        conv_dim=tuple(raw["conv_dim"]),
        conv_kernel=tuple(raw["conv_kernel"]),
        conv_stride=tuple(raw["conv_stride"]),
        conv_bias=bool(raw.get("conv_bias", False)),
        feat_extract_norm=raw.get("feat_extract_norm", "group"),
        sample_rate=sample_rate,
    )


def check_teacher_layers(info: TeacherInfo, layers: list[int]) -> None:
    bad = [i for i in layers if not 1 <= i <= info.num_layers]
    if bad:
        raise TeacherError(
            f"loss.teacher_layers={layers}: teacher {info.path} has {info.num_layers} layers, so {bad} do not exist"
        )


class Teacher(nn.Module):
    """Frozen SFM that returns the hidden states named by ``layers`` (HF indexing: i = output of layer i)."""

    def __init__(self, path: str | Path, layers: list[int], dtype: torch.dtype = torch.float32, int8: bool = False):
        super().__init__()
        from transformers import AutoModel

        self.info = read_teacher_info(path)
        check_teacher_layers(self.info, layers)
        model = AutoModel.from_pretrained(
            str(path), local_files_only=True, mask_time_prob=0.0, mask_feature_prob=0.0, layerdrop=0.0
        )
        # Run only up to the deepest layer a loss uses. With do_stable_layer_norm the last
        # hidden state carries the encoder's final norm, so truncating would change it there.
        deepest = max(layers)
        if deepest < len(model.encoder.layers) and not model.config.do_stable_layer_norm:
            model.encoder.layers = model.encoder.layers[:deepest]
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.int8_linears = quantize_linear_int8(self.model) if int8 else 0
        self.layers = list(layers)
        self.dtype_ = dtype
        # HF convention: only models with layer-norm feature extractors were trained with masks.
        self.use_attention_mask = model.config.feat_extract_norm == "layer"

    @classmethod
    def from_config(cls, cfg, layers: list[int]) -> Teacher:
        """The teacher a ``TeacherConfig`` names, in its ``dtype`` (fp32, bf16 or int8)."""
        return cls(
            cfg.path, layers, dtype=torch.bfloat16 if cfg.dtype == "bf16" else torch.float32, int8=cfg.dtype == "int8"
        )

    def describe(self) -> str:
        """One line for the log: what runs, in which precision."""
        precision = (
            f"int8 ({self.int8_linears} Linear layers quantized)"
            if self.int8_linears
            else str(self.dtype_).removeprefix("torch.")
        )
        return (
            f"{self.info.model_type} {self.info.num_layers} x {self.info.hidden_size} from {self.info.path}, "
            f"{precision}, run up to layer {len(self.model.encoder.layers)}, targets {self.layers}"
        )

    def train(self, mode: bool = True):  # the teacher never leaves eval mode
        return super().train(False)

    def frame_lengths(self, audio_lens: torch.Tensor) -> torch.Tensor:
        return self.model._get_feat_extract_output_lengths(audio_lens).long()

    @torch.no_grad()
    def cnn(self, audio: torch.Tensor) -> torch.Tensor:
        """The CNN front end's output [B, C, T] (no_grad, not inference_mode: a student may consume it)."""
        return sfm.cnn(self.model, audio.to(self.dtype_))

    @torch.inference_mode()
    def forward(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, features: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Target hidden states {layer: [B, T, H]} in fp32; `features` skips the CNN (computed by :meth:`cnn`)."""
        hidden = self._hidden_states(audio, audio_lens, features)
        # Targets leave inference mode as plain fp32 tensors so the loss can use them.
        return {i: hidden[i].float().clone() for i in self.layers}

    @torch.inference_mode()
    def all_hidden_states(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> list[torch.Tensor]:
        """Every hidden state the teacher computes (up to its deepest target layer), fp32."""
        return [h.float().clone() for h in self._hidden_states(audio, audio_lens)]

    def _hidden_states(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        mask = sfm.attention_mask(audio, audio_lens) if self.use_attention_mask else None
        feats = None if features is None else features.to(self.dtype_)
        return sfm.hidden_states(self.model, audio.to(self.dtype_), mask, feats)


def quantize_linear_int8(model: nn.Module) -> int:
    """Replaces every ``nn.Linear`` of a frozen CPU model by its dynamically quantized int8 twin, in place.

    Weights are int8 per tensor, activations quantized per batch on the fly (fbgemm; VNNI where
    the CPU has it); the CNN front end stays fp32. Its speed and the targets' distance from fp32
    are measured by tools/bench/bench_teacher.py (README, "Performance"). CPU only: quantized
    Linear kernels do not exist on CUDA.
    Returns how many Linear layers were quantized.
    """
    import warnings

    from torch.ao.quantization import quantize_dynamic

    # NOTE: WavLM's attention hands its projections' raw .weight / .bias tensors to
    # F.multi_head_attention_forward, which a quantized Linear does not have: those stay fp32
    # (its feed-forward, two thirds of a layer's work, is quantized).
    raw_weights = {name for name, m in model.named_modules() if type(m).__name__ == "WavLMAttention"}
    linears = {
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(name.startswith(f"{parent}.") for parent in raw_weights)
    }
    with warnings.catch_warnings():
        # torch marks its eager quantization API deprecated in favour of torchao, whose int8 path
        # needs torch.compile on CPU; the eager kernels are the fastest measured here (README, "Performance").
        warnings.simplefilter("ignore")
        quantize_dynamic(model, linears, dtype=torch.qint8, inplace=True)
    return len(linears)


def make_random_teacher(out: str | Path, size: str = "tiny", model_type: str = "hubert", seed: int = 0) -> Path:
    """Saves a RANDOMLY INITIALISED teacher of the real HF class (it exercises the machinery; it knows nothing)."""
    import transformers

    if model_type not in TEACHER_CLASSES:
        raise ValueError(f"model_type={model_type!r}: choose one of {list(SUPPORTED_TEACHERS)}")
    shapes: dict[str, dict] = {
        # Small enough for CPU tests and the demo; 8 layers so 4 -> 8 targets look like the paper's 4/8/12.
        "tiny": dict(
            hidden_size=96,
            num_hidden_layers=8,
            num_attention_heads=4,
            intermediate_size=192,
            conv_dim=(32,) * 7,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        ),
        # HuBERT Base shape (95M parameters).
        "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    }
    if size not in shapes:
        raise ValueError(f"size={size!r}: choose one of {list(shapes)}")
    config_cls, model_cls = (getattr(transformers, name) for name in TEACHER_CLASSES[model_type])
    torch.manual_seed(seed)
    config = config_cls(**shapes[size], mask_time_prob=0.0, layerdrop=0.0)
    model = model_cls(config).eval()
    out = Path(out)
    model.save_pretrained(out)
    sfm.save_feature_extractor(out, config.feat_extract_norm)
    (out / "RANDOM_WEIGHTS.txt").write_text(
        f"This {model_type} teacher ({size}) has RANDOM weights made by istack_ds tools/make_teacher.py "
        f"(seed {seed}).\nIt exercises the distillation machinery; it is not a trained model.\n"
    )
    return out
