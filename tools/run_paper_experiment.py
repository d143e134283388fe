"""The paper's two claims decided at CPU scale: interleaved stacking reaches full depth's quality faster (1.24x EQL,
1.16x PROP-1 in the paper), and standard stacking (GradStack, MIDAS) is as fast but loses quality.

Usage (every part cached by what made it; a rerun reuses what exists, so the experiment runs part by part):
    python tools/run_paper_experiment.py --part data teacher cost         # corpus, teacher, step cost by depth
    python tools/run_paper_experiment.py --part runs --only full_depth --budgets 1.0 --seeds 1   # the pilot
    python tools/run_paper_experiment.py --part runs --only interleaved_eql --seeds 1 2 3
    python tools/run_paper_experiment.py --part runs --steps 12800 --only full_depth --part-minutes 55  # in parts:
                                                                          # the same command while it exits 75
    python tools/run_paper_experiment.py --part probes report             # probe what exists; write docs/
    python tools/run_paper_experiment.py --tiny                           # the whole path in ~2 min (smoke)

The design (what each choice is for; the results: docs/paper_cpu/T<steps>/results.md, one row per T in
docs/paper_cpu/trend.md, the pilot in docs/paper_cpu/pilot.md):

1. Data: the labelled espeak-ng corpus (istack_ds/evidence/speech_corpus.py), 20 speakers x 80 sentences, the
   last 4 speakers held out (`valid`: ~5k phonemes, the PR probe's test set and the held-out loss).
2. Teacher: a 12 x 96 HuBERT trained here for 1000 steps (istack_ds/evidence/teacher_training.py), online (its
   forward runs in every student step, as in the paper).
3. Regime: the student is half the teacher's width (12 x 48, FFN 192), on the teacher's CNN output
   (`student.frontend: shared`), one rank, 8 utterances a step, fp32, ZeRO 2, one thread, so that the student's
   layers are a large share of a step (`--part cost` measures c(d), the seconds of a step at each depth, side by
   side, and prints the share and each schedule's ideal speed-up). Full depth is also run with a trainable front
   end (the paper's own baseline).
4. Methods: each arm is a shipped recipe (configs/paper_*.yaml) with its method unchanged (operator, stages
   3 -> 6 -> 9 -> 12, alpha, loss and targets 4/8/12, carry, pick, optimizer-state copy, warmup + linear decay,
   weight decay 1e-4), scaled only through --set: the shape above, `--steps` T (the aim, full depth's held-out
   loss falling < 5 % over its last third, is out of this machine's reach: pilot.md), the peak LR `--lr` and the
   recipe's 7 % warmup of T.
   GradStack and MIDAS run with their recipe's `output_heads` loss and with `l2l`, so the operator is seen apart
   from the loss.
5. Time: a run's time is its steps at each depth costed at c(d), plus its measured growth pauses (the runs may
   share the machine; their own wall times are kept beside, unused). Full depth at budgets 0.5T, 0.75T, T (each its
   own LR schedule) is the reference curve of held-out loss against time; a method's speed-up at equal quality
   is the time full depth needs to reach the method's final held-out loss over the method's time (paired by
   seed; mean and 95 % t interval over seeds). The equal-step speed-up and the ideal one stand beside it.
6. Quality: the held-out loss over all held-out frames (same formula for l2l and output_heads), and each target's
   MSE; probes (PR: phoneme error rate on the 4 held-out speakers; SID: 16 training speakers, 20 % of each one's
   sentences held out) with 95 % bootstrap intervals over test utterances, and their floors (an untrained student,
   the teacher's hidden state 0 alone, the teacher).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools" / "bench"))
sys.path.insert(0, str(ROOT / "tools"))

from paper_report import BASELINE, analyse, plot, pooled_probe, probe_intervals, probe_items, table, to_json, trend  # noqa: E402

#: arm -> (recipe under configs/, its own --set on top of the common ones).
ARMS: dict[str, tuple[str, dict]] = {
    "full_depth": ("paper_full_depth.yaml", {}),
    "interleaved_eql": ("paper_interleaved_eql.yaml", {}),
    "interleaved_prop1": ("paper_interleaved_prop1.yaml", {}),
    "gradstack_eql": ("paper_gradstack_eql.yaml", {}),
    "midas_eql": ("paper_midas_eql.yaml", {}),
    "gradstack_eql_l2l": ("paper_gradstack_eql.yaml", {"loss.kind": "l2l"}),
    "midas_eql_l2l": ("paper_midas_eql.yaml", {"loss.kind": "l2l"}),
    "full_depth_trainable": ("paper_full_depth.yaml", {"student.frontend": "trainable"}),
}
#: the seeds an arm gets unless --seeds says otherwise (the issue's power: 3 where a verdict rests on it)
SEEDS = {"full_depth": [1, 2, 3], "interleaved_eql": [1, 2, 3], "gradstack_eql": [1, 2, 3], "midas_eql": [1, 2, 3]}
OTHER_SEEDS = [1, 2]
BUDGETS = [0.5, 0.75, 1.0]  # full depth's budgets, fractions of T (the reference curve)
STUDENT = {"hidden_size": 48, "intermediate_size": 192, "num_attention_heads": 4, "frontend": "shared"}
GLOBAL_BATCH = 8
CORPUS = {"speakers": 20, "utterances": 80}
HELD_OUT_SPEAKERS = 4
TEACHER_STEPS = 1000
COST_DEPTHS = [3, 6, 9, 12]
#: the peak LR of the experiment's first regime; another --lr is another regime, whose runs and results go to an
#: lr<value>/ folder under --out and --docs (the step cost, which no LR changes, is --docs' own)
LR = 2e-3
#: the exit of a call whose runs were not all done (a run stopped at --part-minutes): EX_TEMPFAIL, "try again"
RAN_OUT = 75


def say(msg: str) -> None:
    print(msg, flush=True)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---- data and teacher -----------------------------------------------------------


def make_data(data: Path, tiny: bool) -> tuple[Path, Path]:
    """The labelled corpus (lhotse manifests) and its shards; both reused while the corpus is the one they were
    made from."""
    from istack_ds.data.writer import shard_corpus
    from istack_ds.evidence.speech_corpus import SpeechCorpusSettings, make_speech_corpus
    from istack_ds.evidence.teacher_data import corpus_digest

    settings = SpeechCorpusSettings(speakers=4, utterances=8) if tiny else SpeechCorpusSettings(**CORPUS)
    corpus = data / "corpus"
    make_speech_corpus(corpus, settings, log=say)
    shards, stamp = data / "shards", {"corpus_sha256": corpus_digest(corpus), "held_out": held_out(tiny)}
    made_from = shards / "experiment.json"
    if not made_from.is_file() or json.loads(made_from.read_text()) != stamp:
        shutil.rmtree(shards, ignore_errors=True)
        shard_corpus(
            corpus,
            shards,
            corpus="lhotse_manifest",
            min_seconds=0.3,
            shard_mb=0.5 if tiny else 2.0,
            min_shards=8,
            valid_speakers=held_out(tiny),
            log=lambda *_: None,
            progress_stream=io.StringIO(),
        )
        made_from.write_text(json.dumps(stamp))
    return corpus, shards


def held_out(tiny: bool) -> int:
    return 1 if tiny else HELD_OUT_SPEAKERS


def make_teacher(corpus: Path, out: Path, tiny: bool) -> dict:
    """Trains (or reuses) the teacher; returns its report (PER, CKA, speaker probe by layer, wall time)."""
    from istack_ds.evidence.teacher_training import TeacherTrainingSettings, train_teacher

    if tiny:
        settings = TeacherTrainingSettings(steps=6, held_out_speakers=1, probe_sentences=2)
    else:
        settings = TeacherTrainingSettings(steps=TEACHER_STEPS, held_out_speakers=HELD_OUT_SPEAKERS)
    return train_teacher(corpus, out, settings, log=say)


# ---- runs --------------------------------------------------------------------------


def common_sets(teacher: Path, args) -> dict:
    """The --set every arm shares: the regime (shape, batch, precision, steps, LR), no I/O beyond the run's own."""
    return {
        "teacher.path": str(teacher),
        "teacher.dtype": "fp32",
        "data.global_batch": GLOBAL_BATCH,
        "data.batch_unit": "utterances",
        "data.max_micro_batch": GLOBAL_BATCH,
        "data.crop_seconds": 6.0,
        "data.batch_seconds": 48.0,
        "data.long_cuts": "crop",
        # NOTE: an utterance batch is drawn within a group of `interleave_shards` shards and one bucket; a group's
        # remainder is left out (counted): one bucket and groups of ~100 utterances leave out < 8 %
        "data.num_buckets": 1,
        "data.num_workers": 1,
        "data.shuffle_buffer": 200,
        "data.interleave_shards": 4,
        **{f"student.{k}": v for k, v in STUDENT.items()},
        "student.dropout": 0.0,
        "optim.epochs": "null",
        "optim.lr": args.lr,
        "deepspeed.precision": "fp32",
        "deepspeed.zero_stage": 2,
        "checkpoint.every": 0,
        "checkpoint.keep": 1,
        "checkpoint.resume": "none",
    }


def run_sets(arm: str, budget: float, seed: int, run_dir: Path, teacher: Path, shards: Path, args) -> dict:
    steps = max(1, round(budget * args.steps))
    every = max(1, args.steps // 8)
    return {
        **common_sets(teacher, args),
        "run.name": run_dir.name,
        "run.out_dir": str(run_dir),
        "run.seed": seed,
        "data.train_index": str(shards / "train/index.json"),
        "data.valid_index": str(shards / "valid/index.json"),
        "optim.total_steps": steps,
        "log.every": max(1, every // 4),
        "eval.every": every,
        "eval.max_batches": 1000,  # every held-out utterance, every time
        **ARMS[arm][1],
    }


def run_dir_of(out: Path, steps: int, arm: str, budget: float, seed: int) -> Path:
    """OUT/T<steps>/seed<seed>/<arm>[@<budget>]: runs of another T (a pilot's) never overwrite these."""
    name = arm if budget == 1.0 else f"{arm}@{budget:g}"
    return out / f"T{steps}" / f"seed{seed}" / name


#: what may differ between two runs of one regime: their place, seed, length and logging cadence
REGIME_FREE = ("run.name", "run.out_dir", "run.seed", "optim.total_steps", "log.every", "eval.every")


def regime(stamp: dict) -> str:
    """The digest of what made a run, less REGIME_FREE: full depth's runs of one regime at any T are points of one
    reference curve."""
    return digest({**stamp, "sets": {k: v for k, v in stamp["sets"].items() if k not in REGIME_FREE}})


def finished(run_dir: Path, stamp: dict) -> bool:
    made = run_dir / "experiment.json"
    return (run_dir / "summary.json").is_file() and made.is_file() and json.loads(made.read_text()) == stamp


def train(arm: str, sets: dict, run_dir: Path, nproc: int, deadline: float | None = None) -> int | None:
    """One run of `arm` on `nproc` gloo ranks, one thread each (continued from its checkpoint when `sets` say
    checkpoint.resume=auto); its wall seconds are added to the run's parts.json. Returns None when the run finished,
    or the step it stopped at: when `deadline` (a time.time()) came first, the ranks get SIGUSR1 once the run trained
    a step here, and every rank saves a checkpoint at the next step and exits 7 (istack_ds.preemption)."""
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(ROOT / "launchers/train.py"), "--config", str(ROOT / "configs" / ARMS[arm][0])]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    log_file, parts = run_dir / "train.log", run_dir / "parts.json"
    offset = log_file.stat().st_size if log_file.is_file() else 0
    start, signalled = time.time(), False
    with open(log_file, "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if deadline is None or signalled or time.time() < deadline or not _part_of(log_file, offset, STEP):
                    continue
                # NOTE: the ranks, not torchrun: torchrun ends its ranks 30 s after its own SIGTERM (a stop's step,
                # evaluation and save may take longer) and fails a run whose last step was done. Not before a
                # step: a rank in its start may have no handler yet. A rank past its last step ends as it would.
                for child in psutil.Process(proc.pid).children():
                    if str(ROOT / "launchers/train.py") in child.cmdline():
                        child.send_signal(signal.SIGUSR1)
                signalled = True
        finally:
            if proc.poll() is None:  # this tool stopped (an error, Ctrl-C): no run goes on unwatched
                proc.terminate()
                proc.wait()
            walls = json.loads(parts.read_text()) if parts.is_file() else []
            parts.write_text(json.dumps([*walls, round(time.time() - start, 1)]))
    stopped = STOPPED.search(_part_of(log_file, offset, STOPPED) or "")
    if proc.returncode == 0:
        return None
    if stopped:  # by this tool's deadline or by a signal from outside: the same command continues
        return int(stopped.group(1))
    tail = log_file.read_text(errors="replace")[-4000:]
    raise SystemExit(f"run {run_dir} failed (rc={proc.returncode}); log {log_file}:\n{tail}")


#: a rank's progress line, and its line once a stop's checkpoint is saved (istack_ds.preemption)
STEP = re.compile(r"\] step \d+/")
STOPPED = re.compile(r"stopped by SIG\w+ on rank \d+(?:, SIG\w+ on rank \d+)* at step (\d+): checkpoint")


def _part_of(log_file: Path, offset: int, pattern: re.Pattern) -> str | None:
    """The log written since `offset` when `pattern` is in it."""
    with open(log_file, errors="replace") as f:
        f.seek(offset)
        text = f.read()
    return text if pattern.search(text) else None


def resumable(run_dir: Path, stamp: dict, nproc: int) -> Path | None:
    """The checkpoint a run stopped by an earlier call goes on from: its newest complete, not diverged one, when
    the run was started from the same stamp."""
    from istack_ds.checkpoint import Checkpointer

    started = run_dir / "started.json"
    if not started.is_file() or json.loads(started.read_text()) != stamp:
        return None
    good, _ = Checkpointer(run_dir / "checkpoints", 1).candidates(nproc, content=False, first=True)
    return good[0] if good else None


def run_arms(plan: list[tuple[str, float, int]], teacher: Path, teacher_made: dict, shards: Path, args) -> bool:
    """The planned runs, each continued from where an earlier call stopped it; False when a run was stopped (at
    --part-minutes, or by a signal): it keeps its checkpoint, and the same command goes on from it."""
    deadline = None if args.part_minutes is None else time.time() + 60 * args.part_minutes
    trained = False
    for arm, budget, seed in plan:
        run_dir = run_dir_of(args.out, args.steps, arm, budget, seed)
        sets = run_sets(arm, budget, seed, run_dir, teacher, shards, args)
        stamp = {"recipe": ARMS[arm][0], "sets": sets, "teacher": teacher_made, "nproc": args.nproc}
        name = run_dir.relative_to(args.out)
        if finished(run_dir, stamp) and not args.force:
            say(f"{name}: finished earlier, reused")
            continue
        if deadline is not None and time.time() > deadline and trained:  # a call trains at least one part
            return False
        trained = True
        saved = None if args.force else resumable(run_dir, stamp, args.nproc)
        if saved is None:
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            (run_dir / "started.json").write_text(json.dumps(stamp, indent=1))
            say(f"{name}: {sets['optim.total_steps']} steps ...")
        else:  # the stamp holds what made the run; where it goes on from is no part of it
            sets = {**sets, "checkpoint.resume": "auto"}
            say(f"{name}: continued from {saved.name} of {sets['optim.total_steps']} steps ...")
        stopped_at = train(arm, sets, run_dir, args.nproc, deadline)
        if stopped_at is not None:
            say(f"{name}: stopped at step {stopped_at}, its checkpoint saved")
            return False
        (run_dir / "experiment.json").write_text(json.dumps(stamp, indent=1))
        say(f"{name}: done in {wall_s(run_dir):.0f} s wall")
    return True


# ---- step cost by depth ---------------------------------------------------------


def measure_costs(teacher: Path, shards: Path, out: Path, args) -> dict:
    """c(d): median seconds of one optimizer step at each depth (shared front end) and of the trainable front end
    at full depth, the real Trainer on one rank and one thread, stepped round-robin (noise hits all alike), on
    batches of GLOBAL_BATCH utterances of the corpus's median length."""
    import benchlib
    import torch

    from istack_ds.data.index import read_index

    index = read_index(shards / "train/index.json")
    counts, width = index.duration_histogram, index.bin_seconds
    half, seen, median = sum(counts) / 2, 0, width
    for i, c in enumerate(counts):
        seen += c
        if seen >= half:
            median = (i + 0.5) * width
            break
    torch.set_num_threads(1)
    benchlib.init_single_process()
    batches = benchlib.fixed_batches(4, GLOBAL_BATCH, median, seed=0)
    base = {**common_sets(teacher, args), "data.train_index": str(benchlib.bench_shards())}
    base.update({"data.valid_index": "null", "data.num_workers": 0, "log.tensorboard": "false", "eval.every": 0})
    base.update({"log.every": 10**6, "optim.total_steps": 10**4, "growth.operator": "none"})
    kinds = {f"shared@{d}": {"growth.depths": f"[{d}]"} for d in COST_DEPTHS}
    kinds["trainable@12"] = {"growth.depths": "[12]", "student.frontend": "trainable"}
    trainers, times = {}, {k: [] for k in kinds}
    for kind, extra in kinds.items():
        sets = {**base, **extra, "run.out_dir": str(out / "cost" / kind.replace("@", "_"))}
        trainers[kind] = benchlib.make_trainer([f"{k}={v}" for k, v in sets.items()], batches)
    for i in range(args.cost_steps + 2):
        for kind, trainer in trainers.items():
            t0 = time.process_time()
            trainer.train_step()
            if i >= 2:  # the first steps allocate
                times[kind].append(time.process_time() - t0)
    for trainer in trainers.values():
        benchlib.close_trainer(trainer)
    torch.distributed.destroy_process_group()  # the caller's process goes on (the smoke test's pytest)
    costs = {kind: statistics.median(t) for kind, t in times.items()}
    return {"seconds_per_step": costs, "utterance_seconds": median, "steps": args.cost_steps, "clock": "process CPU"}


# ---- what the runs show ---------------------------------------------------------


def wall_s(run_dir: Path) -> float:
    """A run's own wall seconds: its trainer's, or for a run made in parts, each part's process (start included)."""
    parts = run_dir / "parts.json"
    if parts.is_file() and len(json.loads(parts.read_text())) > 1:
        return sum(json.loads(parts.read_text()))
    return json.loads((run_dir / "summary.json").read_text())["wall_s"]


def read_result(run_dir: Path, costs: dict) -> dict:
    """One finished run: its final held-out losses, its curve, its costed and its own wall time."""
    import yaml

    from istack_ds.config import Config
    from istack_ds.evidence.claims import costed_time, stage_steps
    from istack_ds.evidence.compare import read_run
    from istack_ds.growth.schedule import Schedule

    cfg = Config.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    stamp = json.loads((run_dir / "experiment.json").read_text())
    run = read_run(run_dir)
    total = cfg.optim.total_steps
    schedule = Schedule.from_config(cfg.growth, total)
    prefix = "shared" if cfg.student.frontend == "shared" else "trainable"
    by_depth = {int(k.split("@")[1]): v for k, v in costs.items() if k.startswith(prefix + "@")}
    pauses = sum(v for _, _, v in run.get("growth/pause_s"))
    final = {tag.split("/")[1]: run.get(tag)[-1][2] for tag in run.series if tag.startswith("valid/")}
    probed = run_dir / "probe"
    if (probed / "probe.json").is_file() and json.loads((probed / "experiment.json").read_text()) == stamp:
        final_probe = probe_items(json.loads((probed / "probe.json").read_text()))
    else:
        final_probe = None
    return {
        "arm": run_dir.name.split("@")[0],
        "seed": cfg.run.seed,
        "regime": regime(stamp),
        "steps": total,
        "loss_kind": cfg.loss.kind,
        "frontend": cfg.student.frontend,
        "time_s": costed_time(stage_steps(schedule.depths, schedule.boundaries, total), by_depth, pauses),
        "pauses_s": pauses,
        "wall_s": wall_s(run_dir),
        "valid": final,
        "curve": [(s, v) for s, _, v in run.get("valid/loss")],
        "probe": final_probe,
    }


def probe(model, shards: Path, out: Path, made_from: dict, tiny: bool) -> dict:
    """`istack probe` of one model (a directory or a hidden-state function), reused when made from the same."""
    report_file, stamp = out / "probe.json", out / "experiment.json"
    if report_file.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == made_from:
        return json.loads(report_file.read_text())
    shutil.rmtree(out, ignore_errors=True)
    from istack_ds.evidence.probe import run_probes

    report = run_probes(
        model,
        shards / "train" / "index.json",
        valid_index=shards / "valid" / "index.json",
        steps=20 if tiny else 400,
        seed=0,
        out=out,
        log=lambda *_: None,
    )
    stamp.write_text(json.dumps(made_from))
    return report


def probe_floors(teacher: Path, shards: Path, out: Path, teacher_made: dict, tiny: bool, args) -> dict:
    """The probes of the teacher, of its hidden state 0 alone, and of an untrained student (the arm's
    initial weights: one step at a learning rate of 1e-12)."""
    from istack_ds.evidence.probe_data import FrozenModel

    frozen = FrozenModel(teacher)

    def teacher_hidden_state_0(audio):
        return frozen(audio)[:1]

    teacher_hidden_state_0.sample_rate = frozen.sample_rate  # type: ignore[attr-defined]
    untrained = out / "floors" / "untrained_student"
    sets = {**run_sets(BASELINE, 1.0, 1, untrained, teacher, shards, args), "optim.total_steps": 1, "optim.lr": 1e-12}
    sets.update({"eval.every": 0, "log.every": 1})
    stamp = {"recipe": ARMS[BASELINE][0], "sets": sets, "teacher": teacher_made, "nproc": 1}
    if not finished(untrained, stamp):
        shutil.rmtree(untrained, ignore_errors=True)
        untrained.mkdir(parents=True)
        train(BASELINE, sets, untrained, 1)  # one step: no deadline
        (untrained / "experiment.json").write_text(json.dumps(stamp, indent=1))
    return {
        "teacher": probe(teacher, shards, out / "floors" / "teacher_probe", teacher_made, tiny),
        "teacher_hidden_state_0": probe(
            teacher_hidden_state_0, shards, out / "floors" / "hidden0_probe", teacher_made, tiny
        ),
        "untrained_student": probe(untrained / "student", shards, untrained / "probe", stamp, tiny),
    }


# ---- main ---------------------------------------------------------------------------

PARTS = ["data", "teacher", "cost", "runs", "probes", "report"]


def plan_runs(args) -> list[tuple[str, float, int]]:
    plan = []
    for arm in args.only:
        seeds = args.seeds or SEEDS.get(arm, OTHER_SEEDS)
        budgets = (args.budgets or BUDGETS) if arm == BASELINE else [1.0]
        plan += [(arm, b, s) for s in seeds for b in budgets]
    return plan


def collect(args, costs: dict) -> dict:
    """(arm, budget, seed) -> result: the planned runs of this T, each read from its run directory, else from a
    results.json an earlier report wrote (run directories are not kept in git); and full depth's runs of every other
    T in the same regime, at their budget in this T's units: more points on the reference curve.

    A run is known by its arm, steps and seed: two of these are the same run whatever T's directory holds them."""
    saved = {}
    for made in args.docs.glob("T*/results.json"):
        for r in json.loads(made.read_text())["runs"].values():
            if "regime" in r:  # a report written before results kept what made them is read from its runs only
                saved[(r["arm"], r["steps"], r["seed"])] = r
    for made in args.out.glob("T*/seed*/*/experiment.json"):
        r = read_result(made.parent, costs)
        saved[(r["arm"], r["steps"], r["seed"])] = r
    results = {}
    for arm, budget, seed in plan_runs(args):
        r = saved.get((arm, max(1, round(budget * args.steps)), seed))
        if r is not None:
            results[(arm, budget, seed)] = r
    regimes = {r["regime"] for (arm, _, _), r in results.items() if arm == BASELINE}
    for (arm, steps, seed), r in sorted(saved.items()):
        if arm == BASELINE and r["regime"] in regimes and seed in (args.seeds or SEEDS[BASELINE]):
            results.setdefault((arm, steps / args.steps, seed), r)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=PARTS, default=PARTS, help="what to do (default: all, in order)")
    parser.add_argument("--out", type=Path, default=None, help="one run directory per run (runs/paper_cpu)")
    parser.add_argument("--data", type=Path, default=ROOT / "data/paper_cpu", help="corpus, shards, teacher")
    parser.add_argument("--docs", type=Path, default=None, help="where the results go (docs/paper_cpu)")
    parser.add_argument("--steps", type=int, default=None, help="T: the optimizer steps of a full run (1600; tiny 8)")
    parser.add_argument("--lr", type=float, default=LR, help="peak LR (7 %% warmup of the run's steps)")
    parser.add_argument("--nproc", type=int, default=1, help="gloo ranks per run")
    parser.add_argument("--cost-steps", type=int, default=12, help="timed steps per depth in --part cost")
    parser.add_argument("--only", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run.seed of each repetition")
    parser.add_argument("--budgets", type=float, nargs="+", default=None, help="full depth's budgets (x T)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny corpus and teacher, 8 steps, 1 seed")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument(
        "--part-minutes",
        type=float,
        default=None,
        help="end the call's runs within about this many minutes (the run under way saves a checkpoint at a step; "
        f"the same command continues it; exit {RAN_OUT} until every run is done): a long T in parts",
    )
    args = parser.parse_args(argv)
    if args.force and args.part_minutes is not None:
        parser.error("--force starts every run anew, so a run in parts would never end: leave out one of them")
    # a smoke run never reuses or overwrites the real experiment's runs and results
    args.out = args.out or ROOT / ("runs/paper_cpu/tiny" if args.tiny else "runs/paper_cpu")
    args.docs = args.docs or (args.out / "docs" if args.tiny else ROOT / "docs/paper_cpu")
    if args.tiny:
        args.cost_steps = 2
        args.steps = 8 if args.steps is None else args.steps
        args.seeds = args.seeds or [1]
        args.budgets = args.budgets or [0.5, 1.0]
    args.steps = 1600 if args.steps is None else args.steps

    t0 = time.time()
    data = args.data / "tiny" if args.tiny else args.data  # a smoke run never reuses the real run's data
    teacher_dir = data / "teacher"
    if {"data", "teacher"} & set(args.part):
        corpus, shards = make_data(data, args.tiny)
        teacher = make_teacher(corpus, teacher_dir, args.tiny)
    else:  # read only: parts run side by side (two lanes of runs) must not rewrite the corpus under each other
        shards = data / "shards"
        if not (shards / "experiment.json").is_file() or not (teacher_dir / "teacher_report.json").is_file():
            raise SystemExit(f"no corpus shards or teacher under {data}: run --part data teacher first")
        teacher = json.loads((teacher_dir / "teacher_report.json").read_text())
    teacher_made = {k: teacher.get(k) for k in ("settings", "corpus_sha256", "train_seconds")}
    args.out.mkdir(parents=True, exist_ok=True)
    args.docs.mkdir(parents=True, exist_ok=True)
    cost_file = args.docs / "step_cost.json"
    sets = {k: v for k, v in common_sets(teacher_dir, args).items() if k != "optim.lr"}
    cost_stamp = {"sets": sets, "teacher": teacher_made, "steps": args.cost_steps}
    if "cost" in args.part:
        old = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
        if old.get("made_from") != cost_stamp or args.force:
            costs = measure_costs(teacher_dir, shards, args.out, args)
            cost_file.write_text(json.dumps({**costs, "made_from": cost_stamp}, indent=1))
        costs = json.loads(cost_file.read_text())
        from istack_ds.evidence.claims import layer_share

        share = layer_share({int(k[7:]): v for k, v in costs["seconds_per_step"].items() if k.startswith("shared@")})
        say(f"step cost (process CPU s): {costs['seconds_per_step']}; layers' share of a full-depth step {share:.0%}")
    docs_root = args.docs  # what no LR changes: the step cost, the teacher's report
    if args.lr != LR:  # another regime
        args.out, args.docs = args.out / f"lr{args.lr!r}", args.docs / f"lr{args.lr!r}"
    if "runs" in args.part:
        if not run_arms(plan_runs(args), teacher_dir, teacher_made, shards, args):
            say(f"a run was stopped (--part-minutes {args.part_minutes}): the same command continues it")
            return RAN_OUT
    if not {"probes", "report"} & set(args.part):
        say(f"done in {time.time() - t0:.0f} s")
        return 0
    costs = json.loads(cost_file.read_text())
    from istack_ds.config import load_config

    results = collect(args, costs["seconds_per_step"])
    arm_cfgs = {
        arm: load_config(ROOT / "configs" / ARMS[arm][0], [f"{k}={v}" for k, v in ARMS[arm][1].items()])
        for arm in args.only
    }
    saved_file = args.docs / f"T{args.steps}" / "results.json"
    floor_items = json.loads(saved_file.read_text()).get("floor_items", {}) if saved_file.is_file() else {}
    if "probes" in args.part:
        floors_out = args.out / f"T{args.steps}"
        made = probe_floors(teacher_dir, shards, floors_out, teacher_made, args.tiny, args)
        floor_items = {k: probe_items(v) for k, v in made.items()}
        for (arm, budget, seed), r in sorted(results.items()):
            run_dir = run_dir_of(args.out, args.steps, arm, budget, seed)
            if budget == 1.0 and r.get("probe") is None and (run_dir / "student").is_dir():
                made_from = json.loads((run_dir / "experiment.json").read_text())
                r["probe"] = probe_items(probe(run_dir / "student", shards, run_dir / "probe", made_from, args.tiny))
    floors = {k: probe_intervals(v) for k, v in floor_items.items()}
    probes = {}
    for arm in ARMS:
        items = [r["probe"] for (a, b, _), r in sorted(results.items()) if a == arm and b == 1.0 and r.get("probe")]
        if items:
            probes[arm] = probe_intervals(pooled_probe(items))
    analysis = analyse(results, costs, probes, floors, arm_cfgs)
    text = table(analysis, costs)
    docs = args.docs / f"T{args.steps}"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.md").write_text(text)
    runs = {f"{a}@{b:g}/seed{s}": r for (a, b, s), r in results.items()}
    (docs / "results.json").write_text(
        json.dumps(
            {"analysis": analysis, "runs": runs, "floor_items": floor_items, "teacher": teacher, "step_cost": costs},
            indent=1,
            default=to_json,
        )
    )
    plot(results, arm_cfgs, docs / "quality_vs_time.png")
    (args.docs / "trend.md").write_text(
        "# The verdicts as T grows\n\nEach row: `--part report --steps T` (cells as in T<steps>/results.md; a gap is "
        "the relative held-out loss gap to interleaved EQL at equal steps).\n\n" + trend(args.docs)
    )
    for name in ("layer_cka.png", "teacher_report.json"):
        if (teacher_dir / name).is_file():
            shutil.copy(teacher_dir / name, docs_root / f"teacher_{name}")
    say(text)
    say(f"experiment part(s) {args.part} done in {time.time() - t0:.0f} s: runs in {args.out}, results in {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
