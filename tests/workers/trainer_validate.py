"""2 ranks: Trainer.validate() and the layer diagnostics against a single-process computation.

Usage (under torchrun; see tests/workers/__init__.py):
    trainer_validate.py --teacher DIR --shards DIR --run-dir DIR --out JSON

Trains 2 steps (TensorBoard in RUN_DIR/tb), runs validate() and LayerDiagnostics.run() on
every rank, gathers the full weights, and on rank 0 recomputes both in one process with a
plain (non-DeepSpeed) student over the same batches: every rank's validation batches, read
by this one process. Each rank's result: its validate(), the student's depth and supervised
layers; rank 0's also the CKA map and the one-process `reference` and `cka_plain`.
"""

from pathlib import Path

import torch
import torch.distributed as dist

from istack_ds.config import load_config
from istack_ds.data import build_loader
from istack_ds.diagnostics import LayerDiagnostics
from istack_ds.dist import init_distributed
from istack_ds.trainer import Trainer
from istack_ds.zero_states import gather_full_states
from tests.workers.protocol import finish_trainer, trainer_parser

ROOT = Path(__file__).resolve().parents[2]


def reference_validation(trainer, student) -> dict[str, float]:
    """Frame-weighted losses over the batches every rank validated on, computed in this one process.

    Each rank reads its own shards; validation stops at the shortest rank's stream (capped by
    eval.max_batches), so the reference takes that many batches of each rank's loader.
    """
    cfg = trainer.cfg
    world = dist.get_world_size()
    per_rank = []
    for r in range(world):
        loader = build_loader(
            cfg.data, cfg.data.valid_index, rank=r, world_size=world, seed=cfg.run.seed, epochs=1, crop=False
        )
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == cfg.eval.max_batches:
                break
        per_rank.append(batches)
    n = min(len(b) for b in per_rank)
    errors = {t: [] for t in cfg.loss.teacher_layers}  # per valid frame: mean over features of the squared error
    with torch.no_grad():
        for batches in per_rank:
            for batch in batches[:n]:
                audio, lens = batch["audio"], batch["audio_lens"]
                targets = trainer.teacher(audio, lens)
                pred = student(audio, lens)
                frames = trainer.teacher.frame_lengths(lens)
                for t in errors:
                    p = pred[f"L{t}"]
                    T = min(p.shape[1], targets[t].shape[1])
                    mask = torch.arange(T)[None, :] < frames[:, None]
                    errors[t].append(((p[:, :T] - targets[t][:, :T]) ** 2).mean(-1)[mask].double())
    means = {t: torch.cat(e).mean().item() for t, e in errors.items()}
    last = max(means)
    total = sum((1.0 if t == last else cfg.loss.inter_weight) * v for t, v in means.items())
    return {"valid/loss": total, **{f"valid/loss_L{t}": v for t, v in means.items()}, "batches_per_rank": n}


def main(teacher_dir: str, shards: str, out_dir: str, out_json: str) -> None:
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [
            f"run.out_dir={out_dir}",
            f"teacher.path={teacher_dir}",
            f"data.train_index={shards}/train/index.json",
            f"data.valid_index={shards}/valid/index.json",
            "data.num_workers=1",
            "data.crop_seconds=2",
            "data.batch_seconds=6",
            "optim.total_steps=10",
            "eval.max_batches=3",
            "checkpoint.resume=none",
        ],
    )
    init_distributed(120)
    trainer = Trainer(cfg)
    trainer.start()
    for _ in range(2):
        trainer.train_step()
        trainer.step += 1
    result = trainer.validate()
    diagnostics = LayerDiagnostics(cfg.data, trainer.device)
    trainer.engine.eval()
    cka = diagnostics.run(trainer.engine.module, trainer.teacher, trainer.metrics, trainer.step)
    trainer.engine.train()
    states = gather_full_states(trainer.engine)  # a collective, on every rank
    mine = {"validate": result, "supervised": trainer.student.supervised, "depth": trainer.student.depth}
    if dist.get_rank() == 0:  # the CKA map is computed on rank 0
        mine["cka"] = cka.tolist()
        student = trainer.build_student(trainer.student.depth, trainer.student.supervised)
        student.load_state_dict({k: s.param for k, s in states.items()}, strict=False)
        student.eval()
        mine["reference"] = reference_validation(trainer, student)
        mine["cka_plain"] = diagnostics.compute(student, trainer.teacher, diagnostics.batch()).tolist()
    finish_trainer(trainer, out_json, mine)


if __name__ == "__main__":
    args = trainer_parser(__doc__.split("\n")[0]).parse_args()
    main(args.teacher, args.shards, args.run_dir, args.out)
