"""Study 2, `study growth-factor`: which growth factor pays off (docs/studies.md).

For each growth factor g (width ratio; fixed head_dim), budget r (tokens per target
non-embedding parameter) and seed, a small model of width d_model/g trains on r N_s
tokens, is grown to the target with the preset's strategy (default szp, the paper's
operator: muP shrink, zero-pad, muP-init perturbation, fresh optimizer state, schedule
restarted) and continues for r N tokens. Every model is muP with one base width (the
target's d_model), so the LR means the same at every width. One scratch run of the
target per seed, at scratch_factor (2) times the largest grown run's compute, gives the
reference curve; the speedup of (g, r, seed) reads the compute scratch needs to reach
the grown run's final val loss off the part of that seed's curve within 2x the grown
run's own compute. All runs use AdamW (betas 0.9/0.95) and a constant-after-warmup LR,
so every shorter run is exactly a prefix of a longer one: the small models of all
budgets are one run per (g, seed) (checkpoints at r N_s tokens), and the scratch run
of a grown run is the prefix of its seed's long scratch run. Independent runs go to
worker processes (pool.run_units): the small models first, then the scratch and grown
runs, longest first.

design.py defines the study (protocol, configs, the speedup), run.py runs it
(run_growth_factor), report.py writes its report."""
from .run import run_growth_factor

__all__ = ["run_growth_factor"]
