"""The paper's experiment at CPU scale: five growth schedules, same steps, then the comparison.

Usage:
    python tools/run_paper_experiment.py                       # the README's run, on 2 CPU ranks
    python tools/run_paper_experiment.py --steps 1200 --nproc 2 --out runs/paper_cpu --docs docs/paper_cpu
    python tools/run_paper_experiment.py --tiny                # a smoke run of the whole path

It runs the shipped recipes (configs/paper_interleaved_eql.yaml, _prop1, paper_gradstack_eql,
paper_midas_eql, paper_full_depth) unchanged in their method (operator, stages 3 -> 6 -> 9 -> 12,
alpha, l2l loss on teacher layers 4/8/12, carry, optimizer state copy, warmup + linear decay),
and scales down only what CPU forces (through --set, so the recipes stay the source of truth):

- teacher: a RANDOMLY INITIALISED HuBERT of the paper's shape (12 layers, targets 4/8/12) at
  reduced width (96 instead of 768, a 32-channel CNN) -- it knows nothing about speech;
- student: 12 x 48 at the end (half the teacher's width, as 384 is half of 768), FFN 192;
- data: a synthetic speech-like corpus in LibriLight layout (12 speakers, 2 held out), 4 s crops,
  16 s of audio per rank and step; fp32, ZeRO 2 on `--nproc` gloo ranks; the same number of
  steps for every schedule.

Writes RUN_DIR/<schedule>/ (a normal run directory each) and, through `istack compare` (istack_ds/commands/compare.py),
DOCS/comparison.{png,md,json}. Idempotent: the corpus, shards and teacher are reused, and a run
whose summary.json says it finished with the same settings is not run again (--force reruns).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: schedule name -> recipe (configs/). `none` (full depth) is the baseline of the speed-ups.
SCHEDULES = {
    "interleaved_eql": "paper_interleaved_eql.yaml",
    "interleaved_prop1": "paper_interleaved_prop1.yaml",
    "gradstack_eql": "paper_gradstack_eql.yaml",
    "midas_eql": "paper_midas_eql.yaml",
    "full_depth": "paper_full_depth.yaml",
}

TEACHER = dict(
    hidden_size=96,
    num_hidden_layers=12,
    num_attention_heads=4,
    intermediate_size=384,
    conv_dim=(32,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)
STUDENT = dict(hidden_size=48, intermediate_size=192, num_attention_heads=4)


def make_teacher(out: Path, seed: int = 0) -> Path:
    """A random HuBERT of the paper's depth (12 layers) at reduced width; reused when present."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers
    from transformers import HubertConfig, HubertModel

    from istack_ds.models.sfm import save_feature_extractor

    transformers.utils.logging.disable_progress_bar()

    torch.manual_seed(seed)
    config = HubertConfig(**TEACHER, mask_time_prob=0.0, layerdrop=0.0)
    HubertModel(config).eval().save_pretrained(out)
    save_feature_extractor(out, config.feat_extract_norm)
    (out / "RANDOM_WEIGHTS.txt").write_text(
        f"RANDOM HuBERT teacher of the paper's shape at reduced width ({TEACHER}), seed {seed}, made by "
        "tools/run_paper_experiment.py. It is not a trained model.\n"
    )
    return out


def make_data(data: Path, tiny: bool) -> Path:
    """Synthetic corpus -> shards (train + held-out speakers); both steps reuse what exists."""
    from istack_ds.data.demo_corpus import make_corpus
    from istack_ds.data.writer import shard_corpus

    quiet = lambda *_: None  # noqa: E731
    corpus = (
        dict(speakers=4, books=1, files=4, seconds=6.0) if tiny else dict(speakers=12, books=2, files=8, seconds=12.0)
    )
    make_corpus(data / "corpus", seed=11, engine="auto", log=quiet, **corpus)
    shards = data / "shards"
    if not (shards / "valid" / "index.json").is_file():
        import io

        shard_corpus(
            data / "corpus",
            shards,
            max_seconds=4.0,
            min_seconds=1.0,
            shard_mb=0.5,
            min_shards=8,
            valid_speakers=1 if tiny else 2,
            log=quiet,
            progress_stream=io.StringIO(),
        )
    return shards


def overrides(name: str, run_dir: Path, teacher: Path, shards: Path, steps: int, lr: float, eval_every: int) -> list:
    sets = {
        "run.name": name,
        "run.out_dir": str(run_dir),
        "run.seed": 1234,
        "teacher.path": str(teacher),
        "teacher.dtype": "fp32",
        "data.train_index": str(shards / "train/index.json"),
        "data.valid_index": str(shards / "valid/index.json"),
        "data.crop_seconds": 4.0,
        "data.batch_seconds": 16.0,
        "data.num_buckets": 4,
        "data.num_workers": 1,
        "data.shuffle_buffer": 200,
        "student.hidden_size": STUDENT["hidden_size"],
        "student.intermediate_size": STUDENT["intermediate_size"],
        "student.num_attention_heads": STUDENT["num_attention_heads"],
        "student.dropout": 0.0,
        "optim.total_steps": steps,
        "optim.lr": lr,
        "deepspeed.precision": "fp32",
        "deepspeed.zero_stage": 2,
        "log.every": max(1, eval_every // 2),
        "eval.every": eval_every,
        "eval.max_batches": 4,
        # Growth saves a checkpoint anyway; no periodic ones (they would add the same cost to every run).
        "checkpoint.every": 0,
        "checkpoint.keep": 1,
        "checkpoint.resume": "none",
    }
    out = []
    for key, value in sets.items():
        out += ["--set", f"{key}={value}"]
    return out


def finished(run_dir: Path, settings: dict) -> bool:
    summary, stamp = run_dir / "summary.json", run_dir / "experiment.json"
    return (
        summary.is_file()
        and stamp.is_file()
        and json.loads(stamp.read_text()) == settings
        and json.loads(summary.read_text()).get("steps") == settings["steps"]
    )


def run_one(name: str, recipe: str, run_dir: Path, args_list: list, nproc: int, log_file: Path) -> float:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "launchers/train.py"),
        "--config",
        str(ROOT / "configs" / recipe),
        *args_list,
    ]
    start = time.time()
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_file.read_text()[-4000:]
        raise SystemExit(f"run {name} failed (rc={proc.returncode}); log {log_file}:\n{tail}")
    return time.time() - start


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/paper_cpu", help="one run directory per schedule")
    parser.add_argument("--data", type=Path, default=ROOT / "data/paper_cpu", help="corpus, shards, teacher")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/paper_cpu", help="where the comparison goes")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of every schedule")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak LR (the recipes' 5e-4 is for 330k steps)")
    parser.add_argument("--eval-every", type=int, default=50, help="validation + CKA interval (steps)")
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks per run")
    parser.add_argument("--only", nargs="*", choices=list(SCHEDULES), default=list(SCHEDULES))
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny corpus, 16 steps")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.eval_every = 16, 8

    t0 = time.time()
    shards = make_data(args.data, args.tiny)
    teacher = make_teacher(args.data / "teacher")
    print(
        f"data: {shards} | teacher (random, 12 x {TEACHER['hidden_size']}): {teacher} | "
        f"{args.steps} steps per schedule on {args.nproc} rank(s)",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    run_dirs = []
    for name in args.only:
        run_dir = args.out / name
        run_dirs.append(run_dir)
        settings = {
            "steps": args.steps,
            "lr": args.lr,
            "eval_every": args.eval_every,
            "nproc": args.nproc,
            "tiny": args.tiny,
            "recipe": SCHEDULES[name],
            "teacher": TEACHER,
            "student": STUDENT,
        }
        if finished(run_dir, settings) and not args.force:
            print(f"{name}: finished earlier, reused ({run_dir})", flush=True)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: wall times of resumed runs are not comparable
        run_dir.mkdir(parents=True)
        sets = overrides(name, run_dir, teacher, shards, args.steps, args.lr, args.eval_every)
        seconds = run_one(name, SCHEDULES[name], run_dir, sets, args.nproc, run_dir / "train.log")
        (run_dir / "experiment.json").write_text(json.dumps(settings, indent=1))
        summary = json.loads((run_dir / "summary.json").read_text())
        print(
            f"{name}: {args.steps} steps in {seconds:.0f} s (process), final depth {summary['depth']}, "
            f"train loss {summary['loss_last']:.4f}; log {run_dir / 'train.log'}",
            flush=True,
        )

    from istack_ds.commands import compare as compare_runs

    compare_runs.main([*map(str, run_dirs), "--out", str(args.docs)])
    print(f"experiment done in {time.time() - t0:.0f} s: runs in {args.out}, comparison in {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
