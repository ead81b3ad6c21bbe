"""Metrics of the studies (defined in docs/studies.md): preservation, short-lag probes,
continuation utility, rank correlation and growth speedup."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .plan import GrowthPlan


@torch.no_grad()
def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """Mean over positions of KL(p || q) in nats, computed in float64."""
    lp = F.log_softmax(logits_p.double(), -1)
    lq = F.log_softmax(logits_q.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@torch.no_grad()
def update_rms(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """RMS of the parameter update relative to the weights: ||theta_t - theta_0|| / ||theta_0||
    over all parameters together."""
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


@torch.no_grad()
def escape_fraction(named_params: dict[str, torch.Tensor], plan: GrowthPlan) -> float:
    """Fraction of weight energy outside the cloned subspace of `plan`: the subspace where
    every copy of a unit equals the others (any tensor the clone map can produce) and fresh
    units are zero. Projection = average over copies along each grown axis."""
    outside = total = 0.0
    for name, w in named_params.items():
        tp = plan.tensors[name]
        w = w.detach().double()
        proj = _project_axis(w, tp.rows.src, 0)
        if tp.cols is not None:
            proj = _project_axis(proj, tp.cols.src, 1)
        outside += float((w - proj).pow(2).sum())
        total += float(w.pow(2).sum())
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
