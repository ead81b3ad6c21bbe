"""Preset sizes and budgets of the two studies (smoke, cpu, paper), and where the data is.

A preset is a frozen dataclass; every field is part of the runs' cache keys except
`threads` (how many CPU threads torch uses, which does not change results). A study
takes a preset name or object plus keyword overrides of its fields.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

WARMSTART_STRATEGIES = ("exact_copy", "perturb", "perturb_np", "asym_reset", "structured", "structured_mapped",
                        "szp", "scratch")
# the warmstart references: grown ones, and the base model continued ungrown for the
# grown candidates' FLOPs (small_equal_compute)
WARMSTART_REFERENCES = ("szp", "scratch", "structured_mapped", "small_equal_compute")
# deterministic: the base run's data order, no dropout; shuffle: a data order reshuffled
# per base seed, no dropout; stochastic: that order and dropout
REGIMES = ("deterministic", "shuffle", "stochastic")


@dataclass(frozen=True)
class WarmstartPreset:
    name: str
    # base (small) model; RMSNorm so that every preserving strategy is exact
    vocab_size: int
    block_size: int
    n_layer: int
    d_model: int
    n_head: int
    growth_factor: float
    # base training (deterministic regime; the schedule spans base + continuation steps)
    batch_size: int
    lr: float
    warmup: int
    checkpoints: tuple  # base steps at which candidates are grown
    # continuation
    continuation: int  # steps every candidate trains after growth
    probe_lag: int
    eval_every: int
    dropout: float  # stochastic regime
    base_seeds: tuple = (0, 1)  # one base model per seed (init and data order)
    # how many base seeds (the first ones) also run the re-warmed candidates (None: all);
    # the others run the rest only, so seeds can be added to the findings at the cost of
    # the candidates the findings rest on
    sweep_seed_count: int | None = None
    growth_seed: int = 0  # the growth's noise (Philox key); recorded per row
    # main candidates: every base seed, every regime (the paper's four families)
    strategies: tuple = ("exact_copy", "perturb", "asym_reset", "structured")
    regimes: tuple = REGIMES
    # perturb and perturb_np at these relative noises (perturb at the default 0.01 is a main
    # candidate): every base seed, every regime; with the main candidates they make the
    # pool over which the update's escape varies (the escape findings)
    noise_scales: tuple = (1e-1,)
    # references (WARMSTART_REFERENCES): every base seed, in reference_regimes (None: all)
    references: tuple = ("szp", "structured_mapped", "small_equal_compute")
    reference_regimes: tuple | None = None
    schedule: str = "cosine"  # base LR schedule after warmup: constant, cosine, wsd
    min_lr_ratio: float = 0.1
    # continued with the schedule re-warmed instead: these strategies, on the sweep seeds,
    # in reference_regimes (perturb's noise 0.01 run is exact_copy's within 1e-5 nats: left out)
    rewarm_strategies: tuple = ("exact_copy", "asym_reset", "structured")
    rewarm_steps: int = 16
    escape_lags: tuple = (1, 4, 16)  # steps after growth where the update's escape is measured
    parameterization: str = "mup"  # muP with the base model's width as base width
    weight_decay: float = 0.1
    eval_batch_size: int = 16
    eval_batches: int = 4  # held-out windows = eval_batch_size * eval_batches
    threads: int | None = None  # torch CPU threads; None: torch's default

    @property
    def horizon(self) -> int:
        """The LR schedule's length: the last checkpoint plus a continuation."""
        return max(self.checkpoints) + self.continuation

    @property
    def sweep_seeds(self) -> tuple:
        """The base seeds whose cells also run the re-warmed candidates."""
        return self.base_seeds if self.sweep_seed_count is None else self.base_seeds[:self.sweep_seed_count]

    @property
    def side_regimes(self) -> tuple:
        """The regimes of the references and the re-warmed candidates."""
        return self.regimes if self.reference_regimes is None else tuple(
            r for r in self.regimes if r in self.reference_regimes)

    def sweeps(self, base_seed: int) -> bool:
        return base_seed in self.sweep_seeds

    def describe(self) -> list[str]:
        wide = round(self.d_model * self.growth_factor)
        sched = (f"{self.schedule} to {self.min_lr_ratio:g} x lr over {self.horizon} steps"
                 if self.schedule != "constant" else "constant")
        return [
            f"base model: d_model {self.d_model}, {self.n_head} heads (head_dim {self.d_model // self.n_head}), "
            f"{self.n_layer} layers, d_ff {4 * self.d_model}, RMSNorm, vocab {self.vocab_size}, "
            f"block {self.block_size}, {self.parameterization} (base width {self.d_model}); "
            f"grown x{self.growth_factor:g} to d_model {wide}",
            f"base training: one model per base seed ({', '.join(map(str, self.base_seeds))}), "
            f"{max(self.checkpoints)} steps, batch {self.batch_size} x {self.block_size} tokens, AdamW lr "
            f"{self.lr:g} after {self.warmup} warmup steps, then {sched}; checkpoints at steps "
            f"{', '.join(map(str, self.checkpoints))}",
            f"continuation: {self.continuation} steps per candidate, probe lag {self.probe_lag}, update "
            f"escape at lags {', '.join(map(str, self.escape_lags))}, val loss every {self.eval_every} steps "
            f"on {self.eval_batch_size * self.eval_batches} held-out windows; regimes "
            f"{', '.join(self.regimes)} (shuffle: the data reshuffled per base seed, no dropout; "
            f"stochastic: the same order and dropout {self.dropout:g}); growth noise seed {self.growth_seed}",
            f"candidates: {', '.join(self.strategies)} (the schedule continues)"
            + (f"; perturb and perturb_np at relative noise {', '.join(f'{n:g}' for n in self.noise_scales)}"
               if self.noise_scales else "")
            + ", on every base seed in every regime"
            + (f"; references {', '.join(self.references)} on every base seed in the "
               f"{', '.join(self.side_regimes)} regime(s)" if self.references else "")
            + (f"; {', '.join(self.rewarm_strategies)} also with the schedule re-warmed over {self.rewarm_steps} "
               f"steps, on base seeds {', '.join(map(str, self.sweep_seeds))} in the "
               f"{', '.join(self.side_regimes)} regime(s)" if self.rewarm_strategies else ""),
        ]


def fmt_factor(g: float) -> str:
    """A growth factor for people: 4/3 rather than 1.33333, 1.5 and 2 as they are."""
    from fractions import Fraction
    f = Fraction(g).limit_denominator(12)
    if f.denominator > 1 and abs(float(f) - g) < 1e-9 and len(f"{g:g}") > 4:  # not a short decimal
        return f"{f.numerator}/{f.denominator}"
    return f"{g:g}"


@dataclass(frozen=True)
class GrowthFactorPreset:
    name: str
    # target model: d_model = n_head * head_dim, d_ff = ff_mult * d_model, RMSNorm
    vocab_size: int
    block_size: int
    n_layer: int
    head_dim: int
    n_head: int
    factors: tuple  # width ratios target / small (n_head / g must be whole)
    budgets: tuple  # tokens per target non-embedding parameter
    batch_size: int
    lr: float
    warmup: int
    eval_every: int
    ff_mult: int = 4
    # muP with one base width for every model of the study (None: the target's d_model),
    # so the LR means the same at every width; "sp" for the standard parameterization
    parameterization: str = "mup"
    mup_base_width: int | None = None
    strategy: str = "szp"
    strategy_options: tuple = ()  # (key, value) pairs, e.g. (("shrink", 0.5), ("carry_state", True))
    growth_schedule: str | None = None  # widen_'s schedule; None: the strategy's (szp: restart)
    # The operator comparison, named before the runs: each of these strategies also grows
    # the same small models at compare_factors, every budget and seed, with its own default
    # options and schedule (exact_copy and perturb continue with their moments and step),
    # against the same scratch runs as `strategy`
    compare_strategies: tuple = ("exact_copy", "perturb")
    compare_factors: tuple = (2, 4)
    # A budget whose runs see the training text more than this many times (small + grown
    # run, or scratch up to where its speedup is read) is marked in the tables and left
    # out of the verdicts: its speedups measure repetition as much as growth
    max_epochs: float = 2.0
    scratch_factor: float = 2.0  # scratch runs for this times a grown run's compute
    # val-loss interval of the scratch runs (None: eval_every): speedups are read off their
    # curves between evaluations, so they may be evaluated more often than the small and
    # grown runs, which only need their loss at growth and their best loss at the end
    scratch_eval_every: int | None = None
    weight_decay: float = 0.1
    eval_batch_size: int = 16
    eval_batches: int = 4
    seeds: tuple = (0, 1)  # a seed: the small model's init and data order, and the scratch run's init
    growth_seed: int = 0  # the growth's noise (szp's perturbation), the same for every seed
    keep_every: int = 0  # steps between resume checkpoints within long runs; 0: none
    threads: int | None = None
    # the depth axis (docs/studies.md, "Depth axis"): small models of n_layer / k layers at
    # the target's width, grown by each depth strategy; "both": (g, k) small models grown
    # in width (the preset's strategy) then in depth (identity); on depth_budgets
    depth_ratios: tuple = ()
    depth_strategies: tuple = ("stack", "identity")
    both: tuple = ()
    depth_budgets: tuple = ()

    @property
    def d_model(self) -> int:
        return self.n_head * self.head_dim

    @property
    def base_width(self) -> int:
        return self.mup_base_width or self.d_model

    @property
    def heldout_windows(self) -> int:
        return self.eval_batch_size * self.eval_batches

    @property
    def scratch_every(self) -> int:
        return self.scratch_eval_every or self.eval_every

    def compared(self, g: float) -> tuple:
        """The comparison strategies grown at factor g (none outside compare_factors)."""
        if not any(abs(g - c) < 1e-9 for c in self.compare_factors):
            return ()
        return tuple(s for s in self.compare_strategies if s != self.strategy)

    def describe(self) -> list[str]:
        opts = ", ".join(f"{k}={v}" for k, v in self.strategy_options)
        par = (f"muP, base width {self.base_width} for every model (the LR means the same at every width)"
               if self.parameterization == "mup" else "standard parameterization (SP)")
        sched = self.growth_schedule or ("the strategy's default (szp: restart: moments, step and warmup "
                                         "start over)")
        compared = tuple(dict.fromkeys(s for g in self.compare_factors for s in self.compared(g)))
        return [
            f"target model: d_model {self.d_model} ({self.n_head} heads of head_dim {self.head_dim}), "
            f"{self.n_layer} layers, d_ff {self.ff_mult * self.d_model}, RMSNorm, vocab {self.vocab_size}, "
            f"block {self.block_size}; {par}",
            f"growth factors g (width ratio): {', '.join(fmt_factor(g) for g in self.factors)}; "
            f"growth strategy {self.strategy}{f'({opts})' if opts else ''}, schedule after growth: {sched}; "
            f"growth noise seed {self.growth_seed}",
            (f"operator comparison: {', '.join(compared)} (each with its own default schedule and "
             f"options) grow the same small models at g = {', '.join(fmt_factor(g) for g in self.compare_factors)}, "
             f"every budget and seed, against the same scratch runs" if compared else
             "operator comparison: none (compare_strategies or compare_factors empty)"),
            f"budgets r: {', '.join(f'{r:g}' for r in self.budgets)} tokens per non-embedding parameter "
            f"(small model: r N_s tokens, then the grown model: r N tokens); scratch runs "
            f"{self.scratch_factor:g}x the largest grown run's compute; budgets whose runs see the "
            f"training text more than {self.max_epochs:g} times are marked and left out of the verdicts",
            f"seeds: {', '.join(map(str, self.seeds))} (each: the small models' init and data order and "
            f"the scratch run's init and data order)",
            f"training: batch {self.batch_size} x {self.block_size} tokens, AdamW lr {self.lr:g}, "
            f"betas 0.9/0.95, weight decay {self.weight_decay:g}, constant after {self.warmup} warmup steps, "
            f"val loss every {self.eval_every} steps"
            + (f" (scratch every {self.scratch_every})" if self.scratch_every != self.eval_every else "")
            + f" on {self.heldout_windows} held-out windows ({self.heldout_windows * self.block_size:,} tokens)",
        ]


SMOKE_NOTE = ("smoke preset: reduced grids (warmstart: 16-step continuations with a 4-step probe; "
              "growth factors {1.5, 2, 4}, budgets {1, 2}) on tiny models; it tests the pipeline, "
              "its numbers mean little")

WARMSTART = {
    "smoke": WarmstartPreset(
        name="smoke", vocab_size=512, block_size=32, n_layer=1, d_model=16, n_head=4, growth_factor=2,
        batch_size=8, lr=3e-3, warmup=5, checkpoints=(20, 40), continuation=16, probe_lag=4,
        eval_every=8, dropout=0.1, rewarm_steps=4, noise_scales=(1e-1,), escape_lags=(1, 4),
        references=("szp", "scratch", "structured_mapped", "small_equal_compute"),
        reference_regimes=("deterministic", "stochastic"), eval_batch_size=16, eval_batches=2, threads=1),
    # 432 continuations (docs/studies.md, "Presets": ~50-57 min with 2 workers on 2 idle cores):
    # the four families and perturb / perturb_np at noise 0.1 in three regimes on 8 seeds, the
    # references in two, the re-warmed ones on 4 seeds; val loss every 32 steps (and at the probe)
    "cpu": WarmstartPreset(
        name="cpu", vocab_size=1024, block_size=64, n_layer=4, d_model=64, n_head=4, growth_factor=2,
        batch_size=16, lr=2e-3, warmup=100, checkpoints=(500, 1000), continuation=128, probe_lag=16,
        eval_every=32, dropout=0.1, eval_batch_size=32, eval_batches=8, base_seeds=tuple(range(8)),
        sweep_seed_count=4, reference_regimes=("deterministic", "stochastic"), threads=1),
    "paper": WarmstartPreset(
        name="paper", vocab_size=8192, block_size=256, n_layer=8, d_model=512, n_head=8, growth_factor=2,
        batch_size=32, lr=1e-3, warmup=200, checkpoints=(1000, 2000), continuation=128, probe_lag=16,
        eval_every=32, dropout=0.1, eval_batch_size=32, eval_batches=16, base_seeds=(0, 1, 2),
        sweep_seed_count=2, reference_regimes=("deterministic", "stochastic")),
}

GROWTH_FACTOR = {
    "smoke": GrowthFactorPreset(
        name="smoke", vocab_size=512, block_size=32, n_layer=1, head_dim=2, n_head=12,
        factors=(1.5, 2, 4), budgets=(1, 2), batch_size=8, lr=3e-3, warmup=5, eval_every=8,
        eval_batch_size=16, eval_batches=2, threads=1),
    # The smallest target the brief allows (4 layers, head_dim 16, three factors whose
    # heads are whole: 4 heads / g for g = 4/3, 2, 4) with d_ff 2 d_model and 32 x 32
    # batches; bytes as tokens (vocab 258: no merges) make the 1.4 MB training text 1.40M
    # tokens, the most it can give, so budgets up to 10 see it under 2 times; budget 40
    # (5-14 epochs at vocab 288, its speedups a measure of repetition) is cut for the
    # operator comparison (exact_copy and perturb at g = 2 and 4) and a 65,536-token
    # held-out set (one evaluation costs ~16 training steps), evaluated every 100 steps
    # on scratch, whose curve the speedups are read off, and every 200 on the other runs;
    # five seeds, as the verdicts need (docs/studies.md, "Presets": ~50 min with 2 workers
    # on 2 idle Xeon cores).
    "cpu": GrowthFactorPreset(
        name="cpu", vocab_size=258, block_size=32, n_layer=4, head_dim=16, n_head=4, ff_mult=2,
        factors=(4 / 3, 2, 4), budgets=(2.5, 5, 10, 20), batch_size=32, lr=2e-3, warmup=20,
        eval_every=200, scratch_eval_every=100, eval_batch_size=64, eval_batches=32, seeds=(0, 1, 2, 3, 4),
        keep_every=2000, threads=1, depth_ratios=(2, 4), both=((4 / 3, 2),), depth_budgets=(2.5, 5, 10)),
    # d_model 384 = 6 heads of 64: g = 1.5, 2, 3 (6 would be 1 head) are whole in heads. Two seeds,
    # budgets 5-40, exact_copy and perturb beside szp at g = 2 only: 3.2e17 training FLOPs
    # (docs/studies.md), ~27 min on one H100 at 20% bf16 MFU.
    "paper": GrowthFactorPreset(
        name="paper", vocab_size=8192, block_size=512, n_layer=4, head_dim=64, n_head=6,
        factors=(1.5, 2, 3), budgets=(5, 10, 20, 40), batch_size=64, lr=3e-3, warmup=50,
        eval_every=200, eval_batch_size=32, eval_batches=8, keep_every=2000, compare_factors=(2,)),
}

PRESETS = {"warmstart": WARMSTART, "growth-factor": GROWTH_FACTOR}


def get_preset(study: str, preset, **overrides):
    """The preset of `study` named `preset` (or a preset object), with fields overridden."""
    table = PRESETS[study]
    if isinstance(preset, str):
        if preset not in table:
            raise ValueError(f"unknown {study} preset {preset!r}; allowed: {', '.join(table)}")
        preset = table[preset]
    known = {f.name for f in fields(preset)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{type(preset).__name__} has no field(s) {unknown}; known: {sorted(known)}")
    for k, v in overrides.items():
        if isinstance(v, list):
            overrides[k] = tuple(v)
    return replace(preset, **overrides)


def preset_dict(preset) -> dict:
    """The preset's fields that determine results (threads excluded)."""
    d = asdict(preset)
    d.pop("threads", None)
    return d
