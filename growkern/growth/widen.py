"""widen_: grow a model, its optimizer state and its LR schedule in place.

The data path is plan -> kernels -> new state, each step in its own module:
  1. plan_growth (plan.py), or the plan given, says how every parameter grows;
  2. everything is validated before anything changes (checks.py, and the
     placement's own checks: placement.py);
  3. the primitive (growkern/kernels) builds each parameter and its optimizer
     moments together, a batch of parameters per call (apply.py), and the placement
     installs them on the same nn.Parameter objects and in the optimizer state;
  4. the model's adapter (adapter.py) updates its config and everything derived from
     it (module attributes, buffers); the schedule is set (schedule.py); the probe
     batch measures step-0 preservation (probe.py).
Any model with an adapter grows the same way: growkern.GPT, the Hugging Face
families (growkern/models/), and classes registered by users.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.nn as nn

from ..kernels.backends import resolve_backend
from . import checks
from .adapter import adapter_for
from .apply import grow_state
from .maps import GrowthPlan
from .placement import placement_for
from .plan import plan_growth
from .probe import check_probe, preservation, probe_logits
from .schedule import apply_schedule, check_restartable, mup_lr_ratios
from .wrappers import unwrap, unwrap_optimizer, unwrap_scheduler


@dataclass
class GrowthReport:
    strategy: str
    backend: str
    dims_before: dict
    dims_after: dict
    params_before: int
    params_after: int
    bytes_allocated: int  # bytes of the new parameters and optimizer state
    seconds: float
    exact: bool  # the plan claims function preservation at step 0
    preservation: dict | None = None  # max_abs_dlogits, kl_small_wide, dloss (probe_batch given)
    notes: list = field(default_factory=list)
    operation: str = "widen_"  # or "deepen_"

    def __str__(self) -> str:
        dims = "  ".join(f"{k} {self.dims_before[k]}->{self.dims_after[k]}" for k in self.dims_before)
        lines = [
            f"growkern.{self.operation}  strategy={self.strategy}  backend={self.backend}",
            f"  {dims}",
            f"  parameters {self.params_before:,} -> {self.params_after:,}   "
            f"new state {self.bytes_allocated / 2**20:.1f} MiB   {self.seconds * 1e3:.1f} ms",
        ]
        if self.preservation is not None:
            p = self.preservation
            lines.append(f"  step-0 preservation: max|dlogits| {p['max_abs_dlogits']:.3e}  "
                         f"KL(small||wide) {p['kl_small_wide']:.3e}  dloss {p['dloss']:+.3e}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def widen_(model, optimizer=None, scheduler=None, *, plan: GrowthPlan | None = None,
           probe_batch=None, schedule: str | None = None, rewarm_steps: int | None = None,
           backend: str = "auto", **plan_kwargs) -> GrowthReport:
    """Grow `model` in width in place, with its optimizer state and LR schedule.

    `model` is a growkern.GPT, a transformers causal LM of a known family (GPT-2,
    Llama, Mistral, Qwen2/3, Phi-3, Gemma2/3), or a class registered with
    growkern.register_adapter; torch.compile and DDP wrappers are looked through, as
    are accelerate's optimizer and scheduler wrappers. A DistributedDataParallel model
    is grown on every rank (widen_ is then a collective: each rank calls it with the
    same arguments, between optimizer steps) and its Reducer rebuilt on the same
    wrapper; an FSDP2 model (fully_shard) is grown the same way, each rank gathering
    one old parameter at a time and building only its own rows of the new one
    (growkern/growth/placement.py, docs/distributed.md). Give a `plan` or the keywords
    of growkern.plan_growth (factor=, d_model=, d_ff=, n_head=, strategy=, seed=,
    strategy options). The nn.Parameter objects stay the same, so optimizer
    param_groups, hooks and references stay valid; model.config describes the new
    widths. `schedule`: "continue" (the LR goes on), "rewarm" (a ramp over
    rewarm_steps), "restart" (the scheduler back to its step 0, warmup again); None:
    the strategy's default ("restart" for szp, else "continue"). A muP model's groups'
    LRs (and the scheduler's base LRs) follow the new width (growkern/growth/mup.py).
    Raises ValueError/TypeError, with nothing changed, on anything it cannot do."""
    t0 = time.perf_counter()
    placement = placement_for(model)  # one process, DDP replicas or FSDP2 shards
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"widen_ grows a torch.nn.Module; got {type(model).__name__}")
    adapter = adapter_for(model)
    optimizer, scheduler = unwrap_optimizer(optimizer), unwrap_scheduler(scheduler)
    if plan is None:
        plan = plan_growth(model, **plan_kwargs)
    elif plan_kwargs:
        raise ValueError(f"give either plan= or plan_growth keywords, not both (got {sorted(plan_kwargs)})")
    if schedule is None:  # the strategy's: "continue", or "restart" for szp (a new run)
        schedule = getattr(plan.strategy, "default_schedule", "continue")
        if schedule == "restart" and scheduler is None:
            schedule = "continue"  # no scheduler to restart

    # --- everything is checked before anything changes ---
    checks.validate(model, adapter, optimizer, scheduler, plan, schedule, rewarm_steps)
    if schedule == "restart":
        check_restartable(scheduler)
    placement.check(model, plan)
    # memory first: the reference builds below allocate each new-width parameter briefly
    new_bytes = checks.check_memory(model, optimizer, plan, placement.shards)
    new_config = adapter.new_config(model.config, plan.new)
    ref_old = adapter.build_reference(model.config, like=model)
    ref_new = adapter.build_reference(new_config, like=model)
    checks.check_new_config(model, adapter, plan, ref_old, ref_new)
    lr_ratios = mup_lr_ratios(model, optimizer, model.config, new_config)
    device = next(model.parameters()).device
    widen_many, backend_name = resolve_backend(backend, device, batch=True)
    if probe_batch is not None:
        check_probe(probe_batch, plan.old, device)
        small_logits, probe_y = probe_logits(model, probe_batch)
        placement.settle()
    params_before = _num_params(model)

    # --- from here on, state changes ---
    placement.release()
    no_room = grow_state(model, optimizer, plan, widen_many, placement)
    notes = []
    if no_room:
        notes.append(f"{no_room} new fan-in rows had no room orthogonal to the old rows "
                     f"(the old rows span their fan-in space) and stay as drawn")
    adapter.apply_config(model, new_config)
    adapter.sync(model, ref_old, ref_new)
    notes += placement.finish(model)
    notes += apply_schedule(optimizer, scheduler, lr_ratios, new_config, schedule, rewarm_steps)

    report = GrowthReport(
        strategy=plan.strategy.describe(), backend=backend_name, dims_before=plan.old.widths(),
        dims_after=plan.new.widths(), params_before=params_before, params_after=_num_params(model),
        bytes_allocated=new_bytes, seconds=time.perf_counter() - t0, exact=plan.exact, notes=notes)
    if not plan.exact:
        notes.append(f"not function preserving at step 0: {plan.not_exact_because}")
    if probe_batch is not None:
        wide_logits, _ = probe_logits(model, probe_batch)
        placement.settle()
        report.preservation = preservation(small_logits, wide_logits, probe_y)
    return report


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
