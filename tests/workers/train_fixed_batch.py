"""2 ranks: a real DeepSpeed engine trains the student on one fixed batch each; the loss must fall, the teacher must
not move.

Usage (under torchrun; see tests/workers/__init__.py):
    train_fixed_batch.py --teacher DIR --zero-stage {2,3} --precision {fp32,bf16} --out JSON

Each rank's result: its losses, how far the teacher's weights moved, the engine's parameter dtype.
"""

import torch
import torch.distributed as dist

from istack_ds.batching import plan_batches
from istack_ds.config import load_config
from istack_ds.deepspeed_json import deepspeed_json
from istack_ds.dist import init_distributed
from istack_ds.engine import build_engine
from istack_ds.models.losses import l2l_loss
from istack_ds.models.sfm import length_mask
from istack_ds.models.student import Student
from istack_ds.models.teacher import Teacher
from tests.workers.protocol import worker_parser, write_all_ranks


def main(teacher_dir: str, out_json: str, zero_stage: int, precision: str) -> None:
    cfg = load_config(
        None,
        [
            f"teacher.path={teacher_dir}",
            f"deepspeed.zero_stage={zero_stage}",
            # every layer matrix partitioned under ZeRO-3 (the default threshold keeps these tiny ones whole)
            "deepspeed.stage3_param_persistence_threshold=0",
            f"deepspeed.precision={precision}",
            "optim.total_steps=20",
            "optim.lr=3e-3",
            "optim.warmup_fraction=0.1",
            "loss.teacher_layers=[4,8]",
            "growth.depths=[2]",
            "student.hidden_size=64",
            "student.intermediate_size=128",
            "student.num_attention_heads=4",
            "student.dropout=0.0",
        ],
    )
    init_distributed(60)
    teacher = Teacher(teacher_dir, cfg.loss.teacher_layers)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    torch.manual_seed(0)
    student = Student(cfg.student, cfg.loss, teacher.info, depth=2)
    student.copy_frontend_from(teacher.model)
    engine = build_engine(
        student, deepspeed_json(cfg, plan_batches(cfg.data, cfg.deepspeed, dist.get_world_size())), cfg.optim
    )
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own fixed batch
    audio = torch.randn(2, 16000, generator=g)
    lens = torch.tensor([16000, 12000])
    targets = teacher(audio, lens)
    mask = length_mask(teacher.frame_lengths(lens), targets[4].shape[1])
    losses = []
    for _ in range(20):
        loss, _ = l2l_loss(engine(audio, lens), targets, mask)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    teacher_moved = max((p - before[n]).abs().max().item() for n, p in teacher.named_parameters())
    dtype = str(next(engine.module.parameters()).dtype)
    engine.destroy()
    write_all_ranks(out_json, {"losses": losses, "teacher_moved": teacher_moved, "dtype": dtype})


if __name__ == "__main__":
    parser = worker_parser(__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="the teacher's directory")
    parser.add_argument("--zero-stage", type=int, required=True, choices=(1, 2, 3))
    parser.add_argument("--precision", required=True, choices=("fp32", "bf16"))
    args = parser.parse_args()
    main(args.teacher, args.out, args.zero_stage, args.precision)
