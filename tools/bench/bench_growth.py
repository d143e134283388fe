"""Benchmark one depth growth of the paper-shaped student against its training step.

Usage:
    python tools/bench/bench_growth.py --nproc 2                 # launches itself with torchrun
    torchrun --standalone --nproc_per_node 2 tools/bench/bench_growth.py [--zero 2] [--precision bf16]
    python tools/bench/bench_growth.py --nproc 2 --from-depth 6 --to-depth 12 --steps 5 --json out.json

The student is an HF HubertModel 12 x 384 (FFN 1536, 8 heads, 512-channel CNN front end)
built at --from-depth, trained --steps steps on random 2 x 2 s audio (MSE on the last
hidden state), grown to --to-depth with `interleaved` through GrowthManager, trained
--steps more. Rank 0 prints the mean step before and after, the growth pause split into
gather / build / destroy / set / verify, RSS before and after, and pause / step. The goal
on CPU: pause < 5 s and < 3 steps. Writes nothing unless --json is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nproc", type=int, default=None, help="launch this many ranks with torchrun (outside torchrun)")
    p.add_argument("--zero", type=int, default=2, choices=(1, 2, 3))
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--from-depth", type=int, default=6)
    p.add_argument("--to-depth", type=int, default=12)
    p.add_argument("--steps", type=int, default=5, help="timed steps at each depth (after one warm-up step)")
    p.add_argument("--seconds", type=float, default=2.0, help="audio seconds per utterance")
    p.add_argument("--batch", type=int, default=2, help="utterances per rank per step")
    p.add_argument("--json", default=None, help="also write the numbers to this file (rank 0)")
    return p.parse_args()


def relaunch(args) -> int:
    """Re-runs this script under torchrun with --nproc ranks (one OMP thread per core share)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    argv, skip = [], False
    for a in sys.argv[1:]:  # everything but --nproc N / --nproc=N
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        argv.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        str(Path(__file__).resolve()),
        *argv,
    ]
    return subprocess.call(cmd, env=env)


def main() -> None:
    args = parse_args()
    if "RANK" not in os.environ:
        if not args.nproc:
            sys.exit("run under torchrun, or pass --nproc N to launch N ranks")
        sys.exit(relaunch(args))

    import torch
    from torch import nn
    from transformers import HubertConfig, HubertModel

    from istack_ds.batching import plan_batches
    from istack_ds.config import Config, DeepSpeedConfig, OptimConfig
    from istack_ds.deepspeed_json import deepspeed_json
    from istack_ds.engine import build_engine, rss_bytes
    from istack_ds.growth import GrowthManager
    from istack_ds.models.student import LAYER_PREFIX

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])

    def log0(msg):
        if rank == 0:
            print(msg, flush=True)

    class Student(nn.Module):
        def __init__(self, depth, supervised):
            super().__init__()
            cfg = HubertConfig(
                hidden_size=384,
                num_hidden_layers=depth,
                num_attention_heads=8,
                intermediate_size=1536,
                mask_time_prob=0.0,
                layerdrop=0.0,
            )
            self.sfm = HubertModel(cfg)
            self.supervised = supervised

        def forward(self, audio, target):
            return nn.functional.mse_loss(self.sfm(audio).last_hidden_state.float(), target)

    def build(depth, supervised):
        torch.manual_seed(depth)
        return Student(depth, supervised)

    cfg = Config(
        optim=OptimConfig(total_steps=1000), deepspeed=DeepSpeedConfig(zero_stage=args.zero, precision=args.precision)
    )
    ds_config = deepspeed_json(cfg, plan_batches(cfg.data, cfg.deepspeed, world))
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(rank)
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    audio = torch.randn(args.batch, int(16000 * args.seconds), generator=g).to(device, dtype)

    def timed_steps(engine, n):
        target = None
        times = []
        for i in range(n + 1):
            t = time.perf_counter()
            if target is None:
                with torch.no_grad():
                    shape = engine.module.sfm(audio).last_hidden_state.shape
                target = torch.randn(*shape, generator=g).to(device)
            loss = engine(audio, target)
            engine.backward(loss)
            engine.step()
            get_accelerator().synchronize()
            if i:  # the first step warms up
                times.append(time.perf_counter() - t)
        return statistics.mean(times)

    supervised = [0, 1, 2]
    model = build(args.from_depth, supervised)
    n_before = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, ds_config, cfg.optim)
    step_before = timed_steps(engine, args.steps)
    gc.collect()
    rss_before = rss_bytes() / 2**20

    manager = GrowthManager(build, ds_config, cfg.optim, LAYER_PREFIX, "interleaved", "last", "copy")
    res = manager.grow(engine, model, args.from_depth, args.to_depth, supervised)
    engine, model = res.engine, res.model
    gc.collect()
    rss_after_growth = rss_bytes() / 2**20
    n_after = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    step_after = timed_steps(engine, args.steps)
    rss_after = rss_bytes() / 2**20

    t = {k: round(v, 3) for k, v in res.timings.items()}
    out = {
        "world_size": world,
        "zero": args.zero,
        "precision": args.precision,
        "threads_per_rank": torch.get_num_threads(),
        "batch": f"{args.batch} x {args.seconds:g} s per rank",
        "params": {"before": n_before, "after": n_after},
        "step_s": {"before": round(step_before, 3), "after": round(step_after, 3)},
        "pause_s": round(res.pause_s, 3),
        "pause_split_s": t,
        "pause_over_step": {"before": round(res.pause_s / step_before, 2), "after": round(res.pause_s / step_after, 2)},
        "rss_mib_rank0": {
            "before_growth": round(rss_before),
            "after_growth": round(rss_after_growth),
            "after_steps": round(rss_after),
        },
    }
    log0(
        f"student {args.from_depth} -> {args.to_depth} layers x 384 ({n_before / 1e6:.1f}M -> {n_after / 1e6:.1f}M "
        f"params), ZeRO {args.zero} {args.precision}, {world} ranks x {torch.get_num_threads()} threads, "
        f"{out['batch']}"
    )
    log0(f"mean step: {step_before:.3f} s at depth {args.from_depth}, {step_after:.3f} s at depth {args.to_depth}")
    log0(f"growth pause: {res.pause_s:.3f} s = " + " + ".join(f"{k[:-2]} {v:.3f}" for k, v in t.items()))
    log0(
        f"pause / step: {out['pause_over_step']['before']} (depth {args.from_depth} step), "
        f"{out['pause_over_step']['after']} (depth {args.to_depth} step)"
    )
    log0(
        f"RSS rank 0: {rss_before:.0f} MiB before growth, {rss_after_growth:.0f} MiB after, "
        f"{rss_after:.0f} MiB after {args.steps + 1} steps at depth {args.to_depth}"
    )
    ok = res.pause_s < 5 and res.pause_s < 3 * step_before
    log0(f"goal (pause < 5 s and < 3 steps): {'met' if ok else 'NOT met'}")
    log0("RESULT " + json.dumps(out))
    if args.json and rank == 0:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        log0(f"wrote {args.json}")


if __name__ == "__main__":
    main()
