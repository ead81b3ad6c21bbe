"""What defines the growth-factor study: the protocol version (part of every run's cache
key), the target, small and training configs, the preset's validation, the strategies
grown at each factor, the steps of a budget, compute curves, best-so-far envelopes, the
speedup of a grown run over scratch, the epochs of data a run sees, and results.csv's
columns."""
from __future__ import annotations

from ...growth.strategies import strategies as known_strategies
from ...models.gpt import GPTConfig
from ...train import loop as train_mod
from .. import metrics

# What a growth-factor result means; part of every run's cache key (2: muP, seeds, the
# paper's szp with its restart, d_ff = ff_mult d_model; 3: speedups read off best-so-far
# envelopes, the operator comparison's runs, epochs of data per run and budget).
PROTOCOL = 3
# A constant schedule ignores its horizon; one fixed value keeps all runs' configs, and
# so their cache keys, independent of their lengths.
HORIZON = 10**9
COLUMNS = ("factor", "param_ratio", "budget", "seed", "growth_seed", "strategy", "parameterization",
           "mup_base_width", "small_d_model", "small_n_head", "small_d_ff", "params_small", "params_target",
           "small_steps", "grown_steps", "small_tokens", "grown_tokens", "small_flops", "total_flops",
           "loss_small", "loss_after_growth", "final_loss", "best_loss", "scratch_flops_to_match", "speedup",
           "speedup_exact", "speedup_text", "small_epochs", "grown_epochs", "scratch_epochs", "epochs",
           "repeats", "seconds", "depth_ratio", "small_n_layer", "key")


def validate(p) -> None:
    def need(cond, msg):
        if not cond:
            raise ValueError(f"growth-factor preset {p.name!r}: {msg}")
    need(len(p.factors) >= 1 and all(g > 1 for g in p.factors), f"factors must be > 1, got {p.factors}")
    need(len(p.budgets) >= 1 and all(r > 0 for r in p.budgets), f"budgets must be > 0, got {p.budgets}")
    need(len(p.seeds) >= 1 and len(set(p.seeds)) == len(p.seeds), f"seeds must be distinct, got {p.seeds}")
    need(p.scratch_factor >= 1, f"scratch_factor must be >= 1, got {p.scratch_factor}")
    need(p.eval_every >= 1, f"eval_every must be >= 1, got {p.eval_every}")
    need(p.scratch_every >= 1, f"scratch_eval_every must be >= 1, got {p.scratch_eval_every}")
    need(p.ff_mult >= 1, f"ff_mult must be >= 1, got {p.ff_mult}")
    need(p.parameterization in ("sp", "mup"), f"parameterization must be sp or mup, got {p.parameterization!r}")
    need(p.max_epochs > 0, f"max_epochs must be > 0, got {p.max_epochs}")
    allowed = known_strategies()
    for s in (p.strategy, *p.compare_strategies):
        need(s in allowed, f"unknown strategy {s!r}; allowed: {', '.join(allowed)}")
    for g in p.compare_factors:
        need(any(abs(g - f) < 1e-9 for f in p.factors),
             f"compare_factors must be among the factors {p.factors}, got {g:g}")
    for k in (*p.depth_ratios, *(k for _, k in p.both)):
        need(k >= 2 and p.n_layer % k == 0, f"depth ratios must divide n_layer {p.n_layer}, got {k}")
    need(set(p.depth_budgets) <= set(p.budgets), f"depth_budgets must be among the budgets, got {p.depth_budgets}")
    need((not p.depth_ratios and not p.both) or p.depth_budgets, "depth_ratios or both need depth_budgets")
    from ...growth.depth import DEPTH_STRATEGIES
    for s in p.depth_strategies:
        need(s in DEPTH_STRATEGIES, f"unknown depth strategy {s!r}; allowed: {', '.join(DEPTH_STRATEGIES)}")
    for g in (*p.factors, *(g for g, _ in p.both)):
        heads = p.n_head / g
        need(abs(heads - round(heads)) < 1e-9 and round(heads) >= 1,
             f"factor {g:g} gives {heads:g} heads for the small model (n_head {p.n_head} / {g:g}); "
             f"allowed: factors dividing n_head (fixed head_dim {p.head_dim})")


def target_config(p, vocab_size: int) -> GPTConfig:
    d = p.d_model
    mup = dict(parameterization="mup", mup_base_width=p.base_width) if p.parameterization == "mup" else {}
    return GPTConfig(vocab_size=vocab_size, block_size=p.block_size, n_layer=p.n_layer, n_head=p.n_head,
                     d_model=d, d_ff=p.ff_mult * d, norm="rmsnorm", **mup)


def small_config(target: GPTConfig, p, g: float, k: int = 1) -> GPTConfig:
    """Width d_model/g at fixed head_dim: heads n_head/g, d_ff ff_mult d_model/g; under muP
    the same base width as the target (so its width multiplier is 1/g); n_layer / k layers."""
    heads = round(p.n_head / g)
    d = heads * p.head_dim
    return target.replace(n_head=heads, n_kv_head=heads, d_model=d, d_ff=p.ff_mult * d,
                          n_layer=target.n_layer // k)


BOTH = "both"  # the "both" operator: the preset's width strategy, then identity in depth


def depth_runs(p) -> list[tuple]:
    """(g, k, strategy) of every depth-axis run: each depth strategy from n_layer / k layers
    at the target's width, and "both" from the (g, k) small models."""
    return ([(1.0, k, f"depth:{s}") for k in p.depth_ratios for s in p.depth_strategies]
            + [(float(g), int(k), BOTH) for g, k in p.both])


def train_config(p, seed: int) -> train_mod.TrainConfig:
    return train_mod.TrainConfig(
        steps=HORIZON, batch_size=p.batch_size, block_size=p.block_size, lr=p.lr, min_lr=p.lr,
        warmup=p.warmup, schedule="constant", weight_decay=p.weight_decay, betas=(0.9, 0.95),
        eval_every=0, regime="deterministic", seed=seed, progress=False)


def steps_for(tokens: float, tokens_per_step: int) -> int:
    return max(1, round(tokens / tokens_per_step))


def compute_curve(curve, start_step: int, start_flops: float, flops_per_step: float):
    """[step, val_loss] -> [flops, val_loss] for the steps from start_step on."""
    return [[start_flops + (s - start_step) * flops_per_step, l] for s, l in curve if s >= start_step]


def grown_strategies(p, g: float) -> tuple:
    """The strategies grown at factor g: the preset's, then its comparison strategies there."""
    return (p.strategy, *p.compared(g))


def growth_options(p, strategy: str) -> tuple[dict, str | None]:
    """(plan options, widen_ schedule) of a strategy: the preset's own for p.strategy; a
    comparison strategy runs with its defaults (its default schedule included), as its
    authors use it."""
    if strategy in (p.strategy, BOTH):  # "both" widens with the preset's strategy as the preset runs it
        return dict(p.strategy_options), p.growth_schedule
    return {}, None


def best_so_far(losses) -> list:
    """The running minimum of a val-loss curve: the best loss a run has shown by each
    evaluation. Speedups are read off this envelope rather than the raw curve, whose
    evaluation noise (it rises between many consecutive evaluations at constant LR) makes
    "the first point that reaches L" depend on the noise."""
    out, best = [], float("inf")
    for loss in losses:
        best = min(best, loss)
        out.append(best)
    return out


def speedup_cell(scratch_flops, scratch_losses, grown_flops: float, grown_loss: float,
                 scratch_factor: float = 2.0) -> tuple[float, bool]:
    """speedup(g, r) per docs/studies.md: scratch's best-so-far envelope up to scratch_factor
    x the grown run's compute, the compute at which it first reaches `grown_loss` (the grown
    run's best loss), divided by the grown run's compute; (lower bound, False) when it
    never does."""
    limit = scratch_factor * grown_flops * (1 + 1e-12)
    pts = [(f, l) for f, l in zip(scratch_flops, best_so_far(scratch_losses)) if f <= limit]
    return metrics.speedup([f for f, _ in pts], [l for _, l in pts], grown_flops, grown_loss)


def scratch_flops_read(scratch_flops, scratch_losses, grown_flops: float, grown_loss: float,
                       scratch_factor: float = 2.0) -> float:
    """How far along the scratch curve a speedup reads: to where its envelope reaches the
    grown run's best loss, or to the end of its window (scratch_factor x the grown run's
    compute, or the curve's end) for a lower bound."""
    value, _ = speedup_cell(scratch_flops, scratch_losses, grown_flops, grown_loss, scratch_factor)
    return value * grown_flops


def epochs(tokens: float, train_tokens: int) -> float:
    """How many times `tokens` of training data go through the training split."""
    return tokens / train_tokens


def speedup_text(value: float, exact: bool) -> str:
    return f"{value:.2f}" if exact else f">{value:.2f}"
