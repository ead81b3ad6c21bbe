"""Study 1, `study warmstart`: which warm start to continue from (docs/studies.md).

Base models, one per base seed, are trained (deterministic regime, muP, a decaying LR
schedule) with full-state checkpoints at the preset's steps. From each checkpoint one
candidate per strategy is grown with growkern.widen_ (weights, AdamW moments, step and
schedule carried; szp and scratch start a new run) and continued for the same number of
steps in two regimes; the preserving strategies are also continued with a re-warmed
schedule, and perturb at several noise scales. Each continuation measures preservation
at step 0, the update's escape from the clone subspace at short lags, a probe at the
probe lag, and the val-loss curve.

design.py defines the study (candidates, selectors, columns, configs), run.py runs it
(run_warmstart), report.py writes its report."""
from .run import run_warmstart

__all__ = ["run_warmstart"]
