"""A rebuild at the same depth (identity lineage) continues training exactly, on ZeRO 1, 2 and 3.

Usage (under torchrun; see tests/workers/__init__.py):
    growth_rebuild.py --zero 1,2,3 --out JSON

For each stage: run A trains 8 steps uninterrupted; run B trains 4, rebuilds the engine
through GrowthManager (3 -> 3), trains 4 more. Losses and final states must be identical.
Then (ZeRO 2 engine) the error paths: a state dict missing a parameter is refused by name,
and a setter that silently skips a parameter is caught by the read-back, by name.
Each rank's result: the loss curve per stage (`zero1`, ...) and the read-back's error message.
"""

import deepspeed.utils
import torch

from istack_ds.engine import build_engine, destroy_engine
from istack_ds.growth import GrowthManager
from istack_ds.zero_states import GrowthStateError, gather_full_states, scatter_full_states
from tests.workers.growth_common import TOY_PREFIX, build_toy, engine_config, log0, toy_batch, train_step
from tests.workers.protocol import worker_parser, write_all_ranks

parser = worker_parser(__doc__.split("\n")[0])
parser.add_argument("--zero", default="1,2,3", help="ZeRO stages, comma-separated")
args = parser.parse_args()
stages = [int(s) for s in args.zero.split(",")]
N, AT = 8, 4
report = {}
for zero in stages:
    ds, optim = engine_config(zero, total_steps=20)
    sup = [0, 1, 2]

    model = build_toy(3, sup)
    engine = build_engine(model, ds, optim)
    losses_a = [train_step(engine, toy_batch(s)) for s in range(N)]
    final_a = gather_full_states(engine)
    destroy_engine(engine)
    del engine, model

    model = build_toy(3, sup)
    engine = build_engine(model, ds, optim)
    losses_b = [train_step(engine, toy_batch(s)) for s in range(AT)]
    res = GrowthManager(build_toy, ds, optim, TOY_PREFIX).grow(engine, model, 3, 3, sup)
    engine, model = res.engine, res.model
    assert res.lineage == [0, 1, 2] and res.supervised == sup
    losses_b += [train_step(engine, toy_batch(s)) for s in range(AT, N)]
    final_b = gather_full_states(engine)
    assert losses_a == losses_b, f"ZeRO {zero}: rebuild changed the loss curve\n{losses_a}\n{losses_b}"
    for name in final_a:
        for key in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(final_a[name], key), getattr(final_b[name], key)), f"ZeRO {zero}: {name}.{key}"
        assert final_a[name].step == final_b[name].step == N
    report[f"zero{zero}"] = losses_b
    log0(f"ZeRO {zero}: rebuild at step {AT} continues the loss curve exactly: {losses_b}")

    if zero == 2:
        states = gather_full_states(engine)
        victim = "layers.1.fc1.weight"
        partial = {k: v for k, v in states.items() if k != victim}
        try:
            scatter_full_states(engine, partial)
            raise AssertionError("a missing parameter was not refused")
        except GrowthStateError as e:
            assert victim in str(e), e
        real_set = deepspeed.utils.safe_set_full_fp32_param
        target = dict(engine.module.named_parameters())[victim]

        def skipping_set(param, value, target=target, real_set=real_set):
            if param is not target:  # what DeepSpeed does on a parameter it does not manage
                real_set(param, value)

        deepspeed.utils.safe_set_full_fp32_param = skipping_set
        states[victim].param = states[victim].param + 1.0
        try:
            scatter_full_states(engine, states)
            raise AssertionError("a silently skipped parameter passed the read-back")
        except GrowthStateError as e:
            assert victim in str(e) and "fp32 master differs" in str(e), e
            report["readback_error"] = str(e)
        finally:
            deepspeed.utils.safe_set_full_fp32_param = real_set
    destroy_engine(engine)
    del engine, model, res
write_all_ranks(args.out, report)
