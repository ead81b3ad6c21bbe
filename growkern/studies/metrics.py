"""Metrics of the studies (defined in docs/studies.md; KL is growkern.growth.probe's): short-lag probes
(update size and escape from the clone subspace), continuation utility, rank correlation
and growth speedup."""
from __future__ import annotations

import math

import torch

from ..growth.maps import GrowthPlan


@torch.no_grad()
def update_rms(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """RMS of the parameter update, in weight units: sqrt(mean over all entries of all
    parameters of (theta_t - theta_0)^2). 0 for no parameters."""
    num = sum(float((after[k].double() - before[k].double()).pow(2).sum()) for k in before)
    count = sum(before[k].numel() for k in before)
    return math.sqrt(num / count) if count else 0.0


@torch.no_grad()
def relative_update_rms(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Per-tensor relative update size, averaged over tensors: mean over parameters W of
    RMS(W_t - W_0) / RMS(W_0) (= ||dW|| / ||W_0||, the entry counts cancel). Every tensor
    counts once whatever its size, so an embedding cannot drown the blocks; tensors with
    W_0 == 0 (relative size undefined) are left out; 0 when none is left."""
    ratios = []
    for k in before:
        w0 = before[k].double()
        den = float(w0.pow(2).sum())
        if den:
            ratios.append(math.sqrt(float((after[k].double() - w0).pow(2).sum()) / den))
    return sum(ratios) / len(ratios) if ratios else 0.0


@torch.no_grad()
def relative_update_norm(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Global relative update norm ||theta_t - theta_0|| / ||theta_0|| over all parameters
    together (what `update_rms` returned before it became a true RMS; the warmstart
    study's `probe_rms` column was defined as this). 0 when theta_0 == 0."""
    num = sum(float((after[k].double() - before[k].double()).pow(2).sum()) for k in before)
    den = sum(float(before[k].double().pow(2).sum()) for k in before)
    return math.sqrt(num / den) if den else 0.0


def _project_axis(w: torch.Tensor, src: torch.Tensor, dim: int) -> torch.Tensor:
    """Average over the copies of each source along `dim`; fresh indices -> 0."""
    ok = (src >= 0).to(w.device)
    n_old = int(src.max()) + 1 if bool((src >= 0).any()) else 1
    idx = src.clamp(min=0).to(w.device)
    wt = w.movedim(dim, 0)
    sums = torch.zeros((n_old,) + wt.shape[1:], dtype=wt.dtype, device=w.device)
    sums.index_add_(0, idx[ok], wt[ok])
    counts = torch.bincount(idx[ok], minlength=n_old).to(wt.dtype).clamp(min=1)
    mean = sums / counts.view(-1, *([1] * (wt.dim() - 1)))
    out = mean[idx] * ok.view(-1, *([1] * (wt.dim() - 1))).to(wt.dtype)
    return out.movedim(0, dim)


def _tensor_plan(plan: GrowthPlan, name: str):
    try:
        return plan.tensors[name]
    except KeyError:
        raise ValueError(f"parameter {name!r} is not in the growth plan (a plan of the model it was "
                         f"grown with is needed)") from None


def _clone_split(w: torch.Tensor, tp) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, P(w)) in float64 and the plan's (out, in) orientation (a transposed parameter,
    stored (in, out) like GPT-2's Conv1D, is read through its transpose): P averages over
    the copies of each source along rows, then columns, fresh indices -> 0."""
    w = w.detach().double()
    if tp.transposed and w.dim() == 2:
        w = w.t()
    proj = _project_axis(w, tp.rows.src, 0)
    if tp.cols is not None:
        proj = _project_axis(proj, tp.cols.src, 1)
    return w, proj


@torch.no_grad()
def escape_fraction(named_params: dict[str, torch.Tensor], plan: GrowthPlan) -> float:
    """Fraction of weight energy outside the cloned subspace of `plan`: the subspace where
    every copy of a unit equals the others (any tensor the clone map can produce) and fresh
    units are zero. Projection = average over copies along each grown axis."""
    outside = total = 0.0
    for name, w in named_params.items():
        w, proj = _clone_split(w, _tensor_plan(plan, name))
        outside += float((w - proj).pow(2).sum())
        total += float(w.pow(2).sum())
    return outside / total if total else 0.0


@torch.no_grad()
def update_escape(theta0: dict[str, torch.Tensor], theta_t: dict[str, torch.Tensor],
                  plan: GrowthPlan) -> float:
    """Fraction of the update's energy outside the cloned subspace of `plan`:
    sum ||dW - P(dW)||^2 / sum ||dW||^2 with dW = theta_t - theta_0 (the grown model's
    parameters at step t and at step 0, same names and shapes), over all parameters of
    theta0 together, with escape_fraction's projection P. Unlike escape_fraction of the
    weights, it does not count what growth itself put outside the subspace (noise,
    fresh units), only where training moved the weights. 0 when the update is zero."""
    outside = total = 0.0
    for name, w0 in theta0.items():
        tp = _tensor_plan(plan, name)
        if tuple(theta_t[name].shape) != tuple(w0.shape):
            raise ValueError(f"{name}: shapes differ ({tuple(w0.shape)} at step 0, "
                             f"{tuple(theta_t[name].shape)} at step t)")
        d, proj = _clone_split(theta_t[name].detach().double() - w0.detach().double(), tp)
        outside += float((d - proj).pow(2).sum())
        total += float(d.pow(2).sum())
    return outside / total if total else 0.0


def area_under_curve(steps: list[float], losses: list[float]) -> float:
    """Trapezoid area under the val-loss curve divided by its step span: the curve's mean."""
    if len(steps) < 2:
        return float(losses[0]) if losses else float("nan")
    area = sum((steps[i + 1] - steps[i]) * (losses[i] + losses[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks, ties averaged)."""
    if len(xs) != len(ys):
        raise ValueError("spearman needs two lists of equal length")
    if len(xs) < 2:
        return float("nan")
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else float("nan")


def compute_to_reach(flops: list[float], losses: list[float], target: float) -> float | None:
    """FLOPs at which a (flops, val loss) curve first reaches `target`, linearly interpolated
    between evaluations; None if it never does."""
    for i, (f, l) in enumerate(zip(flops, losses)):
        if l <= target:
            if i == 0:
                return f
            f0, l0 = flops[i - 1], losses[i - 1]
            return f0 + (f - f0) * (l0 - target) / (l0 - l)
    return None


def speedup(scratch_flops: list[float], scratch_losses: list[float], grown_total_flops: float,
            grown_final_loss: float) -> tuple[float, bool]:
    """Compute scratch needs to reach the grown run's final val loss, divided by the compute
    the grown run used (its small model's pretraining included). Returns (speedup, exact);
    when scratch never reaches that loss, its whole budget is a lower bound and exact=False."""
    need = compute_to_reach(scratch_flops, scratch_losses, grown_final_loss)
    if need is None:
        return scratch_flops[-1] / grown_total_flops, False
    return need / grown_total_flops, True
