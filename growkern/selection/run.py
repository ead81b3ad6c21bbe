"""select_warm_start: which warm start to continue from, for the user's own model and data.

Width growth is a choice among warm starts built from one full training state
(exact-copy, perturbative, asymmetric reset, structured non-clone, shrink-zero-pad-
perturb): they tie at step 0 by construction, and only continuation tells them apart
(docs/studies.md, Study 1). select_warm_start runs that choice on the user's
checkpoint: each candidate is grown with widen_ from the same small state, continued
for `budget` steps on the user's batches with the plain loop a user would write, and
evaluated on held-out batches at step 0, at the probe lag and at the end; the small
state is then put back (snapshot.py) for the next candidate, so memory holds one grown
state, not K. With apply=True the model, optimizer and scheduler end grown as the
winner (as widen_ leaves them: step 0 of the growth); with apply=False bit-identical
to how they began.

The loop is the specification, so a user can reproduce any row by hand:
    widen_(model, optimizer, scheduler, strategy=s, seed=seed + repeat, **targets)
    for x, y in batches[window]: loss_fn(model, (x, y)).backward(); [clip];
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
with the model in eval mode (dropout off) in the deterministic regime and in train
mode in the stochastic one, evaluation the mean loss over eval_batches in eval mode
without gradients.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..growth.adapter import adapter_for
from ..growth.plan import plan_growth
from ..growth.probe import logits_of
from ..growth.strategies import strategies
from ..growth.widen import widen_
from ..growth.wrappers import unwrap, unwrap_optimizer, unwrap_scheduler
from ..studies.stats import TIE_TOL
from .snapshot import TrainingState

DEFAULT_CANDIDATES = ("exact_copy", "perturb", "asym_reset", "structured", "szp")
# deterministic: dropout off, batches in the given order (candidates differ only by
# their growth); shuffle: batches reordered per repeat, dropout off; stochastic: both
# the reordering and the model's own dropout (train mode)
REGIMES = ("deterministic", "shuffle", "stochastic")


@dataclass(frozen=True)
class Candidate:
    """A warm start: a label, a growth strategy and its options (widen_ keywords)."""
    name: str
    strategy: str
    options: tuple = ()  # sorted (key, value) pairs

    @classmethod
    def of(cls, spec) -> "Candidate":
        if isinstance(spec, Candidate):
            return spec
        if isinstance(spec, str):
            return cls(spec, spec)
        if isinstance(spec, dict):
            spec = dict(spec)
            strategy = spec.pop("strategy", None) or spec.get("name")
            name = spec.pop("name", None) or strategy
            if not isinstance(strategy, str):
                raise TypeError(f"candidate {spec!r}: a dict candidate needs 'strategy' (or 'name') naming a "
                                f"strategy")
            return cls(name, strategy, tuple(sorted(spec.items())))
        raise TypeError(f"a candidate is a strategy name or a dict(name=..., strategy=..., **options); "
                        f"got {type(spec).__name__}")


def next_token_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross entropy of `model` on (input_ids, targets); targets -100 ignored."""
    x, y = batch
    logits = logits_of(model(x))
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)


def evaluate(model, eval_batches, loss_fn) -> float:
    """Mean of loss_fn over eval_batches, in eval mode, without gradients (mode restored)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return sum(float(loss_fn(model, b)) for b in eval_batches) / len(eval_batches)
    finally:
        model.train(was)


def _windows(n_batches: int, steps: int, repeats: int) -> list[int]:
    """Start of repeat r's window of `steps` batches, spread over the batches given."""
    slack = n_batches - steps
    return [0 if repeats == 1 else (r * slack) // (repeats - 1) for r in range(repeats)]


def _order(start: int, steps: int, shuffle: bool, seed: int) -> list[int]:
    idx = list(range(start, start + steps))
    if shuffle:
        perm = torch.randperm(steps, generator=torch.Generator().manual_seed(seed)).tolist()
        idx = [idx[i] for i in perm]
    return idx


def _check_args(candidates, budget, probe_steps, regime, repeats, seed, batches, eval_batches,
                max_grad_norm, tol) -> tuple[list[Candidate], int]:
    cands = [Candidate.of(c) for c in candidates]
    if not cands:
        raise ValueError("candidates is empty; give at least one strategy name")
    names = [c.name for c in cands]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"candidate names must be distinct; {dup[0]!r} appears twice")
    known = strategies()
    for c in cands:
        if c.strategy not in known:
            raise ValueError(f"unknown candidate strategy {c.strategy!r}; allowed: {', '.join(known)}")
    for name, v, low in (("budget", budget, 0), ("probe_steps", probe_steps, 1), ("repeats", repeats, 1),
                         ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if budget and probe_steps > budget:
        raise ValueError(f"probe_steps {probe_steps} is beyond the budget {budget}; allowed: 1..{budget} "
                         f"(or budget=0 for the probe only)")
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; allowed: {', '.join(REGIMES)}")
    steps = budget or probe_steps
    if len(batches) < steps:
        raise ValueError(f"{len(batches)} training batches cannot feed {steps} steps per candidate; give at "
                         f"least {steps} (or a smaller budget)")
    if not len(eval_batches):
        raise ValueError("eval_batches is empty; give at least one held-out batch")
    if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    return cands, steps


def select_warm_start(model, optimizer, scheduler=None, *, batches: Sequence, eval_batches: Sequence,
                      factor=None, d_model=None, d_ff=None, n_head=None, candidates=None,
                      budget: int = 128, probe_steps: int = 16, regime: str = "deterministic",
                      repeats: int = 1, seed: int = 0, loss_fn: Callable | None = None,
                      max_grad_norm: float | None = None, apply: bool = True, tol: float = TIE_TOL,
                      progress: Callable[[str], None] | None = None):
    """Grow each candidate warm start from the same full training state, continue it on
    `batches` and rank the candidates by held-out loss; returns a Selection.

    `model`, `optimizer`, `scheduler`: what widen_ takes (growkern.GPT, a supported
    Hugging Face family or a registered adapter's class; AdamW/Adam/SGD). `batches`: a
    sequence of training batches, `(input_ids, targets)` LongTensor pairs on the model's
    device or whatever `loss_fn(model, batch)` takes (default: next-token cross entropy
    of the model's logits); `eval_batches` likewise, held out. Targets: factor= or
    d_model=/d_ff=/n_head= as in widen_. `candidates`: strategy names or dicts
    (name=, strategy=, options), default exact_copy, perturb, asym_reset, structured,
    szp. Each candidate continues for `budget` steps (budget=0: `probe_steps` only,
    ranked by the probe) and is evaluated at step 0, at `probe_steps` and at the end.
    `regime`: "deterministic" (dropout off, batches in order), "shuffle" (batches
    reordered per repeat), "stochastic" (reordered, and the model's dropout on). Repeat
    r grows with seed + r, continues on its own window of the batches and, in the
    stochastic regime, its own dropout stream; repeats give paired differences to the
    best with intervals. Losses within `tol` nats of the best are ties. Nothing changes
    before every argument has been checked; on an error during a candidate the state is
    put back before the error propagates."""
    if loss_fn is None:
        loss_fn = next_token_loss
    target = unwrap(model)
    if not isinstance(target, nn.Module):
        raise TypeError(f"select_warm_start grows a torch.nn.Module; got {type(target).__name__}")
    adapter_for(target)  # a TypeError naming the class when nothing can grow it
    opt, sched = unwrap_optimizer(optimizer), unwrap_scheduler(scheduler)
    if opt is None:
        raise ValueError("select_warm_start needs the optimizer: candidates differ in their optimizer "
                         "state and are compared after training")
    cands, steps = _check_args(candidates or DEFAULT_CANDIDATES, budget, probe_steps, regime, repeats,
                               seed, batches, eval_batches, max_grad_norm, tol)
    targets = {k: v for k, v in dict(factor=factor, d_model=d_model, d_ff=d_ff, n_head=n_head).items()
               if v is not None} or {"factor": 2}
    plans = {(c.name, r): plan_growth(target, strategy=c.strategy, seed=seed + r, **targets, **dict(c.options))
             for c in cands for r in range(repeats)}  # every candidate planned (and checked) up front
    say = progress or (lambda msg: None)

    state = TrainingState(target, opt, sched)
    base_loss = evaluate(target, eval_batches, loss_fn)
    windows = _windows(len(batches), steps, repeats)
    runs = []
    try:
        for r in range(repeats):
            order = _order(windows[r], steps, regime != "deterministic", seed + r)
            for c in cands:
                if runs:
                    state.restore()
                t0 = time.perf_counter()
                run = _continue(target, opt, sched, plans[(c.name, r)], c, r, seed, order, batches, eval_batches,
                                loss_fn, steps, probe_steps, regime, max_grad_norm)
                run.update(seconds=time.perf_counter() - t0, loss_small=base_loss)
                runs.append(run)
                say(f"{len(runs)}/{len(cands) * repeats} {c.name} (repeat {r}): step 0 {run['loss_step0']:.4f}, "
                    f"probe {run['probe_loss']:.4f}, final {run['final_loss']:.4f} [{run['seconds']:.1f}s]")
    finally:
        state.restore()

    from .report import Selection
    selection = Selection.from_runs(runs, [c.name for c in cands], metric="final_loss" if budget else "probe_loss",
                                    tol=tol, regime=regime, budget=budget, probe_steps=probe_steps,
                                    repeats=repeats, targets=targets, seed=seed, loss_small=base_loss,
                                    candidates={c.name: (c.strategy, dict(c.options)) for c in cands})
    if apply:
        best = next(c for c in cands if c.name == selection.best)
        selection.growth = widen_(model, optimizer, scheduler, strategy=best.strategy, seed=seed, **targets,
                                  **dict(best.options))
    return selection


def _continue(model, opt, sched, plan, cand: Candidate, repeat: int, seed: int, order, batches, eval_batches,
              loss_fn, steps: int, probe_steps: int, regime: str, max_grad_norm) -> dict:
    """One candidate: grow, evaluate, train `steps` steps, with the probe at probe_steps."""
    from ..studies.metrics import update_escape  # the studies' metric; imported on use (start-up time)
    probe = eval_batches[0]
    pair = isinstance(probe, (tuple, list)) and len(probe) == 2 and all(torch.is_tensor(t) for t in probe)
    report = widen_(model, opt, sched, plan=plan, probe_batch=tuple(probe) if pair else None)
    loss0 = evaluate(model, eval_batches, loss_fn)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if n in plan.tensors}
    torch.manual_seed(seed + repeat)  # the dropout stream of this repeat (stochastic regime)
    train_mode = regime == "stochastic"
    was = model.training
    model.train(train_mode)
    losses, probe_loss, escape = [], math.nan, math.nan
    try:
        for i, b in enumerate(order, start=1):
            loss = loss_fn(model, batches[b])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"candidate {cand.name}: the training loss is {float(loss)} at step {i}")
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if i == probe_steps:
                probe_loss = evaluate(model, eval_batches, loss_fn)
                escape = update_escape(theta0, {n: p.detach() for n, p in model.named_parameters() if n in theta0},
                                       plan)
    finally:
        model.train(was)
    final = evaluate(model, eval_batches, loss_fn) if steps > probe_steps else probe_loss
    return {"candidate": cand.name, "strategy": cand.strategy, "repeat": repeat, "growth_seed": seed + repeat,
            "preserving": plan.exact, "loss_step0": loss0,
            "pres_kl": report.preservation["kl_small_wide"] if report.preservation else math.nan, "probe_loss": probe_loss, "final_loss": final,
            "escape": escape, "train_losses": losses, "params_wide": report.params_after,
            "params_small": report.params_before}
