"""The paper experiment's report (tools/run_paper_experiment.py --part report): from each run's result (final
held-out losses, curve, costed time, probe items) to the table, the verdict on each claim and the figure.

Pure but for the figure: the runs, probes and their caching live in run_paper_experiment.py.
"""

from __future__ import annotations

from pathlib import Path

BASELINE = "full_depth"
#: the paper's speed-ups at equal quality (claim 1)
PAPER = {"interleaved_eql": 1.24, "interleaved_prop1": 1.16}
#: the held-out quality measures: the loss over all frames and each target's MSE
TARGETS = ["loss", "loss_L4", "loss_L8", "loss_L12"]


def ideal(costs: dict, arm_cfg, total: int) -> float:
    """Full depth's costed time over the arm's, at equal steps, no pauses."""
    from istack_ds.evidence.claims import costed_time, stage_steps
    from istack_ds.growth.schedule import Schedule

    shared = {int(k.split("@")[1]): v for k, v in costs.items() if k.startswith("shared@")}
    schedule = Schedule.from_config(arm_cfg.growth, total)
    return total * shared[12] / costed_time(stage_steps(schedule.depths, schedule.boundaries, total), shared)


def probe_items(report: dict) -> dict:
    """What the intervals need of a probe report: each test utterance's phoneme errors and count, each SID test
    utterance's 0/1 (kept with the run's result, so a report needs no run directory)."""
    return {"pr": {"per_utterance": report["pr"]["per_utterance"]}, "sid": {"correct": report["sid"]["correct"]}}


def pooled_probe(items: list[dict]) -> dict:
    """The seeds' probe items of one arm as one report.

    NOTE: every seed scores the same test utterances, so an utterance is one item whatever the seeds: its errors
    summed over the seeds (resampling seeds' rows apart would narrow the interval falsely)."""
    return {
        "pr": {
            "per_utterance": [
                [sum(e for e, _ in rows), sum(n for _, n in rows)]
                for rows in zip(*(r["pr"]["per_utterance"] for r in items))
            ]
        },
        "sid": {"correct": [sum(c) / len(c) for c in zip(*(r["sid"]["correct"] for r in items))]},
    }


def probe_intervals(report: dict) -> dict:
    from istack_ds.evidence.claims import bootstrap_ratio

    per = report["pr"]["per_utterance"]
    correct = report["sid"]["correct"]
    return {
        "per": bootstrap_ratio([e for e, _ in per], [n for _, n in per]),
        "sid": bootstrap_ratio(correct, [1] * len(correct)),
    }


def analyse(results: dict, costs: dict, probes: dict, floors: dict, arm_cfgs: dict) -> dict:
    """Per arm: seeds, costed time, quality (mean and t interval), equal-step, ideal and equal-quality speed-ups;
    per claim: its verdict."""
    from istack_ds.evidence.claims import equal_quality_speedup, last_third_change, layer_share, mean_ci, verdict

    shared = {int(k.split("@")[1]): v for k, v in costs["seconds_per_step"].items() if k.startswith("shared@")}
    reference = {
        (seed, q): [(r["time_s"], r["valid"][q]) for (arm, _, s), r in results.items() if arm == BASELINE and s == seed]
        for (_, _, seed) in results
        for q in TARGETS
    }
    arms: dict = {}
    for arm in arm_cfgs:
        finals = {s: r for (a, b, s), r in sorted(results.items()) if a == arm and b == 1.0}
        if not finals:
            continue
        row: dict = {"seeds": sorted(finals), "loss_kind": next(iter(finals.values()))["loss_kind"]}
        row["time_s"] = mean_ci([r["time_s"] for r in finals.values()])
        row["ideal_equal_steps"] = ideal(costs["seconds_per_step"], arm_cfgs[arm], next(iter(finals.values()))["steps"])
        for q in TARGETS:
            row[q] = mean_ci([r["valid"][q] for r in finals.values()])
        base = {s: results.get((BASELINE, 1.0, s)) for s in finals}
        paired = [s for s in finals if base[s] is not None]
        if paired:
            # costed: the step-cost model's ratio (the ideal plus the growth pauses); wall: the runs' own wall times,
            # noisy where runs share the machine, shown beside it
            row["equal_steps"] = mean_ci([base[s]["time_s"] / finals[s]["time_s"] for s in paired])
            row["equal_steps_wall"] = mean_ci([base[s]["wall_s"] / finals[s]["wall_s"] for s in paired])
        for q in TARGETS:
            each, undecided = [], []
            for s in finals:
                if len(reference.get((s, q), [])) < 2:
                    continue
                try:
                    each.append(equal_quality_speedup(reference[(s, q)], finals[s]["time_s"], finals[s]["valid"][q]))
                except ValueError as e:  # a reference curve that does not fall: this seed says nothing here
                    undecided.append(f"seed {s}: {e}")
            if each:
                row[f"equal_quality_{q}"] = mean_ci([b.value for b in each])
                row[f"bounds_{q}"] = sorted({b.relation for b in each} - {"="})
            if undecided:
                row[f"undecided_{q}"] = undecided
        if arm == BASELINE:
            row["last_third_change"] = [last_third_change(r["curve"]) for r in finals.values()]
        if arm in probes:
            row["probes"] = probes[arm]
        arms[arm] = row
    claims = {}
    for arm, paper in PAPER.items():
        if "equal_quality_loss" in arms.get(arm, {}):
            ci, bounds = arms[arm]["equal_quality_loss"], arms[arm]["bounds_loss"]
            # NOTE: a bound is no point value: an interval over bounds decides nothing
            said = f"not decided (a seed's speed-up is only a bound: {''.join(bounds)})" if bounds else verdict(ci, 1.0)
            # seeds whose reference curve rises said nothing: the verdict rests on the others, and says so
            left_out = arms[arm].get("undecided_loss", [])
            claims[arm] = {"paper": paper, "speedup": ci, "faster_at_equal_quality": said, "seeds_left_out": left_out}
    for arm in ("gradstack_eql", "midas_eql", "gradstack_eql_l2l", "midas_eql_l2l"):
        mine = {s: r for (a, b, s), r in results.items() if a == arm and b == 1.0}
        ref = {s: r for (a, b, s), r in results.items() if a == "interleaved_eql" and b == 1.0}
        gaps = [
            (mine[s]["valid"]["loss"] - ref[s]["valid"]["loss"]) / ref[s]["valid"]["loss"] for s in mine if s in ref
        ]
        if gaps:
            ci = mean_ci(gaps)
            claims[arm] = {"loss_gap_vs_interleaved": ci, "loses_quality": verdict(ci, 0.0)}
    # The project's lever beyond the paper: interleaved EQL on the shared front end against the paper's own
    # baseline, full depth with a trainable front end (paired by seed: time ratio and relative loss gap).
    trainable = {s: r for (a, b, s), r in results.items() if a == "full_depth_trainable" and b == 1.0}
    eql = {s: r for (a, b, s), r in results.items() if a == "interleaved_eql" and b == 1.0}
    both = [s for s in trainable if s in eql]
    if both:
        claims["shared_eql_vs_trainable_full_depth"] = {
            "time_ratio": mean_ci([trainable[s]["time_s"] / eql[s]["time_s"] for s in both]),
            "loss_gap": mean_ci(
                [
                    (eql[s]["valid"]["loss"] - trainable[s]["valid"]["loss"]) / trainable[s]["valid"]["loss"]
                    for s in both
                ]
            ),
        }
    cost = {"runs": len(results), "wall_s": sum(r["wall_s"] for r in results.values())}
    return {"layer_share": layer_share(shared), "arms": arms, "claims": claims, "floors": floors, "cost": cost}


def fmt(ci, spec=".4f", unit="") -> str:
    """`mean [low, high]` of an interval (95 %), with `unit` after each number."""
    if ci is None:
        return "—"
    if ci.n < 2:
        return f"{ci.mean:{spec}}{unit} (1 seed)"
    return f"{ci.mean:{spec}}{unit} [{ci.low:{spec}}{unit}, {ci.high:{spec}}{unit}]"


def table(analysis: dict, costs: dict) -> str:
    arms = analysis["arms"]
    lines = [
        f"Share of a full-depth step in the student's layers: {analysis['layer_share']:.0%} "
        f"(step cost by depth, process CPU s: "
        + ", ".join(f"{k} {v:.3f}" for k, v in costs["seconds_per_step"].items())
        + ").\n",
        "| arm | loss | seeds | time s | ideal, equal steps | equal steps (costed) | equal steps (wall) | "
        "held-out loss | MSE L4 | MSE L8 | MSE L12 | equal quality (loss) | equal quality (L12) | PER | SID |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in arms.items():
        bounds = "".join(r.get("bounds_loss", []))
        probe = r.get("probes", {})
        lines.append(
            f"| {arm} | {r['loss_kind']} | {', '.join(map(str, r['seeds']))} | {r['time_s'].mean:.0f} | "
            f"{r['ideal_equal_steps']:.2f}x | {fmt(r.get('equal_steps'), '.2f', 'x')} | "
            f"{fmt(r.get('equal_steps_wall'), '.2f', 'x')} | {fmt(r['loss'])} | "
            f"{fmt(r['loss_L4'])} | {fmt(r['loss_L8'])} | {fmt(r['loss_L12'])} | "
            f"{bounds}{fmt(r.get('equal_quality_loss'), '.2f', 'x')} | "
            f"{''.join(r.get('bounds_loss_L12', []))}{fmt(r.get('equal_quality_loss_L12'), '.2f', 'x')} | "
            f"{fmt(probe.get('per'), '.3f')} | {fmt(probe.get('sid'), '.3f')} |"
        )
    if "last_third_change" in arms.get(BASELINE, {}):
        change = ", ".join(f"{c:.1%}" for c in arms[BASELINE]["last_third_change"])
        lines.append(
            f"\nConvergence: full depth's held-out loss fell {change} over its last third (per seed; aim < 5 %)."
        )
    floors = analysis["floors"]
    if floors:
        lines.append("\nProbe floors and ceiling (95 % bootstrap over test utterances):")
        for name, f in floors.items():
            lines.append(f"- {name}: PER {fmt(f['per'], '.3f')}, SID {fmt(f['sid'], '.3f')}")
    cost = analysis["cost"]
    lines.append(
        f"\nMachine time: {cost['runs']} runs (full depth's of every T in this regime included), their wall times "
        f"summed {cost['wall_s'] / 3600:.1f} h (one thread a run; runs side by side share the machine's cores)."
    )
    lines.append("\nVerdicts:")
    for arm, c in analysis["claims"].items():
        if "time_ratio" in c:
            lines.append(
                f"- interleaved EQL (shared front end) against full depth with a trainable front end (the paper's "
                f"baseline): {fmt(c['time_ratio'], '.2f', 'x')} less time, relative held-out loss gap "
                f"{fmt(c['loss_gap'], '+.3f')}"
            )
        elif "speedup" in c:
            lines.append(
                f"- {arm} reaches full depth's held-out loss faster (paper {c['paper']:.2f}x): "
                f"{fmt(c['speedup'], '.2f', 'x')} -> {c['faster_at_equal_quality']}"
                + "".join(f"; left out: {why}" for why in c["seeds_left_out"])
            )
        else:
            lines.append(
                f"- {arm} loses quality against interleaved EQL at equal steps (relative held-out loss gap "
                f"{fmt(c['loss_gap_vs_interleaved'], '+.3f')}): {c['loses_quality']}"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict, arms, path: Path) -> None:
    """Held-out loss against costed time: full depth's budget points and each of `arms`' final points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ref = sorted((r["time_s"], r["valid"]["loss"]) for (a, _, _), r in results.items() if a == BASELINE)
    if ref:
        ax.plot(*zip(*ref), "k.", label=f"{BASELINE} (every budget, every seed)")
    for arm in arms:
        if arm == BASELINE:
            continue
        pts = [(r["time_s"], r["valid"]["loss"]) for (a, b, _), r in results.items() if a == arm and b == 1.0]
        if pts:
            ax.plot(*zip(*pts), "o", label=arm, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("costed training time (s, one CPU thread)")
    ax.set_ylabel("held-out loss (all held-out frames)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_json(obj):
    from dataclasses import asdict, is_dataclass

    if is_dataclass(obj):
        return asdict(obj)
    raise TypeError(type(obj))


def trend(docs: Path) -> str:
    """One row per T reported under `docs`/T<steps>/: how the verdicts move as every run gets longer."""
    import json

    from istack_ds.evidence.claims import Interval

    def ci(d: dict | None) -> Interval | None:
        return Interval(**d) if d else None

    lines = [
        "| T | full depth's fall over its last third | full depth loss | interleaved EQL loss | "
        "EQL equal quality | PROP-1 equal quality | GradStack gap | MIDAS gap | GradStack l2l gap | MIDAS l2l gap |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for made in sorted(docs.glob("T*/results.json"), key=lambda p: int(p.parent.name[1:])):
        arms, claims = (json.loads(made.read_text())["analysis"][k] for k in ("arms", "claims"))
        fall = arms.get(BASELINE, {}).get("last_third_change", [])
        cells = [
            made.parent.name[1:],
            ", ".join(f"{c:.1%}" for c in fall) or "—",
            fmt(ci(arms.get(BASELINE, {}).get("loss"))),
            fmt(ci(arms.get("interleaved_eql", {}).get("loss"))),
            *(fmt(ci(claims.get(arm, {}).get("speedup")), ".2f", "x") for arm in PAPER),
            *(
                fmt(ci(claims.get(arm, {}).get("loss_gap_vs_interleaved")), "+.3f")
                for arm in ("gradstack_eql", "midas_eql", "gradstack_eql_l2l", "midas_eql_l2l")
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
