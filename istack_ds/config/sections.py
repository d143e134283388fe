"""The sections of the run configuration, one dataclass each, with a docstring per field and their own checks.

Every field has a docstring (the string literal under it) and a default that is the paper's recipe where
the paper gives one. A choice is a ``Literal`` type, declared once (the growth vocabulary in
:mod:`istack_ds.growth.operators`); each section validates itself in ``__post_init__`` (choices and finite
floats through :func:`istack_ds.config.values._check_fields`). Checks across sections are in
:class:`istack_ds.config.tree.Config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..growth.operators import Carry, Operator, OptimizerState, Pick, check_depths
from .values import ConfigError, _check_fields, _coerce, _positive


@dataclass
class RunConfig:
    name: str = "demo"
    """Run name, shown in logs and TensorBoard."""
    out_dir: str = "runs/demo"
    """Run directory: tb/, checkpoints/, config.yaml, student/ are written here."""
    seed: int = 1234
    """Seed for model initialisation, data order and cropping."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where the ranks compute: `cuda` (one GPU per rank; refused before any process group when torch cannot use
    CUDA, naming the torch build), `cpu`, or `auto` (cuda when torch.cuda.is_available(), else cpu). DeepSpeed's
    accelerator (DS_ACCELERATOR) must agree; the start line names the device, its count and the precision."""

    def __post_init__(self):
        _check_fields(self, "run")
        if not str(self.out_dir).strip():
            # NOTE: an empty out_dir would be the current directory, whatever it holds.
            raise ConfigError("run.out_dir is empty: name the run directory (e.g. run.out_dir=runs/demo)")
        if isinstance(self.seed, int) and abs(self.seed) >= 2**63:
            # NOTE: torch seeds take 64 bits, and each rank seeds with run.seed plus rank and step offsets.
            raise ConfigError(f"run.seed={self.seed} is beyond 63 bits: choose a seed below 2**63 in magnitude")


@dataclass
class DataConfig:
    train_index: str = "data/demo/shards/train/index.json"
    """index.json of the training shards (written by `istack shard`)."""
    valid_index: str | None = None
    """index.json of held-out shards for validation; None disables validation."""
    sample_rate: int = 16000
    """Sample rate the models expect; audio at another rate is resampled."""
    crop_seconds: float = 15.6
    """Longest cut a batch holds, in seconds; what `long_cuts` does with longer ones."""
    long_cuts: Literal["crop", "skip"] = "crop"
    """Training cuts longer than `crop_seconds`: `crop` (a random window of crop_seconds) or `skip` (left out and
    counted as `longer_than_crop`: whole utterances only, as the paper's batches of utterances are)."""
    batch_seconds: float = 200.0
    """Most audio seconds (unpadded) in one micro-batch of a rank when `global_batch` is null, and in every
    held-out (validation) batch whatever `global_batch` says; duration buckets fill batches up to it."""
    global_batch: float | None = None
    """Batch of one optimizer step over all ranks and micro-batches, in `batch_unit` (the paper: 64 utterances).
    Each rank's micro-batch and the gradient accumulation are derived from it and the world size
    (istack_ds.batching.plan_batches, printed at start), so a config means the same on 1 or 32 GPUs;
    deepspeed.gradient_accumulation must then stay 1. Null: `batch_seconds` per rank and micro-batch, times
    deepspeed.gradient_accumulation x world size per step."""
    batch_unit: Literal["seconds", "utterances"] = "seconds"
    """What `global_batch` and `max_micro_batch` count: `seconds` of audio or `utterances` (cuts); an utterance
    micro-batch holds exactly that many cuts of one duration bucket."""
    max_micro_batch: float | None = None
    """Most one rank's training micro-batch may hold, in `batch_unit` (what fits in memory; validation batches
    are bounded by `batch_seconds`): gradient accumulation grows until each rank's share of `global_batch` fits.
    Null: no bound for utterances, `batch_seconds` for seconds."""
    num_buckets: int = 20
    """Duration buckets of the stream's batcher (istack_ds.data.batcher.Batcher); their bounds split the index's
    duration histogram into equal audio seconds."""
    num_workers: int = 2
    """DataLoader worker processes per rank; shards are split across them."""
    read_timeout_s: float = 300.0
    """Seconds a rank waits for its DataLoader's next batch before every rank stops (exit 5) naming it, the worker
    and its shards (0: for ever). Only with num_workers > 0: a read in the rank's own process cannot be cut short
    (the heartbeat still names the rank that waits for data). Keep it below deepspeed.dist_timeout_s: the other
    ranks wait for this rank's batch in a collective, whose timeout would otherwise end the run first (exit 4,
    no shards named). assumed: 300 s outlasts a slow network file system's read and is half the default
    collective timeout."""
    shuffle_buffer: int = 1000
    """Cuts held in the batcher's shuffle buffer before they go to their duration bucket."""
    interleave_shards: int = 4
    """Shards a worker reads at once, member by member, into one shuffle buffer. Shards hold
    consecutive speakers, so this is what mixes speakers within a batch; a resumed worker
    re-reads at most this many shards."""

    def __post_init__(self):
        _check_fields(self, "data")
        _positive("data.crop_seconds", self.crop_seconds)
        _positive("data.batch_seconds", self.batch_seconds)
        _positive("data.num_buckets", self.num_buckets)
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _positive("data.read_timeout_s", self.read_timeout_s, allow_zero=True)
        _positive("data.shuffle_buffer", self.shuffle_buffer)
        _positive("data.interleave_shards", self.interleave_shards)
        _positive("data.sample_rate", self.sample_rate)
        if self.global_batch is not None:
            _positive("data.global_batch", self.global_batch)
            if self.batch_unit == "utterances" and not float(self.global_batch).is_integer():
                raise ConfigError(f"data.global_batch={self.global_batch} must be a whole number of utterances")
        if self.max_micro_batch is not None:
            _positive("data.max_micro_batch", self.max_micro_batch)
            if self.global_batch is None:
                raise ConfigError("data.max_micro_batch bounds the micro-batches of data.global_batch: set that too")
            if self.batch_unit == "utterances" and not float(self.max_micro_batch).is_integer():
                raise ConfigError(f"data.max_micro_batch={self.max_micro_batch} must be a whole number of utterances")
        if self.global_batch is None and self.batch_unit != "seconds":
            raise ConfigError(
                f"data.batch_unit={self.batch_unit} counts data.global_batch: set data.global_batch (without it a "
                "rank's micro-batch is data.batch_seconds)"
            )
        if self.batch_seconds < self.crop_seconds:
            raise ConfigError(
                f"data.batch_seconds={self.batch_seconds} is smaller than data.crop_seconds="
                f"{self.crop_seconds}: a cropped cut would not fit in a batch"
            )


@dataclass
class TeacherConfig:
    path: str = "data/demo/teacher"
    """Local directory of an HF HubertModel / WavLMModel / Wav2Vec2Model (save_pretrained), or a Hub id already in
    the local HF cache. Never downloaded."""
    dtype: Literal["fp32", "bf16", "int8"] = "fp32"
    """Teacher compute dtype: fp32, bf16 (weights and activations), or int8 (CPU only: Linear layers
    dynamically quantized, so the targets move away from fp32's; see README "Performance")."""
    tf32: bool = False
    """fp32 teacher on a CUDA GPU: its matmuls and convolutions of fp32 tensors in TF32 (fp32 range, 10-bit
    mantissa, tensor cores) when true, in full IEEE fp32 when false. Set only inside the teacher's forward
    (the student keeps torch's settings); nothing changes on the CPU, nor with `dtype: bf16` or `int8` (no fp32
    math left to set), so a recipe's `tf32: true` stays when `--set teacher.dtype=bf16` is tried."""
    allow_random: bool = False
    """Train on a teacher marked as having random weights (RANDOM_WEIGHTS.txt, written by `istack make-teacher`):
    true for the demo and tests, which exercise the machinery; false refuses such a teacher before launch, so a
    random teacher saved under a real model's name cannot train a student by mistake."""

    def __post_init__(self):
        _check_fields(self, "teacher")


@dataclass
class StudentConfig:
    hidden_size: int = 384
    """Width of the student transformer."""
    intermediate_size: int = 1536
    """FFN width of each student layer."""
    num_attention_heads: int = 8
    """Attention heads of each student layer."""
    init: Literal["teacher_cnn", "random", "teacher_layers", "pretrained"] = "teacher_cnn"
    """First weights of a fresh run's student (a resume loads its checkpoint instead). `teacher_cnn`: CNN front end
    copied from the teacher (when shapes match), the rest random; `random`: all random; `teacher_layers`
    (DistilHuBERT): CNN, feature projection, positional convolution and student layer i copied from layer i of the
    HF model at `init_from` (default the teacher), which must be a post-norm HuBERT or wav2vec 2.0 of the student's
    widths; `pretrained`: every weight, heads included, from the istack_ds export at `init_from` (continue a
    student)."""
    init_from: str | None = None
    """The HF directory (or Hub id in the local HF cache) that `init` copies from: required by `pretrained`,
    optional with `teacher_layers`, null otherwise."""
    conv_dim: list[int] | None = None
    """CNN channels per conv layer; None takes the teacher's (needed for `teacher_cnn`)."""
    dropout: float = 0.1
    """Hidden, attention and activation dropout of the student transformer."""
    frontend: Literal["trainable", "shared"] = "trainable"
    """CNN front end: `trainable` (the student's own CNN, gradient scaled by cnn_grad_scale) or `shared`
    (the teacher's CNN output, computed once per batch, frozen, fed to teacher and student)."""
    cnn_grad_scale: float = 0.1
    """`trainable`: multiplies the gradient reaching the student's CNN (DistilHuBERT-style slower CNN learning)."""

    def __post_init__(self):
        _check_fields(self, "student")
        _positive("student.hidden_size", self.hidden_size)
        _positive("student.intermediate_size", self.intermediate_size)
        _positive("student.num_attention_heads", self.num_attention_heads)
        _positive("student.cnn_grad_scale", self.cnn_grad_scale, allow_zero=True)
        if self.conv_dim is not None and (not self.conv_dim or min(self.conv_dim) < 1):
            raise ConfigError(f"student.conv_dim={self.conv_dim} must be null or a list of channel counts >= 1")
        if self.frontend == "shared" and self.conv_dim is not None:
            raise ConfigError("student.conv_dim must be null with student.frontend=shared: the CNN is the teacher's")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"student.dropout={self.dropout} must be in [0, 1)")
        if self.init == "pretrained" and not self.init_from:
            raise ConfigError("student.init=pretrained needs student.init_from: the export directory to start from")
        if self.init_from is not None and self.init not in ("teacher_layers", "pretrained"):
            raise ConfigError(
                f"student.init_from={self.init_from} is used by student.init=teacher_layers or pretrained only, "
                f"not {self.init}: set student.init or remove student.init_from"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"student.hidden_size={self.hidden_size} is not divisible by "
                f"student.num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_size % 4:
            # models/student.py runs the positional convolution in 16 (or else 4) channel groups.
            raise ConfigError(f"student.hidden_size={self.hidden_size} must be a multiple of 4 (positional conv)")


@dataclass
class LossConfig:
    kind: Literal["l2l", "output_heads", "distilhubert"] = "l2l"
    """`l2l` (the paper's interleaved runs: each target from its own supervised student layer through a Linear,
    MSE); `output_heads` (the paper's GradStack and MIDAS runs: the last target from the top layer through a Linear,
    MSE, the other targets from prediction heads (Linear -> GELU -> Linear) on the top layer, MSE, so no
    intermediate student layer has a target of its own); `distilhubert` (s3prl's distiller: prediction heads on the
    top layer for every target, L1 - log sigmoid cos)."""
    teacher_layers: list[int] = field(default_factory=lambda: [4, 8, 12])
    """Teacher hidden-state indices used as targets (i = output of transformer layer i, as in HF hidden_states)."""
    inter_weight: float = 0.5
    """l2l and output_heads: multiplies the SUM over the intermediate targets (every target but the last) of their
    MSE, each a mean over valid frames and channels; the last target is the output term, weight 1. So
    total = MSE(last) + inter_weight x (MSE(4) + MSE(8)) for targets [4, 8, 12]. The paper's value: 0.5.
    0 trains on the output term alone (the ablation configs). distilhubert: not used (it averages its targets)."""
    cos_weight: float = 1.0
    """distilhubert: lambda of the -log sigmoid(cos) term (s3prl: 1); its total is the MEAN over targets of
    L1 + cos_weight x -log sigmoid(cos)."""

    def __post_init__(self):
        _check_fields(self, "loss")
        if not self.teacher_layers:
            raise ConfigError("loss.teacher_layers must name at least one teacher layer")
        if sorted(set(self.teacher_layers)) != list(self.teacher_layers):
            raise ConfigError(f"loss.teacher_layers={self.teacher_layers} must be strictly increasing")
        if self.teacher_layers[0] < 1:
            raise ConfigError(f"loss.teacher_layers={self.teacher_layers}: layer indices start at 1")
        _positive("loss.inter_weight", self.inter_weight, allow_zero=True)
        _positive("loss.cos_weight", self.cos_weight, allow_zero=True)


@dataclass
class GrowthConfig:
    operator: Operator = "interleaved"
    """How depth grows: interleaved (the paper), gradstack, midas, stack, or none (full depth from step 0)."""
    depths: list[int] = field(default_factory=lambda: [3, 6, 9, 12])
    """Student depth of each stage; the last is the final depth (the only one used by `none`)."""
    alpha: float = 0.0
    """Stage i gets a share of optim.total_steps proportional to i**alpha (0 = EQL, 1 = PROP-1)."""
    boundaries: list[int] | None = None
    """Explicit first step of stages 2..B (overrides alpha); len = len(depths) - 1."""
    carry: Carry = "last"
    """Which copy of a supervised layer keeps its target after growth: `last` or `first`."""
    optimizer_state: OptimizerState = "copy"
    """Adam moments of a cloned layer: `copy` from its source, or `reset` to zero."""
    pick: Pick = "last"
    """interleaved: which layer of each group of d/n layers is cloned, `last` (idx_j = floor((j+1)d/n) - 1) or
    `first` (idx_j = floor(j d/n)); the paper does not say. Other operators ignore it."""

    def __post_init__(self):
        _check_fields(self, "growth")
        try:
            check_depths(self.operator, self.depths)
        except ValueError as e:
            raise ConfigError(f"growth.depths={self.depths}: {e}") from None
        if self.boundaries is not None:
            if len(self.boundaries) != len(self.depths) - 1:
                raise ConfigError(
                    f"growth.boundaries={self.boundaries} needs {len(self.depths) - 1} entries "
                    f"(one per growth of growth.depths={self.depths})"
                )
            if any(b <= a for a, b in zip([0] + self.boundaries, self.boundaries)):
                raise ConfigError(f"growth.boundaries={self.boundaries} must be strictly increasing and > 0")

    @property
    def final_depth(self) -> int:
        return self.depths[-1]

    @property
    def stage_depths(self) -> list[int]:
        """Depth of each stage actually trained (`none` trains the final depth only)."""
        return [self.depths[-1]] if self.operator == "none" else list(self.depths)


@dataclass
class OptimConfig:
    lr: float = 5.0e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 1.0e-4
    """AdamW weight decay (not applied to biases and norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1.0e-8
    """AdamW epsilon."""
    warmup_fraction: float = 0.07
    """Linear warmup over this fraction of total_steps, then linear decay to 0."""
    total_steps: int | None = 330000
    """Optimizer steps of the whole run, across all stages; null when `epochs` sets them."""
    epochs: float | None = None
    """Passes over the training index; when set, total_steps = ceil(epochs x the index's utterances (or seconds)
    / data.global_batch), resolved when the run starts (istack_ds.batching.resolve_total_steps, printed with the
    growth boundaries) and written into the run's config.yaml. Needs data.global_batch; optim.total_steps must be
    null or the resolved value."""
    grad_clip: float = 5.0
    """Clip the global gradient norm to this value (0 disables)."""
    max_nonfinite: int = 10
    """A non-finite loss skips its micro-batch (counted); this many in a row save a checkpoint and stop the run."""

    def __post_init__(self):
        _check_fields(self, "optim")
        _positive("optim.lr", self.lr)
        _positive("optim.eps", self.eps)
        if self.total_steps is not None:
            _positive("optim.total_steps", self.total_steps)
        if self.epochs is not None:
            _positive("optim.epochs", self.epochs)
        if self.total_steps is None and self.epochs is None:
            raise ConfigError("optim.total_steps is null: set it, or optim.epochs to derive it")
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.max_nonfinite", self.max_nonfinite)
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")

    @property
    def steps(self) -> int:
        """total_steps, which must be resolved (istack_ds.batching.resolve_total_steps sets it from `epochs`)."""
        if self.total_steps is None:
            raise ConfigError(
                f"optim.total_steps is not resolved from optim.epochs={self.epochs} yet "
                "(istack_ds.batching.resolve_total_steps)"
            )
        return self.total_steps

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_fraction * self.steps))


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[1, 2, 3] = 2
    """ZeRO stage 1, 2 or 3 (0 is refused: growth reads states through the ZeRO APIs)."""
    precision: Literal["fp32", "bf16"] = "bf16"
    """Training precision: fp32 or bf16 (fp32 master weights either way)."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step."""
    dist_timeout_s: int = 600
    """Seconds a collective may wait before the process group gives up (a dead rank must not hang the others).
    assumed: 10 min, sized for GPU jobs: far above any step, save or growth gather of the paper's students, and
    short enough that a lost rank does not idle a cluster for long (torch's own default is 10 min for NCCL)."""
    overlap_comm: bool = True
    """ZeRO's `overlap_comm`: gradient reduction overlaps the backward pass. assumed: on, as DeepSpeed
    recommends for multi-node ZeRO-2/3 (the paper is silent)."""
    reduce_bucket_size: int = 20_000_000
    """ZeRO's `reduce_bucket_size`, in elements: gradients reduced per bucket. assumed: 2e7 (DeepSpeed's
    default 5e8 is one bucket for the whole student, so nothing overlaps); large enough to run at bandwidth."""
    allgather_bucket_size: int = 20_000_000
    """ZeRO-1/2's `allgather_bucket_size`, in elements: updated weights gathered per bucket after each step.
    assumed: 2e7, as `reduce_bucket_size`."""
    communication_data_type: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the gradient reduction over ranks. assumed: fp32 (the paper is silent): a bf16 sum over 32
    ranks keeps 8 bits of mantissa; the student is small, so fp32 traffic costs little next to the teacher."""
    stage3_param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters with fewer elements stay whole on every rank instead of being gathered at each use
    (biases and norms: many tiny all-gathers otherwise). assumed: DeepSpeed's default 1e5; 0 partitions every
    parameter."""
    extra: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed JSON options this config does not model (e.g. `flops_profiler`, `zero_optimization:
    {contiguous_gradients: true}`), merged into the generated JSON; a key istack_ds sets from another setting
    (batch sizes, accumulation, ZeRO stage, precision, clipping, scheduler, optimizer, the communication settings
    above) is refused when it differs, as is ZeRO-Offload (`offload_optimizer`: deepspeed.initialize refuses it
    with istack_ds's client optimizer; `offload_param`: untested with growth), and the merged JSON is checked by
    DeepSpeed's config classes before launch."""

    def __post_init__(self):
        _check_fields(self, "deepspeed")
        _positive("deepspeed.gradient_accumulation", self.gradient_accumulation)
        _positive("deepspeed.dist_timeout_s", self.dist_timeout_s)
        _positive("deepspeed.reduce_bucket_size", self.reduce_bucket_size)
        _positive("deepspeed.allgather_bucket_size", self.allgather_bucket_size)
        _positive("deepspeed.stage3_param_persistence_threshold", self.stage3_param_persistence_threshold, True)
        if not isinstance(self.extra, dict) or not all(isinstance(k, str) for k in self.extra):
            raise ConfigError(f"deepspeed.extra={self.extra!r} must be a mapping of DeepSpeed JSON keys to values")


@dataclass
class LogConfig:
    every: int = 50
    """Optimizer steps between log lines and TensorBoard scalars."""
    tensorboard: bool = True
    """Write TensorBoard events to <out_dir>/tb (rank 0)."""
    data_audit: bool = False
    """Append the cut ids of every consumed batch to <out_dir>/data_audit/rank<r>.jsonl (to audit what a
    resume re-read or skipped)."""
    monitors: list[Literal["csv", "wandb"]] = field(default_factory=list)
    """Extra monitors of the scalars, through DeepSpeed's monitor classes (rank 0): `csv` writes
    <out_dir>/csv/<tag>.csv (a resume drops the rows after its checkpoint's step, keeping the file as it was in
    `<tag>.csv.superseded-<time>`); `wandb` (needs the wandb package) logs to project `log.wandb_project`, one
    wandb run per start or resume, named and grouped by `run.name`."""
    wandb_project: str = "istack_ds"
    """The wandb project when `log.monitors` holds `wandb`."""

    def __post_init__(self):
        _check_fields(self, "log")
        _positive("log.every", self.every)
        # Checked here as well as on loading: _check_fields does not look into lists.
        for i, monitor in enumerate(self.monitors):
            _coerce(f"log.monitors[{i}]", monitor, Literal["csv", "wandb"])


@dataclass
class CheckpointConfig:
    every: int = 5000
    """Optimizer steps between checkpoints (0 disables periodic saving)."""
    keep: int = 3
    """Newest checkpoints kept."""
    resume: str = "auto"
    """`auto` (latest in <out_dir>/checkpoints if any), `none`, or a checkpoint path."""
    allow_other_teacher: bool = False
    """Resume a checkpoint distilled from another teacher (another config.json or weight files): refused unless
    true."""
    preempt_grace_s: float = 300.0
    """After SIGTERM / SIGUSR1 every rank saves a checkpoint at the end of the step and exits 7
    (istack_ds.preemption); a rank still running this many seconds after the signal exits 8 without one.
    assumed: 300 s holds a step and a save of the paper's models; Slurm is asked for the signal 600 s before the
    time limit (launchers/slurm_4node.sbatch)."""

    def __post_init__(self):
        _check_fields(self, "checkpoint")
        _positive("checkpoint.every", self.every, allow_zero=True)
        _positive("checkpoint.keep", self.keep)
        _positive("checkpoint.preempt_grace_s", self.preempt_grace_s)


@dataclass
class EvalConfig:
    every: int = 5000
    """Optimizer steps between validations (0 disables)."""
    max_batches: int = 50
    """Validation batches per rank."""
    diagnostics: bool = True
    """At each validation, log the linear CKA of every student layer with every teacher layer (diag/*)."""

    def __post_init__(self):
        _check_fields(self, "eval")
        _positive("eval.every", self.every, allow_zero=True)
        _positive("eval.max_batches", self.max_batches)
