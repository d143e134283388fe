"""The paper's experiment at CPU scale, with a teacher that has learned something: six schedules, two seeds,
then SUPERB-style probes (PR, SID) of every student, side by side.

Usage:
    python tools/run_paper_experiment.py                         # the README's run, on 2 CPU ranks
    python tools/run_paper_experiment.py --steps 300 --seeds 1 2 --out runs/paper_cpu --docs docs/paper_cpu
    python tools/run_paper_experiment.py --tiny                  # a smoke run of the whole path

What it runs, all of it cached (a rerun reuses what exists; --force reruns the students):

1. the labelled espeak-ng corpus (istack_ds/evidence/speech_corpus.py: voices as speakers, text, phonemes; 12
   speakers x 50 sentences) as lhotse manifests, sharded through the lhotse_manifest corpus module (the last
   2 speakers held out: `valid`);
2. the teacher: a 12-layer HuBERT (hidden 96) trained here on the training speakers with CTC on phonemes
   and masked log-mel regression (istack_ds/evidence/teacher_training.py; `istack train-teacher` makes the same);
3. each schedule's shipped recipe (configs/paper_*.yaml, configs/distilhubert.yaml) unchanged in its method
   (operator, stages 3 -> 6 -> 9 -> 12, alpha, loss kind and targets 4/8/12, carry, pick, optimizer state
   copy, warmup + linear decay), scaled down only where CPU forces it, through --set: a 12 x 48 student
   (FFN 192; the paper's student is half the teacher's width), 8 utterances a step over `--nproc` gloo ranks,
   `--steps` steps for every schedule, fp32, ZeRO 2, seeds `--seeds`;
4. `istack probe` of the teacher and of every exported student (PR: phoneme error rate of a CTC head over the
   softmax-weighted layers, scored on the held-out speakers; SID: speaker accuracy of a mean-pooled linear
   head on held-out sentences of the training speakers; the same probe seed for every model);
5. `istack compare` per seed (speed-ups against that seed's full-depth run, CKA figures), and
   DOCS/results.{md,json}: per schedule, the mean over seeds and each seed's values.

The DistilHuBERT row is DistilHuBERT-style, not s3prl's model: 2 layers at the teacher's width (96) with
prediction heads and its loss, but its layers start random (`student.init: teacher_cnn`): the trained
teacher is pre-LN (HuBERT Large's layout), and `teacher_layers` copies post-LN layers only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

#: schedule name -> (recipe under configs/, its own --set on top of the common ones).
SCHEDULES: dict[str, tuple[str, dict]] = {
    "interleaved_eql": ("paper_interleaved_eql.yaml", {}),
    "interleaved_prop1": ("paper_interleaved_prop1.yaml", {}),
    "gradstack_eql": ("paper_gradstack_eql.yaml", {}),
    "midas_eql": ("paper_midas_eql.yaml", {}),
    "full_depth": ("paper_full_depth.yaml", {}),
    "distilhubert": (
        "distilhubert.yaml",
        {
            "student.hidden_size": 96,
            "student.intermediate_size": 384,
            "student.num_attention_heads": 4,
            "student.init": "teacher_cnn",
            "student.init_from": "null",
        },
    ),
}
BASELINE = "full_depth"
STUDENT = dict(hidden_size=48, intermediate_size=192, num_attention_heads=4)
GLOBAL_BATCH = 8  # utterances a step (the paper: 64 on 8 GPUs)


def make_data(data: Path, tiny: bool, log=print) -> tuple[Path, Path]:
    """The labelled corpus (lhotse manifests) and its shards (train + 2 held-out speakers); both reused while the
    corpus is the one they were made from."""
    from istack_ds.data.writer import shard_corpus
    from istack_ds.evidence.speech_corpus import SpeechCorpusSettings, make_speech_corpus
    from istack_ds.evidence.teacher_data import corpus_digest

    settings = SpeechCorpusSettings(speakers=4, utterances=8) if tiny else SpeechCorpusSettings()
    corpus = data / "corpus"
    make_speech_corpus(corpus, settings, log=log)
    shards, stamp = data / "shards", {"corpus_sha256": corpus_digest(corpus)}
    made_from = shards / "experiment.json"
    if not made_from.is_file() or json.loads(made_from.read_text()) != stamp:
        import io

        shutil.rmtree(shards, ignore_errors=True)
        shard_corpus(
            corpus,
            shards,
            corpus="lhotse_manifest",
            min_seconds=0.3,
            shard_mb=0.5,
            min_shards=8,
            valid_speakers=2 if not tiny else 1,
            log=lambda *_: None,
            progress_stream=io.StringIO(),
        )
        made_from.write_text(json.dumps(stamp))
    return corpus, shards


def make_teacher(corpus: Path, out: Path, tiny: bool, log=print) -> dict:
    """Trains (or reuses) the teacher; returns its report (PER, CKA, speaker probe, wall time)."""
    from istack_ds.evidence.teacher_training import TeacherTrainingSettings, train_teacher

    settings = TeacherTrainingSettings(steps=6, held_out_speakers=1, probe_sentences=2) if tiny else None
    return train_teacher(corpus, out, settings, log=log)


def probe(model: Path, shards: Path, out: Path, tiny: bool, made_from: dict) -> dict:
    """`istack probe` of one model, reused when out/probe.json was made from the same model (`made_from`)."""
    report_file, stamp = out / "probe.json", out / "experiment.json"
    if report_file.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == made_from:
        return json.loads(report_file.read_text())
    shutil.rmtree(out, ignore_errors=True)
    from istack_ds.evidence.probe import run_probes

    steps = 20 if tiny else 400
    report = run_probes(
        model,
        shards / "train" / "index.json",
        valid_index=shards / "valid" / "index.json",
        steps=steps,
        seed=0,
        out=out,
        log=lambda *_: None,
    )
    stamp.write_text(json.dumps(made_from))
    return report


def overrides(name: str, seed: int, run_dir: Path, teacher: Path, shards: Path, args) -> list[str]:
    sets = {
        "run.name": f"{name}_s{seed}",
        "run.out_dir": str(run_dir),
        "run.seed": seed,
        "teacher.path": str(teacher),
        "teacher.dtype": "fp32",
        "data.train_index": str(shards / "train/index.json"),
        "data.valid_index": str(shards / "valid/index.json"),
        "data.global_batch": GLOBAL_BATCH,
        "data.batch_unit": "utterances",
        "data.max_micro_batch": GLOBAL_BATCH,
        "data.crop_seconds": 6.0,
        "data.batch_seconds": 24.0,
        "data.long_cuts": "crop",
        "data.num_buckets": 4,
        "data.num_workers": 1,
        "data.shuffle_buffer": 200,
        "data.interleave_shards": 2,
        "student.hidden_size": STUDENT["hidden_size"],
        "student.intermediate_size": STUDENT["intermediate_size"],
        "student.num_attention_heads": STUDENT["num_attention_heads"],
        "student.dropout": 0.0,
        "optim.epochs": "null",
        "optim.total_steps": args.steps,
        "optim.lr": args.lr,
        "deepspeed.precision": "fp32",
        "deepspeed.zero_stage": 2,
        "log.every": max(1, args.eval_every // 2),
        "eval.every": args.eval_every,
        "eval.max_batches": 4,
        # Growth saves a checkpoint anyway; no periodic ones (they would add the same cost to every run).
        "checkpoint.every": 0,
        "checkpoint.keep": 1,
        "checkpoint.resume": "none",
        **SCHEDULES[name][1],
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


def run_one(name: str, recipe: str, args_list: list, nproc: int, log_file: Path) -> float:
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


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _cell(values: list, spec: str, suffix: str = "") -> str:
    """`mean (v1, v2)` of the seeds' values; — where none."""
    shown = [v for v in values if v is not None]
    if not shown:
        return "—"
    each = ", ".join(format(v, spec) for v in values if v is not None)
    mean = format(statistics.fmean(shown), spec)
    return f"{mean}{suffix} ({each})" if len(shown) > 1 else f"{mean}{suffix}"


def results(rows: dict[str, dict[int, dict]], teacher: dict, teacher_probe: dict) -> tuple[str, dict]:
    """The side-by-side table (markdown) and its data: per schedule the mean over seeds and each seed's values."""
    header = (
        "| schedule | loss | seeds | train wall s | final valid loss | PER (probe) | SID acc (probe) | "
        "speed-up, equal steps | speed-up, equal valid loss |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    base_loss = next((by_seed[s]["loss"] for name, by_seed in rows.items() if name == BASELINE for s in by_seed), None)
    lines, data = [], {}
    for name, by_seed in rows.items():
        seeds = sorted(by_seed)
        col = {k: [by_seed[s].get(k) for s in seeds] for k in next(iter(by_seed.values()))}
        loss = by_seed[seeds[0]]["loss"]
        data[name] = {"seeds": seeds, "loss": loss}
        data[name].update({k: {"mean": _mean(v), "each": v} for k, v in col.items() if k != "loss"})
        # NOTE: valid losses of different loss kinds are different quantities: no speed-up at equal valid loss
        equal_loss = _cell(col["speedup_equal_loss"], ".2f", "x") if loss == base_loss else "— (another loss)"
        lines.append(
            f"| {name} | {loss} | {', '.join(map(str, seeds))} | {_cell(col['wall_s'], '.0f')} | "
            f"{_cell(col['valid_loss'], '.4f')} | {_cell(col['per'], '.3f')} | {_cell(col['sid'], '.3f')} | "
            f"{_cell(col['speedup_equal_steps'], '.2f', 'x')} | {equal_loss} |"
        )
    pr, sid = teacher_probe.get("pr", {}), teacher_probe.get("sid", {})
    teacher_line = (
        f"\nTeacher (12 x 96, trained here): PER of its own CTC head {teacher.get('per', float('nan')):.3f}, "
        f"CKA(hidden 4, hidden 12) {teacher.get('cka_4_12', float('nan')):.3f}; probe PER "
        f"{pr.get('per', float('nan')):.3f} (label-blind {pr.get('chance_per', float('nan')):.3f}), probe SID "
        f"{sid.get('accuracy', float('nan')):.3f} (chance {sid.get('chance', float('nan')):.3f}).\n"
    )
    return header + "\n".join(lines) + "\n" + teacher_line, data


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/paper_cpu", help="one run directory per run")
    parser.add_argument("--data", type=Path, default=ROOT / "data/paper_cpu", help="corpus, shards, teacher")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/paper_cpu", help="where the results go")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every schedule")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak LR (the recipes' 5e-4 is for 330k steps)")
    parser.add_argument("--eval-every", type=int, default=50, help="validation + CKA interval (steps)")
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="run.seed of each repetition")
    parser.add_argument("--only", nargs="*", choices=list(SCHEDULES), default=list(SCHEDULES))
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny corpus and teacher, 8 steps")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.eval_every = 8, 4

    t0 = time.time()
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    data = args.data / "tiny" if args.tiny else args.data  # a smoke run never reuses the real run's data
    corpus, shards = make_data(data, args.tiny, log=say)
    teacher_dir = data / "teacher"
    teacher = make_teacher(corpus, teacher_dir, args.tiny, log=say)
    # What the teacher is: its settings, its corpus and when it was trained (a retrained teacher is another one).
    made_by = {k: teacher.get(k) for k in ("settings", "corpus_sha256", "train_seconds")}
    teacher_probe = probe(teacher_dir, shards, teacher_dir / "probe", args.tiny, made_by)
    say(
        f"data: {shards} | teacher {teacher_dir} | {args.steps} steps per run on {args.nproc} rank(s), "
        f"seeds {args.seeds}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[int, dict]] = {name: {} for name in args.only}
    from istack_ds.commands import compare as compare_runs

    for seed in args.seeds:
        run_dirs = []
        for name in args.only:
            recipe = SCHEDULES[name][0]
            run_dir = args.out / f"seed{seed}" / name
            run_dirs.append(run_dir)
            settings = {
                "steps": args.steps,
                "lr": args.lr,
                "eval_every": args.eval_every,
                "nproc": args.nproc,
                "tiny": args.tiny,
                "recipe": recipe,
                "sets": SCHEDULES[name][1],
                "student": STUDENT,
                "global_batch": GLOBAL_BATCH,
                "teacher": made_by,
            }
            if finished(run_dir, settings) and not args.force:
                say(f"{name} seed {seed}: finished earlier, reused ({run_dir})")
            else:
                shutil.rmtree(run_dir, ignore_errors=True)  # fresh: wall times of resumed runs are not comparable
                run_dir.mkdir(parents=True)
                sets = overrides(name, seed, run_dir, teacher_dir, shards, args)
                seconds = run_one(name, recipe, sets, args.nproc, run_dir / "train.log")
                (run_dir / "experiment.json").write_text(json.dumps(settings, indent=1))
                shutil.rmtree(run_dir / "probe", ignore_errors=True)
                say(f"{name} seed {seed}: {args.steps} steps in {seconds:.0f} s (process)")
            report = probe(run_dir / "student", shards, run_dir / "probe", args.tiny, settings)
            summary = json.loads((run_dir / "summary.json").read_text())
            rows[name][seed] = {
                "loss": yaml.safe_load((run_dir / "config.yaml").read_text())["loss"]["kind"],
                "wall_s": summary["wall_s"],
                "per": report["pr"]["per"],
                "sid": report["sid"]["accuracy"],
            }
            say(f"{name} seed {seed}: PER {report['pr']['per']:.3f}, SID {report['sid']['accuracy']:.3f}")
        baseline = [d for d in run_dirs if d.name == BASELINE]
        seed_docs = args.docs / f"seed{seed}"
        against = ["--baseline", str(baseline[0])] if baseline else []
        compare_runs.main([*map(str, run_dirs), "--out", str(seed_docs), *against])
        for row in json.loads((seed_docs / "comparison.json").read_text()):
            name = Path(row["path"]).name
            rows[name][seed].update(
                valid_loss=row.get("final_valid_loss"),
                speedup_equal_steps=row.get("speedup_equal_steps"),
                speedup_equal_loss=row.get("speedup_equal_loss"),
            )

    table, data = results(rows, teacher, teacher_probe)
    args.docs.mkdir(parents=True, exist_ok=True)
    for name in ("layer_cka.png", "teacher_report.json"):
        if (teacher_dir / name).is_file():
            shutil.copy(teacher_dir / name, args.docs / f"teacher_{name}")
    for name in ("probe.json", "probe_layers.png"):
        if (teacher_dir / "probe" / name).is_file():
            shutil.copy(teacher_dir / "probe" / name, args.docs / f"teacher_{name}")
    wall = time.time() - t0
    (args.docs / "results.md").write_text(table)
    (args.docs / "results.json").write_text(
        json.dumps({"schedules": data, "teacher": teacher, "teacher_probe": teacher_probe, "wall_s": wall}, indent=1)
    )
    print(table)
    print(f"experiment done in {wall:.0f} s: runs in {args.out}, results in {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
