"""What defines the warmstart study: the candidates (each strategy with its options and
schedule, the regimes and base seeds it runs on), the comparisons named before any run,
the selectors and results.csv's columns, the preset's validation, the base and
continuation training configs, and the compute of a continuation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models.gpt import GPT, GPTConfig
from ...train import loop as train_mod
from ..presets import REGIMES, WARMSTART_REFERENCES, WARMSTART_STRATEGIES

# In every continuation's cache key: bump when what a run stores changes meaning.
# 3: the shuffle regime, the small_equal_compute and structured_mapped references, steps
# and FLOPs per run, one forward per model for each held-out evaluation
PROTOCOL = 3

# study strategy name -> (growkern strategy, options)
STRATEGY_SPECS = {
    "exact_copy": ("exact_copy", {}),
    "perturb": ("perturb", {"preserving": True}),
    "perturb_np": ("perturb", {"preserving": False}),
    "asym_reset": ("asym_reset", {}),
    "structured": ("structured", {}),
    # structured's weights with exact_copy's moments: the ablation of structured's zero
    # moments for its new units
    "structured_mapped": ("structured", {"moments": "mapped"}),
    "szp": ("szp", {}),
    "scratch": ("scratch", {}),
}
# the base model continued ungrown (same batch, its own optimizer state) for as many
# FLOPs as a grown candidate's continuation: does growing beat not growing?
SMALL_EQUAL_COMPUTE = "small_equal_compute"
PAPER_FAMILIES = ("exact_copy", "perturb", "asym_reset", "structured")  # the paper's candidate pool
PRESERVING = ("exact_copy", "perturb", "asym_reset", "structured", "structured_mapped")  # exact at step 0
NEW_RUN = ("szp", "scratch")  # start a new training run: moments, step and schedule restart
DEFAULT_NOISE = 0.01  # perturb's default relative noise (the main candidates)
# The comparator of each "X ranks first / wins" finding, fixed before any run (not the
# best other candidate of the same data): the paper's two constructions, the exact clone
# and the structured non-clone start, against each other. perturb at noise 0.01 is
# exact_copy to ~2e-7 nats by construction (antithetic noise keeps the clones' sums), so
# it is reported as tied with exact_copy, not ranked against it.
COMPARATOR = {"exact_copy": "structured", "structured": "exact_copy"}
REFERENCE = "exact_copy"  # the rankings' fixed reference: every candidate's gap is to it
SELECTORS = ("pres_kl", "pres_dloss", "escape0", "probe_escape", "probe_kl", "probe_rms", "probe_loss")
COLUMNS = ("checkpoint", "base_seed", "growth_seed", "regime", "candidate", "strategy", "noise", "schedule",
           "group", "pres_kl", "pres_dloss", "escape0", "escape_1", "escape_4", "escape_16", "probe_escape",
           "probe_kl", "probe_rms", "probe_update_rms", "probe_loss", "final_loss", "auc", "loss_small",
           "loss_step0", "params_small", "params_wide", "plan_preserving", "steps", "flops", "seconds", "key")


@dataclass(frozen=True)
class Candidate:
    """One warm start: a strategy with its options and the schedule it continues with.
    group: "main" (the preset's strategies), "noise" (perturb / perturb_np at another
    noise scale), "reference" (szp, scratch, structured_mapped, small_equal_compute) or
    "schedule" (a preserving one re-warmed). regimes: where it runs (None: every regime);
    sweep: on the sweep seeds only."""
    name: str
    strategy: str  # study strategy name (STRATEGY_SPECS, or SMALL_EQUAL_COMPUTE)
    options: tuple = ()  # extra growkern options, (key, value) pairs
    schedule: str = "continue"
    group: str = "main"
    regimes: tuple | None = None
    sweep: bool = False

    @property
    def grown(self) -> bool:
        return self.strategy != SMALL_EQUAL_COMPUTE

    def spec(self) -> tuple[str, dict]:
        if not self.grown:
            return SMALL_EQUAL_COMPUTE, {}
        name, opts = STRATEGY_SPECS[self.strategy]
        return name, {**opts, **dict(self.options)}


def candidates(p) -> list[Candidate]:
    out = [Candidate(s, s, schedule="restart" if s in NEW_RUN else "continue") for s in p.strategies]
    for noise in p.noise_scales:
        for s in ("perturb", "perturb_np"):
            if noise == DEFAULT_NOISE and s in p.strategies:
                continue  # a main candidate already
            name = s if noise == DEFAULT_NOISE else f"{s}@{noise:g}"
            out.append(Candidate(name, s, options=(("noise", noise),), group="noise"))
    out += [Candidate(s, s, schedule="restart" if s in NEW_RUN else "stretched" if s == SMALL_EQUAL_COMPUTE
                      else "continue", group="reference", regimes=p.side_regimes) for s in p.references]
    out += [Candidate(f"{s}+rewarm", s, schedule="rewarm", group="schedule", regimes=p.side_regimes, sweep=True)
            for s in p.rewarm_strategies]
    return out


def candidate_regimes(p, cand: Candidate) -> tuple:
    """The regimes a candidate runs in, in the preset's order."""
    return tuple(r for r in p.regimes if cand.regimes is None or r in cand.regimes)


def planned_runs(p) -> list[tuple[int, int, Candidate, str]]:
    """Every continuation of the preset, (base seed, checkpoint, candidate, regime), in run order."""
    return [(seed, step, cand, regime) for seed in p.base_seeds for step in p.checkpoints for cand in candidates(p)
            if not cand.sweep or p.sweeps(seed) for regime in candidate_regimes(p, cand)]


def escape_pool(p) -> list[str]:
    """The candidates whose update escape varies (the clone family, structured, perturb
    and perturb_np at every noise scale): the pool of the escape findings."""
    return [c.name for c in candidates(p) if c.group in ("main", "noise")]


def validate(p) -> None:
    def need(cond, msg):
        if not cond:
            raise ValueError(f"warmstart preset {p.name!r}: {msg}")
    need(p.growth_factor > 1, f"growth_factor must be > 1, got {p.growth_factor}")
    need(len(p.checkpoints) >= 1 and all(isinstance(s, int) and s >= 1 for s in p.checkpoints),
         f"checkpoints must be positive ints, got {p.checkpoints}")
    need(len(p.base_seeds) >= 1 and len(set(p.base_seeds)) == len(p.base_seeds),
         f"base_seeds must be distinct, got {p.base_seeds}")
    need(p.sweep_seed_count is None or (isinstance(p.sweep_seed_count, int) and p.sweep_seed_count >= 0),
         f"sweep_seed_count must be None (every base seed) or an int >= 0, got {p.sweep_seed_count!r}")
    need(0 < p.probe_lag <= p.continuation, f"probe_lag must be in [1, continuation={p.continuation}], "
                                              f"got {p.probe_lag}")
    need(all(0 < lag <= p.continuation for lag in p.escape_lags),
         f"escape_lags must be in [1, continuation={p.continuation}], got {p.escape_lags}")
    need(p.eval_every >= 1, f"eval_every must be >= 1, got {p.eval_every}")
    bad = [s for s in p.strategies if s not in STRATEGY_SPECS]
    need(not bad, f"unknown strategies {bad}; allowed: {', '.join(WARMSTART_STRATEGIES)}")
    bad = [s for s in p.references if s not in WARMSTART_REFERENCES]
    need(not bad, f"unknown references {bad}; allowed: {', '.join(WARMSTART_REFERENCES)}")
    bad = [s for s in p.rewarm_strategies if s not in PRESERVING]
    need(not bad, f"rewarm_strategies must be preserving strategies, got {bad}; allowed: {', '.join(PRESERVING)}")
    need(len(p.regimes) >= 1 and all(r in REGIMES for r in p.regimes),
         f"regimes must be among {REGIMES}, got {p.regimes}")
    need(p.reference_regimes is None or all(r in REGIMES for r in p.reference_regimes),
         f"reference_regimes must be None or among {REGIMES}, got {p.reference_regimes}")
    need(0 < p.dropout < 1 or "stochastic" not in p.regimes, "stochastic regime needs dropout in (0, 1)")
    need(p.schedule in ("constant", "cosine", "wsd"), f"schedule must be constant, cosine or wsd, got {p.schedule!r}")
    need(p.parameterization in ("sp", "mup"), f"parameterization must be sp or mup, got {p.parameterization!r}")
    need(all(0 < n <= 1 for n in p.noise_scales), f"noise_scales must be in (0, 1], got {p.noise_scales}")


def base_configs(p, vocab_size: int, base_seed: int) -> tuple[GPTConfig, train_mod.TrainConfig]:
    mup = dict(parameterization="mup", mup_base_width=p.d_model) if p.parameterization == "mup" else {}
    gcfg = GPTConfig(vocab_size=vocab_size, block_size=p.block_size, n_layer=p.n_layer, n_head=p.n_head,
                     d_model=p.d_model, d_ff=4 * p.d_model, norm="rmsnorm", **mup)
    # the schedule spans the last checkpoint plus a continuation, so every candidate
    # continues on the base run's own schedule
    tcfg = train_mod.TrainConfig(
        steps=p.horizon, batch_size=p.batch_size, block_size=p.block_size, lr=p.lr,
        min_lr=p.lr * (p.min_lr_ratio if p.schedule != "constant" else 1.0), warmup=p.warmup,
        schedule=p.schedule, weight_decay=p.weight_decay, eval_every=0, regime="deterministic",
        seed=base_seed, progress=False)
    return gcfg, tcfg


def continuation_config(base: train_mod.TrainConfig, p, regime: str, base_seed: int) -> train_mod.TrainConfig:
    """Deterministic: the base run's own config (dropout 0, the checkpoint's data order,
    the same for every candidate). Shuffle: an order reshuffled per base seed, dropout 0.
    Stochastic: the same reshuffled order and dropout, so shuffle and stochastic differ in
    dropout alone and deterministic and shuffle in the data order alone."""
    if regime == "deterministic":
        return base.replace(progress=False)
    return base.replace(regime="stochastic", dropout=p.dropout if regime == "stochastic" else 0.0,
                        salt=1 + base_seed, progress=False)


def wide_config(p, small: GPTConfig) -> GPTConfig:
    """The grown model's config (widths times growth_factor, head_dim fixed), for counting."""
    g = p.growth_factor
    return small.replace(d_model=round(small.d_model * g), n_head=round(small.n_head * g),
                         n_kv_head=round(small.n_kv_head * g), d_ff=round(small.d_ff * g))


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token of a model of this config (growkern.train.loop's
    convention: 6 N_non-embedding + 6 L d_model T), counted on the meta device."""
    with torch.device("meta"):
        model = GPT(config)
    return train_mod.flops_per_token(model, seq_len)


def equal_compute_steps(p, small: GPTConfig) -> int:
    """Steps of the small model that cost what `continuation` steps of the grown one do."""
    ratio = flops_per_token(wide_config(p, small), p.block_size) / flops_per_token(small, p.block_size)
    return max(1, round(p.continuation * ratio))
