"""What defines the warmstart study: the candidates (each strategy with its options and
schedule, the re-warmed and noise-sweep ones), the selectors and results.csv's columns,
the preset's validation, and the base and continuation training configs."""
from __future__ import annotations

from dataclasses import dataclass

from ...models.gpt import GPTConfig
from ...train import loop as train_mod
from ..presets import REGIMES, WARMSTART_STRATEGIES

# study strategy name -> (growkern strategy, options)
STRATEGY_SPECS = {
    "exact_copy": ("exact_copy", {}),
    "perturb": ("perturb", {"preserving": True}),
    "perturb_np": ("perturb", {"preserving": False}),
    "asym_reset": ("asym_reset", {}),
    "structured": ("structured", {}),
    "szp": ("szp", {}),
    "scratch": ("scratch", {}),
}
PAPER_FAMILIES = ("exact_copy", "perturb", "asym_reset", "structured")  # the paper's candidate pool
PRESERVING = ("exact_copy", "perturb", "asym_reset", "structured")  # exact at step 0 (RMSNorm)
NEW_RUN = ("szp", "scratch")  # start a new training run: moments, step and schedule restart
DEFAULT_NOISE = 0.01  # perturb's default relative noise (the main candidates)
SELECTORS = ("pres_kl", "pres_dloss", "escape0", "probe_escape", "probe_kl", "probe_rms", "probe_loss")
COLUMNS = ("checkpoint", "base_seed", "growth_seed", "regime", "candidate", "strategy", "noise", "schedule",
           "group", "pres_kl", "pres_dloss", "escape0", "escape_1", "escape_4", "escape_16", "probe_escape",
           "probe_kl", "probe_rms", "probe_update_rms", "probe_loss", "final_loss", "auc", "loss_small",
           "loss_step0", "params_small", "params_wide", "plan_preserving", "seconds", "key")


@dataclass(frozen=True)
class Candidate:
    """One warm start: a strategy with its options and the schedule it continues with.
    group: "main" (every strategy, its default options), "schedule" (a preserving one
    re-warmed) or "noise" (perturb at another noise scale)."""
    name: str
    strategy: str  # study strategy name (STRATEGY_SPECS)
    options: tuple = ()  # extra growkern options, (key, value) pairs
    schedule: str = "continue"
    group: str = "main"

    def spec(self) -> tuple[str, dict]:
        name, opts = STRATEGY_SPECS[self.strategy]
        return name, {**opts, **dict(self.options)}


def candidates(p) -> list[Candidate]:
    out = [Candidate(s, s, schedule="restart" if s in NEW_RUN else "continue") for s in p.strategies]
    if p.rewarm:
        out += [Candidate(f"{s}+rewarm", s, schedule="rewarm", group="schedule")
                for s in p.strategies if s in PRESERVING]
    for noise in p.noise_scales:
        if noise == DEFAULT_NOISE:
            continue  # the main perturb / perturb_np
        for s in ("perturb", "perturb_np"):
            out.append(Candidate(f"{s}@{noise:g}", s, options=(("noise", noise),), group="noise"))
    return out


def candidate_regimes(p, cand: Candidate) -> tuple:
    """The noise sweep runs in the deterministic regime only (where noise is the only
    difference between candidates); the others in every regime."""
    return tuple(r for r in p.regimes if cand.group != "noise" or r == "deterministic")


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
    need(all(r in REGIMES for r in p.regimes), f"regimes must be among {REGIMES}, got {p.regimes}")
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
    the same for every candidate). Stochastic: dropout and an order reshuffled per base seed."""
    if regime == "deterministic":
        return base.replace(progress=False)
    return base.replace(regime="stochastic", dropout=p.dropout, salt=1 + base_seed, progress=False)
