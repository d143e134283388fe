"""2 ranks -> universal checkpoint -> 1 rank: the loss after resume equals the 2-rank continuation.

Usage (under torchrun; see tests/workers/__init__.py):
    checkpoint_world_size.py --phase save --teacher DIR --run-dir DIR [--zero-stage {2,3}] --out JSON
        2 ranks: 3 steps, checkpoint, then 2 more steps (the reference)
    checkpoint_world_size.py --phase resume --teacher DIR --run-dir DIR [--zero-stage {2,3}] --out JSON
        1 rank, accumulation 2: load the universal checkpoint, 2 steps

Each rank's result: the loss of every step it ran (the mean over ranks) and the LR at the end.
Rank r's batch at step s is a fixed function of (r, s); on 1 rank the micro-batches of
step s are rank 0's then rank 1's, so both runs see the same global batch.
"""

from pathlib import Path

import torch
import torch.distributed as dist

from istack_ds import resume
from istack_ds.batching import plan_batches
from istack_ds.checkpoint import Checkpointer, read_meta
from istack_ds.config import load_config
from istack_ds.deepspeed_json import deepspeed_json
from istack_ds.dist import init_distributed
from istack_ds.engine import build_engine
from istack_ds.models.losses import l2l_loss
from istack_ds.models.sfm import length_mask
from istack_ds.models.student import Student
from istack_ds.models.teacher import Teacher
from tests.workers.protocol import worker_parser, write_all_ranks


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 8000, generator=g), torch.tensor([8000, 6400])


def micro_loss(engine, teacher, rank, step):
    audio, lens = batch(rank, step)
    targets = teacher(audio, lens)
    return l2l_loss(engine(audio, lens), targets, length_mask(teacher.frame_lengths(lens), targets[4].shape[1]))[0]


def main(phase: str, teacher_dir: str, out_dir: str, out_json: str, zero_stage: int) -> None:
    cfg = load_config(
        None,
        [
            f"teacher.path={teacher_dir}",
            "deepspeed.precision=fp32",
            f"deepspeed.zero_stage={zero_stage}",
            # ZeRO-3: the matrices partitioned, the biases and norms whole on every rank
            "deepspeed.stage3_param_persistence_threshold=1000",
            "optim.total_steps=50",
            "optim.lr=2e-3",
            "loss.teacher_layers=[4,8]",
            "growth.depths=[2]",
            "student.hidden_size=64",
            "student.intermediate_size=128",
            "student.num_attention_heads=4",
            "student.dropout=0.0",
        ],
    )
    init_distributed(60)
    world, rank = dist.get_world_size(), dist.get_rank()
    teacher = Teacher(teacher_dir, cfg.loss.teacher_layers)
    ckpt = Checkpointer(Path(out_dir) / "checkpoints", keep=5)
    torch.manual_seed(0)
    student = Student(cfg.student, cfg.loss, teacher.info, depth=2)
    losses = {}
    if phase == "save":
        engine = build_engine(student, deepspeed_json(cfg, plan_batches(cfg.data, cfg.deepspeed, world)), cfg.optim)
        for step in range(1, 6):
            if step == 4:
                ckpt.save(
                    engine,
                    {
                        "step": 3,
                        "depth": 2,
                        "supervised": student.supervised,
                        "gradient_accumulation": 1,
                        "config": cfg.to_dict(),
                    },
                    {},
                )
            loss = micro_loss(engine, teacher, rank, step)
            engine.backward(loss)
            engine.step()
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses[step] = t.item() / world
    else:
        meta = read_meta(Path(out_dir) / "checkpoints/step00000003_universal")
        plan = plan_batches(cfg.data, cfg.deepspeed, world, saved=(meta["world_size"], meta["gradient_accumulation"]))
        assert plan.accumulation == 2, plan.accumulation
        engine = build_engine(student, deepspeed_json(cfg, plan, load_universal=True), cfg.optim)
        # the run's own load: the engine's, then the optimizer states moved to their parameters' device
        assert resume.load_on_every_rank(ckpt, engine, Path(out_dir) / "checkpoints/step00000003_universal")[1] == []
        assert engine.global_steps == 3, engine.global_steps
        inner = engine.optimizer.optimizer  # torch's AdamW inside DeepSpeed's ZeRO optimizer
        state = [(k, v.device == p.device) for p, st in inner.state.items() for k, v in st.items()]
        assert {k for k, _ in state} == {"step", "exp_avg", "exp_avg_sq"} and all(ok for _, ok in state), state
        steps = [st["step"] for st in inner.state.values()]
        assert len({id(s) for s in steps}) == len(steps), "partitions share one step tensor"
        groups = [(g["name"], g["weight_decay"]) for g in inner.param_groups]
        assert groups == [("decay", cfg.optim.weight_decay), ("no_decay", 0.0)], groups
        for step in (4, 5):
            total = 0.0
            for r in range(2):
                loss = micro_loss(engine, teacher, r, step)
                engine.backward(loss)
                engine.step()
                total += loss.item()
            losses[step] = total / 2
    lr = engine.get_lr()[0]
    engine.destroy()
    write_all_ranks(out_json, {"losses": losses, "lr": lr})


if __name__ == "__main__":
    parser = worker_parser(__doc__.split("\n")[0])
    parser.add_argument("--phase", required=True, choices=("save", "resume"))
    parser.add_argument("--teacher", required=True, help="the teacher's directory")
    parser.add_argument("--run-dir", required=True, help="where the checkpoints go (save) or are (resume)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(2, 3))
    args = parser.parse_args()
    main(args.phase, args.teacher, args.run_dir, args.out, args.zero_stage)
