"""Study 1, `study warmstart`: which warm start to continue from (docs/studies.md).

Base models, one per base seed, are trained (deterministic regime, muP, a decaying LR
schedule) with full-state checkpoints at the preset's steps. From each checkpoint the
candidates are grown with growkern.widen_ (weights, AdamW moments, step and schedule
carried; szp and scratch start a new run) and continued for the same number of steps in
three regimes (deterministic; shuffle: another data order; stochastic: that order and
dropout): the paper's four families and perturb at other noise scales, the references
(szp, structured with exact_copy's moments, and the base model continued ungrown for the
same FLOPs) and re-warmed ones. Each continuation measures preservation at step 0, the
update's escape from the clone subspace at short lags, a probe at the probe lag, and the
val-loss curve; the report gives a verdict per paper claim, regime and checkpoint.

design.py defines the study (candidates, selectors, columns, configs), run.py runs it
(run_warmstart), report.py writes its report."""
from .run import run_warmstart

__all__ = ["run_warmstart"]
