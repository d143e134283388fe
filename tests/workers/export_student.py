"""2 ranks: train a student a few steps in a real engine, checkpoint it, record its hidden states (what an export
must reproduce).

Usage (under torchrun; see tests/workers/__init__.py):
    export_student.py --teacher DIR --run-dir DIR --zero-stage {2,3} --frontend {trainable,shared} --out JSON

Writes RUN_DIR/checkpoints/step00000003/ (as the trainer does) and, on rank 0,
RUN_DIR/reference.pt: the fixed audio and the engine's student hidden states on it.
Each rank's result: the paths of the two.
"""

from pathlib import Path

import torch
import torch.distributed as dist

from istack_ds.batching import plan_batches
from istack_ds.checkpoint import Checkpointer
from istack_ds.config import load_config
from istack_ds.deepspeed_json import deepspeed_json
from istack_ds.dist import init_distributed
from istack_ds.engine import build_engine
from istack_ds.models.losses import l2l_loss
from istack_ds.models.sfm import length_mask
from istack_ds.models.student import Student
from istack_ds.models.teacher import Teacher
from tests.workers.protocol import worker_parser, write_all_ranks


def main(teacher_dir: str, out_dir: str, zero_stage: int, frontend: str, out_json: str) -> None:
    cfg = load_config(
        None,
        [
            f"teacher.path={teacher_dir}",
            f"run.out_dir={out_dir}",
            f"deepspeed.zero_stage={zero_stage}",
            # every layer matrix partitioned under ZeRO-3 (the default threshold keeps these tiny ones whole)
            "deepspeed.stage3_param_persistence_threshold=0",
            "deepspeed.precision=fp32",
            f"student.frontend={frontend}",
            "optim.total_steps=10",
            "optim.lr=3e-3",
            "optim.warmup_fraction=0.1",
            "loss.teacher_layers=[4,8]",
            "growth.depths=[2,4]",
            "student.hidden_size=64",
            "student.intermediate_size=128",
            "student.num_attention_heads=4",
            "student.dropout=0.0",
        ],
    )
    init_distributed(60)
    teacher = Teacher(teacher_dir, cfg.loss.teacher_layers)
    torch.manual_seed(0)
    supervised = [2, 3]  # not the default spread ([1, 3]): the export must take it from the checkpoint
    student = Student(cfg.student, cfg.loss, teacher.info, depth=4, supervised=supervised)
    student.copy_frontend_from(teacher.model)
    engine = build_engine(
        student, deepspeed_json(cfg, plan_batches(cfg.data, cfg.deepspeed, dist.get_world_size())), cfg.optim
    )
    shared = frontend == "shared"
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    audio, lens = torch.randn(2, 16000, generator=g), torch.tensor([16000, 11000])
    audio = teacher.prepare_input(audio, lens)  # as the trainer does: what teacher and student hear
    features = teacher.cnn(audio) if shared else None
    targets = teacher(audio, lens, features) if shared else teacher(audio, lens)
    mask = length_mask(teacher.frame_lengths(lens), targets[4].shape[1])
    for _ in range(3):
        loss, _ = l2l_loss(engine(audio, lens, features), targets, mask)
        engine.backward(loss)
        engine.step()
    engine.eval()
    fixed = torch.randn(2, 24000, generator=torch.Generator().manual_seed(7))
    fixed_lens = torch.tensor([24000, 24000])
    with torch.no_grad():  # every rank: under ZeRO-3 the forward is a collective
        args = (fixed, fixed_lens, teacher.cnn(fixed)) if shared else (fixed, fixed_lens)
        hidden = engine.module.hidden_states(*args)
    meta = {
        "step": 3,
        "depth": 4,
        "supervised": supervised,
        "stage": 0,
        "gradient_accumulation": 1,
        "config": cfg.to_dict(),
    }
    checkpoint = Checkpointer(f"{out_dir}/checkpoints", keep=2).save(engine, meta, {})
    reference = Path(out_dir) / "reference.pt"
    if dist.get_rank() == 0:
        torch.save({"audio": fixed, "hidden": [h.clone() for h in hidden]}, reference)
    engine.destroy()
    write_all_ranks(out_json, {"checkpoint": str(checkpoint), "reference": str(reference)})


if __name__ == "__main__":
    parser = worker_parser(__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="the teacher's directory")
    parser.add_argument("--run-dir", required=True, help="where the checkpoint and reference.pt go")
    parser.add_argument("--zero-stage", type=int, required=True, choices=(1, 2, 3))
    parser.add_argument("--frontend", required=True, choices=("trainable", "shared"))
    args = parser.parse_args()
    main(args.teacher, args.run_dir, args.zero_stage, args.frontend, args.out)
