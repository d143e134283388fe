"""What the GPU check counts beside time: analytic FLOPs (MFU), host syncs, and the stacking speed-up a
schedule's per-depth step times project.

FLOPs (forward, one utterance of N samples), read off the model's own modules:
    CNN (conv i: C_in -> C_out, kernel k, stride s; T_0 = N, T_i = floor((T_{i-1} - k) / s) + 1):
        sum_i 2 * C_in * C_out / groups * k * T_i
    every weight applied per frame (T frames: feature projection, positional convolution, attention Q/K/V/out,
    FFN, prediction heads; nn.Linear and the Conv1d outside the CNN):   2 * T * sum |W|
    attention scores and their weighted sum (per attention module of width H):   4 * T^2 * H
A training step counts 3 x the student's forward (backward ~ 2 x forward) plus 1 x the teacher's (frozen,
forward only, up to its deepest target layer). `student.frontend: shared` computes the CNN once, in the teacher,
so the student's count leaves it out. Norms, activations, the loss and the optimizer are left out (element-wise,
memory-bound). MFU = FLOPs per step / step time / the device's dense bf16 peak (whatever the teacher's precision).

`python tools/bench/gpu_costs.py [--utterances 8] [--seconds 15.625]` prints these FLOPs per depth for the paper's
student and a HuBERT-Base-shaped teacher, and the EQL / PROP-1 speed-ups that FLOPs alone would allow.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch import nn

#: Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def _numel(t: torch.Tensor) -> int:
    return int(getattr(t, "ds_numel", t.numel()))  # a ZeRO-3 partitioned weight keeps its full size here


def forward_flops(model: nn.Module, samples: int, with_cnn: bool, frames: int | None = None) -> dict[str, float]:
    """Forward FLOPs of one utterance of `samples` samples through `model` (an HF wav2vec 2.0-style model, or one
    holding such a model): {"cnn", "weights", "attention", "total"}. `with_cnn` False: the CNN is not run (a
    shared front end); `frames` then gives T (else the CNN's output length)."""
    cnn, t = 0.0, samples
    weights = attention = 0.0
    cnn_convs = [m for n, m in model.named_modules() if "feature_extractor" in n and isinstance(m, nn.Conv1d)]
    for conv in cnn_convs:
        t = (t - conv.kernel_size[0]) // conv.stride[0] + 1
        cnn += 2.0 * conv.in_channels * conv.out_channels / conv.groups * conv.kernel_size[0] * t
    frames = t if frames is None else frames
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv1d) and "feature_extractor" not in name):
            weights += 2.0 * frames * _numel(m.weight)
        if hasattr(m, "q_proj") and hasattr(m, "k_proj"):
            attention += 4.0 * frames * frames * m.q_proj.out_features
    cnn = cnn if with_cnn else 0.0
    return {"cnn": cnn, "weights": weights, "attention": attention, "total": cnn + weights + attention}


def step_flops(student: nn.Module, teacher: nn.Module, samples: int, utterances: int, shared: bool) -> dict:
    """FLOPs of one training step on `utterances` utterances of `samples` samples (see the module docstring)."""
    t = forward_flops(teacher, samples, with_cnn=True)
    frames = _frames(teacher, samples)
    s = forward_flops(student, samples, with_cnn=not shared, frames=frames)
    return {
        "teacher": utterances * t["total"],
        "student": utterances * 3 * s["total"],
        "cnn_share": (t["cnn"] + 3 * s["cnn"]) / (t["total"] + 3 * s["total"]),
        "attention_share": (t["attention"] + 3 * s["attention"]) / (t["total"] + 3 * s["total"]),
        "total": utterances * (t["total"] + 3 * s["total"]),
    }


def _frames(model: nn.Module, samples: int) -> int:
    t = samples
    for n, m in model.named_modules():
        if "feature_extractor" in n and isinstance(m, nn.Conv1d):
            t = (t - m.kernel_size[0]) // m.stride[0] + 1
    return t


def projected(step_s: dict[int, float], depths: list[int], alpha: float) -> float:
    """Full-depth time / stacked time for stage shares proportional to i**alpha (EQL 0, PROP-1 1); growth
    pauses excluded."""
    shares = [(i + 1) ** alpha for i in range(len(depths))]
    stacked = sum(w * step_s[d] for w, d in zip(shares, depths)) / sum(shares)
    return step_s[depths[-1]] / stacked


#: Tensor methods that hand a value to the host: on a GPU tensor each waits for the queue (a host sync).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class HostSyncs:
    """Counts, inside ``with``, the calls of :data:`HOST_READS` by the calling package (istack_ds, deepspeed,
    torch, ...), and on CUDA the synchronizing CUDA calls torch itself reports (``set_sync_debug_mode``).

    `device_only` counts only tensors off the CPU (on a GPU a CPU tensor's read is no sync); on the CPU every
    call counts, as the stand-in for where the same code would sync on a GPU.
    """

    def __init__(self, device_only: bool):
        self.device_only = device_only
        self.by_package: Counter[str] = Counter()
        self.cuda_syncs: int | None = None
        self._saved: dict = {}

    def _wrap(self, name: str, original):
        counter, device_only = self.by_package, self.device_only

        def counted(tensor, *args, **kwargs):
            if not device_only or tensor.device.type != "cpu":
                caller = sys._getframe(1).f_globals.get("__name__", "?")
                counter[caller.split(".")[0]] += 1
            return original(tensor, *args, **kwargs)

        return counted

    def __enter__(self):
        for name in HOST_READS:
            self._saved[name] = (getattr(torch.Tensor, name), name in vars(torch.Tensor))
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name][0]))
        if torch.cuda.is_available():
            import warnings

            self._warnings = warnings.catch_warnings(record=True)
            self._records = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        for name, (original, own) in self._saved.items():
            if own:
                setattr(torch.Tensor, name, original)
            else:  # inherited from torch._C.TensorBase: the subclass had no attribute of its own
                delattr(torch.Tensor, name)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            self.cuda_syncs = sum("synchronizing CUDA operation" in str(w.message) for w in self._records)


def main(argv=None) -> int:
    import argparse

    import benchlib

    from istack_ds.config import load_config
    from istack_ds.models.student import Student
    from istack_ds.models.teacher import Teacher

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=8, help="utterances per rank per step")
    p.add_argument("--seconds", type=float, default=15.625, help="seconds per utterance")
    args = p.parse_args(argv)
    depths = [3, 6, 9, 12]
    teacher = Teacher(benchlib.paper_teacher(), [4, 8, 12])
    samples = int(args.seconds * 16000)
    print(f"TFLOP per step, {args.utterances} x {args.seconds} s per rank (teacher forward + 3 x student forward)")
    print("| front end | depth | teacher | student | total | CNN share | attention share |")
    print("|---|---|---|---|---|---|---|")
    for frontend in ("trainable", "shared"):
        cfg = load_config(None, [f"student.frontend={frontend}", "loss.teacher_layers=[4,8,12]"])
        totals = {}
        for depth in depths:
            student = Student(cfg.student, cfg.loss, teacher.info, depth, None)
            f = step_flops(student, teacher.model, samples, args.utterances, frontend == "shared")
            totals[depth] = f["total"]
            print(
                f"| {frontend} | {depth} | {f['teacher'] / 1e12:.2f} | {f['student'] / 1e12:.2f} | "
                f"{f['total'] / 1e12:.2f} | {100 * f['cnn_share']:.0f} % | {100 * f['attention_share']:.0f} % |"
            )
        print(
            f"| {frontend} | FLOPs alone: EQL {projected(totals, depths, 0):.2f}x, "
            f"PROP-1 {projected(totals, depths, 1):.2f}x | | | | | |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
