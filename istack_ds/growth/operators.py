"""Growth operators: pure functions over layer indices (no torch, no engines).

A *lineage* is the list ``src`` of a growth from depth ``d`` to ``d_new``:
``new_layer[i] = copy(old_layer[src[i]])``. Every index is 0-based (layer i is
``{layer_prefix}{i}``; its output is HF hidden-state ``i + 1``).

``n = d_new - d`` layers are cloned, each at most once (``d < d_new <= 2d``):

=============  ==============================================================================
operator       lineage
=============  ==============================================================================
interleaved    the stack as n groups ``[floor(j*d/n), floor((j+1)*d/n))``; one layer of each
               group cloned, the clone inserted right after its source (the paper).
               ``pick: last`` clones ``idx_j = floor((j+1)*d/n) - 1``, ``pick: first``
               ``idx_j = floor(j*d/n)``
gradstack      copies of the last n layers appended on top
midas          MIDAS (below): the stack as ``k = d/n`` blocks of n layers; the middle block,
               number ``ceil(k/2)`` from the input, copied whole and inserted right after itself
stack          ``d_new = 2d``: the whole stack copied on top
none           not a growth (full depth from step 0): calling it errors
=============  ==============================================================================

The paper's 3 -> 6 -> 9 -> 12, lineage of each growth:

=======================  ===========  =====================  ===========================
operator                 3 -> 6       6 -> 9                 9 -> 12
=======================  ===========  =====================  ===========================
interleaved, pick last   0 0 1 1 2 2  0 1 1 2 3 3 4 5 5      0 1 2 2 3 4 5 5 6 7 8 8
interleaved, pick first  0 0 1 1 2 2  0 0 1 2 2 3 4 4 5      0 0 1 2 3 3 4 5 6 6 7 8
gradstack                0 1 2 0 1 2  0 1 2 3 4 5 3 4 5      0 1 2 3 4 5 6 7 8 6 7 8
midas                    0 1 2 0 1 2  0 1 2 0 1 2 3 4 5      0 1 2 3 4 5 3 4 5 6 7 8
=======================  ===========  =====================  ===========================

MIDAS, as read from Saunshi et al. 2024 ("On the inductive bias of stacking towards improving
reasoning", MIDdle grAdual Stacking): a model of depth ``d`` is ``k`` blocks ``f_1 ... f_k`` of ``b``
layers each (``f_1`` at the input), and a growth adds one block: the middle block ``f_m``,
``m = ceil(k/2)``, is duplicated in place, ``f_1 ... f_m f_m f_(m+1) ... f_k``, so every growth is
block-aligned. Here ``b`` is the growth size ``n = d_new - d``, which must divide ``d``; with an even
``k`` the lower of the two middle blocks is copied (``ceil``). 3 -> 6 -> 9 -> 12 copies layers
0-2, then 0-2 (k = 2: block 1), then 3-5 (k = 3: block 2).
"""

from __future__ import annotations

from typing import Literal, get_args

# NOTE: the growth vocabulary is declared here once; the config's Literal fields and the manager import it.
Operator = Literal["interleaved", "gradstack", "midas", "stack", "none"]
"""How depth grows (the table above)."""
Carry = Literal["last", "first"]
"""Which copy of a supervised layer keeps its target after a growth."""
OptimizerState = Literal["copy", "reset"]
"""Adam moments of a cloned layer: copied from its source, or reset to zero."""
Pick = Literal["last", "first"]
"""interleaved: which layer of each group of d/n layers is cloned."""

OPERATORS: tuple[str, ...] = get_args(Operator)
CARRIES: tuple[str, ...] = get_args(Carry)
OPTIMIZER_STATES: tuple[str, ...] = get_args(OptimizerState)
PICKS: tuple[str, ...] = get_args(Pick)


def check_choices(operator: str, carry: str, optimizer_state: str, pick: str = "last") -> None:
    """Refuses an operator, carry, optimizer_state or pick outside the vocabulary above (code that builds a
    GrowthManager without a config, e.g. benchmarks, gets the config's message)."""
    for key, value, allowed in (
        ("operator", operator, OPERATORS),
        ("carry", carry, CARRIES),
        ("optimizer_state", optimizer_state, OPTIMIZER_STATES),
        ("pick", pick, PICKS),
    ):
        if value not in allowed:
            raise ValueError(f"growth.{key}={value!r} is not allowed; choose one of {list(allowed)}")


def check_growth(operator: str, d: int, d_new: int) -> None:
    """The rules of one growth ``d -> d_new``: it adds layers, clones each at most once
    (``d < d_new <= 2d``), ``stack`` doubles the depth, and ``midas`` copies a whole block
    (``d_new - d`` divides ``d``). Raises ValueError naming the rule."""
    if d < 1:
        raise ValueError(f"cannot grow from depth {d}: a student has at least one layer")
    if d_new <= d:
        raise ValueError(f"growth {d} -> {d_new} does not add layers (depths must be strictly increasing)")
    if d_new > 2 * d:
        raise ValueError(
            f"growth {d} -> {d_new} more than doubles the depth; one growth clones each layer "
            f"at most once (need d_new <= {2 * d})"
        )
    if operator == "stack" and d_new != 2 * d:
        raise ValueError(f"stack: growth {d} -> {d_new} must double the depth (d_new = {2 * d})")
    if operator == "midas" and d % (d_new - d):
        raise ValueError(
            f"midas: growth {d} -> {d_new} adds a block of {d_new - d} layers, which must divide the depth {d} "
            "(MIDAS copies a whole block of the stack)"
        )


def check_depths(operator: str, depths: list[int]) -> None:
    """The rules of a run's stage depths: at least one depth, each >= 1, every step a valid growth
    (:func:`check_growth`). Also holds for ``none``, which trains the last depth only."""
    if not depths or any(d < 1 for d in depths):
        raise ValueError("must be a non-empty list of depths >= 1")
    for d, d_new in zip(depths, depths[1:]):
        check_growth(operator, d, d_new)


def _check(operator: str, d: int, d_new: int) -> int:
    if operator not in OPERATORS:
        raise ValueError(f"unknown growth operator {operator!r}; choose one of {list(OPERATORS)}")
    if operator == "none":
        raise ValueError("growth operator 'none' trains at full depth from step 0 and never grows")
    check_growth(operator, d, d_new)
    return d_new - d


def interleaved_sources(d: int, n: int, pick: Pick = "last") -> list[int]:
    """The n layers the paper's operator clones, one per group ``[floor(j*d/n), floor((j+1)*d/n))``:
    its last layer ``floor((j+1)*d/n) - 1`` (``pick='last'``) or its first ``floor(j*d/n)``."""
    if pick not in PICKS:
        raise ValueError(f"pick={pick!r} is not allowed; choose one of {list(PICKS)}")
    if pick == "last":
        return [((j + 1) * d) // n - 1 for j in range(n)]
    return [(j * d) // n for j in range(n)]


def midas_block(d: int, n: int) -> list[int]:
    """The block MIDAS copies in a growth by n layers: block ``ceil(k/2)`` (1-based) of the ``k = d/n`` blocks."""
    m = -(-(d // n) // 2)
    return list(range((m - 1) * n, m * n))


def lineage(operator: Operator, d: int, d_new: int, pick: Pick = "last") -> list[int]:
    """Source (old) layer index of every new layer for a growth ``d -> d_new``; `pick` applies to interleaved.

    Raises ValueError for ``d_new <= d``, ``d_new > 2d``, ``stack`` with ``d_new != 2d``,
    ``midas`` with ``d_new - d`` not dividing ``d``, ``none`` and unknown operators.
    """
    n = _check(operator, d, d_new)
    if operator == "interleaved":
        cloned = set(interleaved_sources(d, n, pick))
        src: list[int] = []
        for i in range(d):
            src.append(i)
            if i in cloned:
                src.append(i)
        return src
    if operator in ("gradstack", "stack"):
        return list(range(d)) + list(range(d - n, d))
    if operator == "midas":
        block = midas_block(d, n)
        return list(range(block[-1] + 1)) + block + list(range(block[-1] + 1, d))
    raise AssertionError(operator)  # pragma: no cover


def identity(d: int) -> list[int]:
    """The lineage of a rebuild at the same depth (every layer is its own source)."""
    return list(range(d))


def compose(*lineages: list[int]) -> list[int]:
    """Lineage of successive growths, back to the first depth's layers.

    ``compose(a, b)[i] == a[b[i]]``: new layer i of the second growth comes from
    layer ``b[i]`` of the middle depth, which came from layer ``a[b[i]]``.
    """
    if not lineages:
        raise ValueError("compose needs at least one lineage")
    out = list(lineages[0])
    for nxt in lineages[1:]:
        if nxt and max(nxt) >= len(out):
            raise ValueError(f"lineage {nxt} refers to layer {max(nxt)} of a {len(out)}-layer stack")
        out = [out[s] for s in nxt]
    return out


def lineage_through(operator: Operator, depths: list[int], pick: Pick = "last") -> list[int]:
    """Lineage of the final depth back to the first depth's layers, over every growth of ``depths``."""
    if len(depths) < 2:
        return identity(depths[0])
    return compose(*(lineage(operator, a, b, pick) for a, b in zip(depths, depths[1:])))


def carry_supervised(supervised: list[int], src: list[int], carry: Carry = "last") -> list[int]:
    """Where each supervised (old, 0-based) layer index goes after a growth with lineage ``src``.

    Each old layer has one or two copies; ``carry='last'`` gives its target to the
    last new layer whose source it is (the paper's default: a 12-layer interleaved
    student ends with layers 3, 7, 11, i.e. hidden states 4, 8, 12, supervised),
    ``carry='first'`` to the first.
    """
    if carry not in CARRIES:
        raise ValueError(f"carry={carry!r} is not allowed; choose one of {list(CARRIES)}")
    out = []
    for s in supervised:
        copies = [i for i, source in enumerate(src) if source == s]
        if not copies:
            raise ValueError(f"supervised layer {s} has no copy in lineage {src}")
        out.append(copies[-1] if carry == "last" else copies[0])
    return out
