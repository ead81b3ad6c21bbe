"""Depth plans: which old block each new block comes from, and how it is made.

A depth plan is a list with one entry per block of the grown model: the index of
the old block it is built from (its source) and what is done to that copy. The
first block that takes a source *is* that block (the same module and nn.Parameter
objects, moved to its new index); every later one is a copy. The strategies,
with their math in docs/growth.md ("Depth"):

  identity    a copy of block p after block p for each p in `positions`, its
              residual outputs (attention and MLP output projections and their
              biases) zero: the new block adds nothing to the residual stream, so the
              function is exactly preserved (LLaMA-Pro's block expansion).
  fresh       the same places, the new block drawn from the model's init with zero
              residual outputs: preserving; the control for identity.
  interleave  the same places, plain copies: block p then its copy (n_layer = 2L:
              every block doubled, as bert2BERT and staged training do). Not preserving.
  stack       the whole stack repeated, block j a copy of block j mod L (G_stack).
              Not preserving.
  upscale     depth up-scaling (SOLAR): two copies of the stack, the first without its
              top `trim` blocks, the second without its bottom `trim`, so n_layer =
              2L - 2 trim. Not preserving.

`positions` (identity, fresh, interleave) are old block indices, one per new block,
each new block going right after its block; by default spread evenly, one after
every L/k blocks as LLaMA-Pro places them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DEPTH_STRATEGIES = ("identity", "fresh", "interleave", "stack", "upscale")
PRESERVING = ("identity", "fresh")
# how a block of the grown model is made from its source
KEEP, COPY, ZERO_OUT, FRESH = "keep", "copy", "copy, residual outputs zero", "fresh, residual outputs zero"


@dataclass(frozen=True)
class DepthPlan:
    strategy: str
    old: int  # blocks before
    sources: tuple[int, ...]  # new block j is built from old block sources[j]
    kinds: tuple[str, ...]  # KEEP (the old block itself), COPY, ZERO_OUT or FRESH
    seed: int = 0

    @property
    def new(self) -> int:
        return len(self.sources)

    @property
    def exact(self) -> bool:
        return self.strategy in PRESERVING

    @property
    def added(self) -> list[int]:
        """The new model's indices of the blocks that are not old blocks."""
        return [j for j, k in enumerate(self.kinds) if k != KEEP]

    def describe(self) -> str:
        marks = {KEEP: "", COPY: "c", ZERO_OUT: "z", FRESH: "f"}
        return "[" + " ".join(f"{s}{marks[k]}" for s, k in zip(self.sources, self.kinds)) + "]"


def even_positions(old: int, k: int) -> list[int]:
    """k blocks placed after every old/k blocks: after blocks ceil((i+1) old/k) - 1."""
    return [math.ceil((i + 1) * old / k) - 1 for i in range(k)]


def plan_depth(old: int, *, n_layer: int | None = None, factor: float | None = None, strategy: str = "identity",
               positions=None, seed: int = 0) -> DepthPlan:
    """The depth plan for a stack of `old` blocks grown to `n_layer` (or `factor` x old)
    blocks; ValueError naming the problem and what is allowed."""
    if not isinstance(strategy, str) or strategy not in DEPTH_STRATEGIES:
        raise ValueError(f"unknown depth strategy {strategy!r}; allowed: {', '.join(DEPTH_STRATEGIES)}")
    n_layer = _target(old, n_layer, factor)
    k = n_layer - old
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if strategy in ("stack", "upscale"):
        if positions is not None:
            raise ValueError(f"positions apply to identity, fresh and interleave, not to {strategy} "
                             f"(which places its copies itself)")
        if strategy == "stack":
            sources = [j % old for j in range(n_layer)]
        else:
            if n_layer > 2 * old or (2 * old - n_layer) % 2:
                raise ValueError(f"upscale makes 2L - 2 trim blocks from L = {old}: n_layer must be even and at "
                                 f"most {2 * old}, got {n_layer}")
            trim = (2 * old - n_layer) // 2
            sources = list(range(old - trim)) + list(range(trim, old))
        seen, kinds = set(), []
        for s in sources:
            kinds.append(COPY if s in seen else KEEP)
            seen.add(s)
        return DepthPlan(strategy, old, tuple(sources), tuple(kinds), seed)

    positions = even_positions(old, k) if positions is None else _positions(positions, old, k)
    made = {"identity": ZERO_OUT, "fresh": FRESH, "interleave": COPY}[strategy]
    sources, kinds = [], []
    for i in range(old):
        sources.append(i)
        kinds.append(KEEP)
        for _ in range(positions.count(i)):
            sources.append(i)
            kinds.append(made)
    return DepthPlan(strategy, old, tuple(sources), tuple(kinds), seed)


def _target(old: int, n_layer, factor) -> int:
    if (n_layer is None) == (factor is None):
        raise ValueError("give exactly one of n_layer= (the new number of blocks) or factor= (new/old)")
    if factor is not None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise ValueError(f"factor must be a number > 1, got {factor!r}")
        n = factor * old
        if abs(n - round(n)) > 1e-9:
            raise ValueError(f"factor {factor} times {old} blocks is {n:g}, not a whole number of blocks; give "
                             f"n_layer= instead")
        n_layer = int(round(n))
    if isinstance(n_layer, bool) or not isinstance(n_layer, int):
        raise ValueError(f"n_layer must be an int, got {n_layer!r}")
    if n_layer <= old:
        raise ValueError(f"n_layer must be greater than the model's {old} blocks, got {n_layer} "
                         f"(deepen_ adds blocks; it does not remove them)")
    return n_layer


def _positions(positions, old: int, k: int) -> list[int]:
    try:
        pos = [int(p) for p in positions]
        ok = all(not isinstance(p, bool) and int(p) == p for p in positions)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"positions must be a list of block indices (ints), got {positions!r}")
    if len(pos) != k:
        raise ValueError(f"positions must name one old block per new block: {k} new blocks, "
                         f"{len(pos)} positions given")
    bad = [p for p in pos if not 0 <= p < old]
    if bad:
        raise ValueError(f"positions must be old block indices in 0..{old - 1} (a new block goes right after "
                         f"its block); got {bad[0]}")
    return sorted(pos)
