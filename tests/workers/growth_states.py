"""Two growths inside one process on real ZeRO engines; checks states, the first step, the LR.

Usage (under torchrun; see tests/workers/__init__.py):
    growth_states.py --zero 2 --model toy --precision fp32 --depths 3,6,9 --out JSON

Growth 1 copies the optimizer state, growth 2 resets the clones'. After each: every new
parameter (fp32 master, exp_avg, exp_avg_sq, step) equals its source's (a clone's moments are
zero under reset), the weights hold the master, the supervised layers followed the lineage.
After growth 1 (fp32): the engine's first step equals a plain torch AdamW step from the same
states. At every step: the LR equals the unbroken WarmupDecayLR schedule's. Each rank's result:
the growth pauses, the largest difference to torch AdamW, the LRs, the losses, the final depth.
"""

import torch
from deepspeed.runtime.lr_schedules import WarmupDecayLR

from istack_ds.engine import build_engine, param_groups
from istack_ds.growth import GrowthManager, carry_supervised, lineage
from istack_ds.zero_states import gather_full_states
from tests.workers.growth_common import (
    DEVICE,
    HUBERT_PREFIX,
    TOY_PREFIX,
    build_hubert,
    build_toy,
    current_lr,
    engine_config,
    hubert_batch,
    log0,
    toy_batch,
    train_step,
)
from tests.workers.protocol import worker_parser, write_all_ranks

parser = worker_parser(__doc__.split("\n")[0])
parser.add_argument("--zero", type=int, required=True, choices=(1, 2, 3))
parser.add_argument("--model", default="toy", choices=("toy", "hubert"))
parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
parser.add_argument("--depths", default="3,6,9", help="the depths, comma-separated")
args = parser.parse_args()
zero, precision = args.zero, args.precision
depths = [int(d) for d in args.depths.split(",")]
hubert = args.model == "hubert"
build, batch_fn, prefix = (build_hubert, hubert_batch, HUBERT_PREFIX) if hubert else (build_toy, toy_batch, TOY_PREFIX)
dtype = torch.bfloat16 if precision == "bf16" else torch.float32
TOTAL, STEPS_PER_STAGE = 20, 3
ds, optim = engine_config(zero, precision, total_steps=TOTAL)

# The unbroken schedule, on a throwaway optimizer.
_dummy = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
_sched = WarmupDecayLR(_dummy, **ds["scheduler"]["params"])
unbroken = []
for _ in range(STEPS_PER_STAGE * len(depths)):
    unbroken.append(_dummy.param_groups[0]["lr"])
    _sched.step()

supervised = list(range(min(3, depths[0])))
model = build(depths[0], supervised)
engine = build_engine(model, ds, optim)
lrs, losses, step = [], [], 0


def run(n):
    global step
    for _ in range(n):
        lrs.append(current_lr(engine))
        losses.append(train_step(engine, batch_fn(step, dtype)))
        step += 1


def check_grown(old, new, src, new_prefix_map, reset):
    """new param states == source states; clones' moments zero under reset."""
    clones = {i for i, s in enumerate(src) if s in src[:i]}
    for name, st in new.items():
        parsed = new_prefix_map(name)
        source = name if parsed is None else f"{prefix}{src[parsed[0]]}.{parsed[1]}"
        o = old[source]
        assert torch.equal(st.param, o.param), f"{name}: param != source {source}"
        assert st.step == o.step, f"{name}: step {st.step} != {o.step}"
        zeroed = reset and parsed is not None and parsed[0] in clones
        for key in ("exp_avg", "exp_avg_sq"):
            want = torch.zeros_like(getattr(o, key)) if zeroed else getattr(o, key)
            assert torch.equal(getattr(st, key), want), f"{name}: {key} is not {'zero' if zeroed else 'the source'}"
    n_clone_params = sum(1 for n in new if (p := new_prefix_map(n)) is not None and p[0] in clones)
    assert n_clone_params > 0


def reference_step(states, depth, sup, lr, batch):
    """A plain torch AdamW step on the grown model from the same states; returns the new fp32 params."""
    ref = build(depth, sup).to(DEVICE)
    named = dict(ref.named_parameters())
    for name, p in named.items():
        p.data.copy_(states[name].param)
    opt = torch.optim.AdamW(param_groups(ref, optim.weight_decay), lr=lr, betas=optim.betas, eps=optim.eps)
    for name, p in named.items():
        st = states[name]
        opt.state[p] = {
            "step": torch.tensor(float(st.step)),
            "exp_avg": st.exp_avg.clone(),
            "exp_avg_sq": st.exp_avg_sq.clone(),
        }
    loss = ref(*batch)
    loss.backward()
    opt.step()
    return {n: p.detach().clone() for n, p in named.items()}


run(STEPS_PER_STAGE)
report = {"pauses": [], "ref_max_diff": None}
for g, (d, d_new) in enumerate(zip(depths, depths[1:])):
    reset = g == 1
    manager = GrowthManager(build, ds, optim, prefix, "interleaved", "last", "reset" if reset else "copy")
    old = gather_full_states(engine)
    res = manager.grow(engine, model, d, d_new, supervised)
    engine, model = res.engine, res.model  # drop the old ones
    src = lineage("interleaved", d, d_new)
    assert res.lineage == src and res.depth == d_new
    assert res.supervised == carry_supervised(supervised, src, "last") == model.supervised
    supervised = res.supervised
    assert engine.global_steps == step, (engine.global_steps, step)
    new = gather_full_states(engine)
    check_grown(old, new, src, manager.layer_index, reset)
    report["pauses"].append(round(res.pause_s, 3))
    log0(f"growth {d}->{d_new} ({'reset' if reset else 'copy'}): pause {res.pause_s:.2f}s {res.timings}")
    if g == 0 and precision == "fp32":
        batch = batch_fn(step, dtype)
        want = reference_step(new, d_new, supervised, current_lr(engine), batch)
        lrs.append(current_lr(engine))
        losses.append(train_step(engine, batch))
        step += 1
        got = gather_full_states(engine)
        diff = max((got[n].param - want[n]).abs().max().item() for n in want)
        assert diff <= 1e-6, f"first step after growth differs from torch AdamW by {diff}"
        report["ref_max_diff"] = diff
        run(STEPS_PER_STAGE - 1)
    else:
        run(STEPS_PER_STAGE)

assert len(lrs) == len(unbroken)
lr_diff = max(abs(a - b) for a, b in zip(lrs, unbroken))
assert lr_diff == 0.0, f"LR differs from the unbroken schedule: {list(zip(lrs, unbroken))}"
assert all(torch.isfinite(torch.tensor(losses))), losses
report.update(lrs=lrs, losses=losses, depth=depths[-1])
write_all_ranks(args.out, report)
