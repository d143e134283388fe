"""Resident memory stays flat over consecutive rebuilds of a live engine.

Usage (under torchrun; see tests/workers/__init__.py):
    growth_memory.py --zero 2 --rebuilds 6 --out JSON [--leak]

A ~6M-parameter toy student (one engine's states ~100 MB a rank) is rebuilt at the same
depth `rebuilds` times with three training steps between; RSS after every rebuild must stay
within 10 % of RSS after the first one, and no old engine or model may survive (weakrefs).
--leak keeps a reference alive on purpose: the check must then fail. Each rank's result:
the stage, the parameter count, RSS after every rebuild.
"""

import gc
import weakref
from functools import partial

from istack_ds.engine import build_engine, malloc_trim, rss_bytes
from istack_ds.growth import GrowthManager
from tests.workers.growth_common import TOY_PREFIX, build_toy, engine_config, log0, toy_batch
from tests.workers.protocol import worker_parser, write_all_ranks

parser = worker_parser(__doc__.split("\n")[0])
parser.add_argument("--zero", type=int, required=True, choices=(1, 2, 3))
parser.add_argument("--rebuilds", type=int, default=6)
parser.add_argument("--width", type=int, default=384)
parser.add_argument("--leak", action="store_true", help="keep ZeRO 3's lru_cache reference alive")
args = parser.parse_args()
zero, rebuilds, width, depth = args.zero, args.rebuilds, args.width, 6
build = partial(build_toy, width=width)
ds, optim = engine_config(zero, total_steps=100)
manager = GrowthManager(lambda d, s: build(d, s), ds, optim, TOY_PREFIX)


def step(engine, i):
    loss = engine(*toy_batch(i))
    engine.backward(loss)
    engine.step()


model = build(depth, [0])
n_params = sum(p.numel() for p in model.parameters())
if args.leak:  # sensitivity check of this test: keep ZeRO 3's lru_cache reference alive
    import istack_ds.engine

    istack_ds.engine._clear_lru_cache = lambda fn: None
engine = build_engine(model, ds, optim)
step(engine, 0)
rss = []
for r in range(rebuilds):
    old_engine, old_model = weakref.ref(engine), weakref.ref(model)
    res = manager.grow(engine, model, depth, depth, [0])
    engine, model = res.engine, res.model
    del res
    for i in range(3):  # ZeRO 3 caches its release plan once the trace is complete (after 2 steps)
        step(engine, 3 * r + i)
    gc.collect()
    # NOTE: memory is released eagerly even if something still points at the old engine;
    # this checks that nothing does (DeepSpeed's module-level references included).
    assert old_engine() is None and old_model() is None, f"ZeRO {zero}: the old engine/model is still referenced"
    malloc_trim()
    rss.append(rss_bytes() / 2**20)
    log0(f"ZeRO {zero} rebuild {r + 1}: RSS {rss[-1]:.0f} MiB")
limit = 1.10 * rss[0]
assert max(rss) <= limit, (
    f"ZeRO {zero}: RSS grew over {rebuilds} rebuilds: {[round(v) for v in rss]} MiB (limit {limit:.0f})"
)
write_all_ranks(args.out, {"zero": zero, "params": n_params, "rss_mib": [round(v, 1) for v in rss]})
