"""The teacher: a frozen speech foundation model loaded from a local directory or the local HF cache.

Any HF ``HubertModel``, ``WavLMModel`` or ``Wav2Vec2Model`` saved with
``save_pretrained`` works, named by its directory or by a Hub id already in the
local HF cache. Nothing is ever downloaded: loading runs with ``local_files_only=True``.
Its feature extractor (``preprocessor_config.json``, read by ``AutoFeatureExtractor``)
says how audio is prepared for it; :meth:`Teacher.prepare_input` applies that to the
audio that teacher and student both hear.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
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


#: A Hub id as ``teacher.path`` may give it: ``name`` or ``org/name`` (no other slash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_teacher_path(path: str | Path) -> Path:
    """The local directory of a teacher named by a directory or by a Hub id in the local HF cache.

    Never downloads: a Hub id resolves through ``snapshot_download(local_files_only=True)``.
    """
    local = Path(path)
    if local.is_dir():
        return local
    name = str(path)
    if not local.exists() and _HUB_ID.match(name):
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError, OSError):
            raise TeacherError(
                f"teacher.path={name!r} is neither a directory nor a Hub id in the local HF cache "
                f"({constants.HF_HUB_CACHE}); nothing is downloaded during a run: fetch it once with "
                f"`hf download {name}` (or `snapshot_download`) where there is network, or "
                "point teacher.path to a local save_pretrained directory"
            ) from None
    raise TeacherError(
        f"teacher directory {path} does not exist (teacher.path). Save a trained model and its feature extractor "
        f"there, once, on a machine with hub access:\n{fetch_snippet(path)}\n(WavLM Base+: "
        '"microsoft/wavlm-base-plus", wav2vec 2.0 Base: "facebook/wav2vec2-base"; README "Getting a teacher"). '
        "`istack make-teacher` writes a teacher with RANDOM weights, for trying the machinery only (configs/demo.yaml)"
    )


#: Marks a teacher directory whose weights are random (:func:`make_random_teacher`): preflight refuses it unless
#: ``teacher.allow_random`` is set, and the export's model card says so.
RANDOM_MARKER = "RANDOM_WEIGHTS.txt"


def fetch_snippet(out: str | Path, name: str = "facebook/hubert-base-ls960") -> str:
    """The Python lines that save Hub model `name` and its feature extractor into directory `out` (hub access)."""
    return (
        "    from transformers import AutoFeatureExtractor, AutoModel\n"
        f'    name, out = "{name}", "{out}"\n'
        "    AutoModel.from_pretrained(name).save_pretrained(out)\n"
        "    AutoFeatureExtractor.from_pretrained(name).save_pretrained(out)"
    )


def is_random_teacher(path: str | Path) -> bool:
    """Whether the teacher a directory or cached Hub id names carries :data:`RANDOM_MARKER` (random weights)."""
    return (resolve_teacher_path(path) / RANDOM_MARKER).exists()


#: The files whose names and sizes stand for a teacher's weights in :func:`teacher_digest`.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def teacher_digest(path: str | Path) -> str:
    """sha256 of the teacher's config.json and of the names and sizes of its weight files: which teacher a
    checkpoint was distilled from, in milliseconds (the weights themselves are not read)."""
    local = resolve_teacher_path(path)
    h = hashlib.sha256((local / "config.json").read_bytes())
    for f in sorted(local.iterdir()):
        if f.name.endswith(WEIGHT_SUFFIXES):  # NOTE: stat follows the HF cache's symlinks to the blobs
            h.update(f"\0{f.name}\0{f.stat().st_size}".encode())
    return h.hexdigest()


def teacher_hub_name(path: str | Path) -> str | None:
    """The Hub id of the teacher `path` names, when known: `path` itself when it is a Hub id served from the local
    HF cache, else the ``_name_or_path`` of its config.json when that is a Hub id (transformers 4 wrote it); None
    otherwise (never a local path)."""
    name = str(path)
    if not Path(name).exists() and _HUB_ID.match(name):
        return name
    try:
        recorded = json.loads((resolve_teacher_path(path) / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):  # TeacherError is a ValueError
        return None
    if isinstance(recorded, str) and _HUB_ID.match(recorded) and "/" in recorded and not Path(recorded).exists():
        return recorded
    return None


@dataclass(frozen=True)
class TeacherInfo:
    """What the student, the losses and preflight need to know about the teacher, read from config.json and
    preprocessor_config.json."""

    path: str
    """The teacher's local directory (a Hub id's snapshot directory in the HF cache)."""
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
    do_normalize: bool = False
    """The feature extractor's ``do_normalize``: each utterance to zero mean and unit variance
    (:meth:`Teacher.prepare_input`)."""
    padding_value: float = 0.0
    """The feature extractor's ``padding_value``: what padded samples hold after :meth:`Teacher.prepare_input`."""
    attention_mask: bool = False
    """Whether teacher and student get an attention mask: the feature extractor's ``return_attention_mask``, or
    without a feature extractor HF's convention (models with a layer-norm CNN were trained with masks)."""
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16


def read_teacher_info(path: str | Path) -> TeacherInfo:
    """Reads and checks ``config.json`` and the feature extractor (``AutoFeatureExtractor``, when the directory
    has a ``preprocessor_config.json``) of the teacher a directory or cached Hub id names, without loading a model."""
    path = resolve_teacher_path(path)
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
    feat_extract_norm = raw.get("feat_extract_norm", "group")
    extractor = read_feature_extractor(path)
    if extractor is None:
        sample_rate, do_normalize, padding_value, mask = None, False, 0.0, feat_extract_norm == "layer"
    else:
        sample_rate, do_normalize = extractor.sampling_rate, bool(extractor.do_normalize)
        padding_value, mask = float(extractor.padding_value), bool(extractor.return_attention_mask)
    return TeacherInfo(
        path=str(path),
        model_type=model_type,
        hidden_size=int(raw["hidden_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        conv_dim=tuple(raw["conv_dim"]),
        conv_kernel=tuple(raw["conv_kernel"]),
        conv_stride=tuple(raw["conv_stride"]),
        conv_bias=bool(raw.get("conv_bias", False)),
        feat_extract_norm=feat_extract_norm,
        sample_rate=sample_rate,
        do_normalize=do_normalize,
        padding_value=padding_value,
        attention_mask=mask,
        num_conv_pos_embeddings=int(raw.get("num_conv_pos_embeddings", 128)),
        num_conv_pos_embedding_groups=int(raw.get("num_conv_pos_embedding_groups", 16)),
    )


def read_feature_extractor(path: str | Path):
    """The teacher's feature extractor as ``AutoFeatureExtractor`` loads it (local only); None when the directory
    has no ``preprocessor_config.json``. Only a raw-waveform extractor (``Wav2Vec2FeatureExtractor``) is accepted."""
    path = Path(path)
    preprocessor = path / "preprocessor_config.json"
    if not preprocessor.exists():
        return None
    from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor

    try:
        extractor = AutoFeatureExtractor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TeacherError(f"teacher feature extractor config {preprocessor} is unreadable: {e}") from None
    if not isinstance(extractor, Wav2Vec2FeatureExtractor) or extractor.feature_size != 1:
        raise TeacherError(
            f"teacher {preprocessor}: {type(extractor).__name__} (feature_size={extractor.feature_size}) is not a "
            "raw-waveform feature extractor (Wav2Vec2FeatureExtractor, feature_size 1)"
        )
    rate = extractor.sampling_rate
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0):
        raise TeacherError(f"teacher {preprocessor}: sampling_rate={rate!r} is not a positive integer")
    return extractor


def check_teacher_layers(info: TeacherInfo, layers: list[int]) -> None:
    bad = [i for i in layers if not 1 <= i <= info.num_layers]
    if bad:
        raise TeacherError(
            f"loss.teacher_layers={layers}: teacher {info.path} has {info.num_layers} layers, so {bad} do not exist"
        )


@contextmanager
def fp32_math(tf32: bool) -> Iterator[None]:
    """CUDA matmuls (cuBLAS) and convolutions (cuDNN) of fp32 tensors in TF32 (`tf32`) or IEEE fp32 inside the
    block, torch's previous settings restored after. No effect on CPU kernels."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv  # type: ignore[attr-defined]
    saved = matmul.fp32_precision, conv.fp32_precision
    # NOTE: torch >= 2.9's fp32_precision API only: mixing it with the legacy allow_tf32 flags raises.
    matmul.fp32_precision = conv.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


class Teacher(nn.Module):
    """Frozen SFM that returns the hidden states named by ``layers`` (HF indexing: i = output of layer i)."""

    def __init__(
        self,
        path: str | Path,
        layers: list[int],
        dtype: torch.dtype = torch.float32,
        int8: bool = False,
        tf32: bool = False,
    ):
        super().__init__()
        from transformers import AutoModel

        self.info = read_teacher_info(path)
        check_teacher_layers(self.info, layers)
        model = AutoModel.from_pretrained(
            self.info.path, local_files_only=True, mask_time_prob=0.0, mask_feature_prob=0.0, layerdrop=0.0
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
        #: fp32 teachers run their CUDA matmuls and convolutions in TF32 (True) or IEEE fp32 (False)
        self.tf32 = tf32
        self.use_attention_mask = self.info.attention_mask

    @classmethod
    def from_config(cls, cfg, layers: list[int]) -> Teacher:
        """The teacher a ``TeacherConfig`` names, in its ``dtype`` (fp32, bf16 or int8)."""
        dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        return cls(cfg.path, layers, dtype=dtype, int8=cfg.dtype == "int8", tf32=cfg.tf32)

    def describe(self) -> str:
        """One line for the log: what runs, in which precision."""
        precision = (
            f"int8 ({self.int8_linears} Linear layers quantized)"
            if self.int8_linears
            else str(self.dtype_).removeprefix("torch.")
        )
        if self.dtype_ == torch.float32 and not self.int8_linears:
            precision += " (TF32 on CUDA)" if self.tf32 else " (IEEE on CUDA)"
        return (
            f"{self.info.model_type} {self.info.num_layers} x {self.info.hidden_size} from {self.info.path}, "
            f"{precision}, run up to layer {len(self.model.encoder.layers)}, targets {self.layers}, input "
            f"{'normalized per utterance' if self.info.do_normalize else 'raw'}"
            f"{', attention mask' if self.use_attention_mask else ''}"
        )

    def train(self, mode: bool = True):  # the teacher never leaves eval mode
        return super().train(False)

    def frame_lengths(self, audio_lens: torch.Tensor) -> torch.Tensor:
        return self.model._get_feat_extract_output_lengths(audio_lens).long()

    def prepare_input(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> torch.Tensor:
        """The zero-padded batch `audio` [B, T] as the teacher's feature extractor prepares it, on its device.

        With ``do_normalize`` every utterance gets zero mean and unit variance over its `audio_lens`
        samples and padding becomes ``padding_value`` (:func:`sfm.normalize_waveform`); otherwise
        `audio` is returned as it is. Teacher and student both hear the result.
        """
        if not self.info.do_normalize:
            return audio
        return sfm.normalize_waveform(audio, audio_lens, self.info.padding_value)

    @torch.no_grad()
    def cnn(self, audio: torch.Tensor) -> torch.Tensor:
        """The CNN front end's output [B, C, T] (no_grad, not inference_mode: a student may consume it)."""
        with fp32_math(self.tf32):
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
        with fp32_math(self.tf32):
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


def make_random_teacher(
    out: str | Path,
    size: str = "tiny",
    model_type: str = "hubert",
    seed: int = 0,
    *,
    do_normalize: bool = False,
    feat_extract_norm: str = "group",
) -> Path:
    """Saves a RANDOMLY INITIALISED teacher of the real HF class (it exercises the machinery; it knows nothing).

    `do_normalize` and `feat_extract_norm` ("group" as HuBERT Base, "layer" as the large models) set its
    feature extractor's normalization and its CNN's norm.
    """
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
    config = config_cls(**shapes[size], feat_extract_norm=feat_extract_norm, mask_time_prob=0.0, layerdrop=0.0)
    model = model_cls(config).eval()
    out = Path(out)
    model.save_pretrained(out)
    sfm.save_feature_extractor(out, config.feat_extract_norm, do_normalize=do_normalize)
    (out / RANDOM_MARKER).write_text(
        f"This {model_type} teacher ({size}) has RANDOM weights made by `istack make-teacher` "
        f"(seed {seed}).\nIt exercises the distillation machinery; it is not a trained model.\n"
    )
    return out
