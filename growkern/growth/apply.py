"""The data path's middle: plan -> WidenGroups -> the kernels -> new tensors.

For every parameter, build_group turns its TensorPlan and its optimizer moments into
one WidenGroup of the primitive (growkern/kernels/spec.py): the shared row and column
maps, and per member (the parameter, then each moment) its scales, fresh value and
noise. grow_state hands the groups to the chosen backend a batch at a time (one CUDA
launch per dtype), finishes what the primitive does not do (structured's
orthogonalized fresh rows, offset norm gains), and lets the placement
(growkern/growth/placement.py) install each new tensor on the same nn.Parameter and
in the optimizer state. The old tensors of a batch are released before the next one.
"""
from __future__ import annotations

import math

import torch

from ..kernels.spec import TensorScales, WidenGroup
from .checks import moments
from .maps import GrowthPlan, TensorPlan


def rms_mapped(old: torch.Tensor, tp: TensorPlan) -> float:
    """RMS over the non-fresh entries of the mapped (pre-noise) tensor, from the old
    tensor alone: sum (a_r b_c x[src_r, src_c])^2 = u^T (x*x) v with u, v the summed
    squared scales of each source index."""
    r_ok = tp.rows.src >= 0
    u = torch.zeros(tp.rows.old, dtype=torch.float64).index_add_(0, tp.rows.src[r_ok], tp.rows.scale[r_ok] ** 2)
    count = int(r_ok.sum())
    x = old.detach()
    if tp.cols is None:
        x, v = x[:, None], torch.ones(1, dtype=torch.float64)
    else:
        c_ok = tp.cols.src >= 0
        v = torch.zeros(tp.cols.old, dtype=torch.float64).index_add_(
            0, tp.cols.src[c_ok], tp.cols.scale[c_ok] ** 2)
        count *= int(c_ok.sum())
    if x.stride(0) < x.stride(1):  # a transposed view: walk its storage in order
        x, u, v = x.t(), v, u
    total = _weighted_square_sum(x, u.to(x.device), v.to(x.device))
    return math.sqrt(total / count) if count else 0.0


_CPU_CHUNK = 1 << 16  # elements per float64 chunk: 512 KiB, in cache


def _weighted_square_sum(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """u^T (x*x) v in float64. On the CPU a few rows at a time, so the float64 copy of
    x stays in cache instead of being a second whole tensor in memory."""
    step = x.shape[0] if x.device.type != "cpu" else max(1, _CPU_CHUNK // max(1, x.shape[1]))
    total = 0.0
    for lo in range(0, x.shape[0], step):
        xc = x[lo:lo + step].to(torch.float64)
        total += float(u[lo:lo + step] @ (xc * xc) @ v)
    return total


def build_group(tp: TensorPlan, param: torch.Tensor, moments: dict, strategy, seed: int) -> WidenGroup:
    """The primitive's input for one parameter and its moments (param first)."""
    def signs(axis):
        n = axis.src.numel()
        sign = axis.sign if axis.sign is not None else torch.zeros(n, dtype=torch.float64)
        idx = axis.noise_idx if axis.noise_idx is not None else torch.arange(n)
        return sign, idx

    row_sign, _ = signs(tp.rows)
    col_sign = noise_col = None
    if tp.cols is not None:
        col_sign, noise_col = signs(tp.cols)
    group = WidenGroup(tp.rows.src, None if tp.cols is None else tp.cols.src,
                       row_sign, col_sign, noise_col, seed)
    sigma = sigma_fresh = 0.0
    if tp.noise or tp.noise_fresh:
        unit = rms_mapped(param, tp) if tp.noise_mode == "relative" else 1.0
        sigma, sigma_fresh = tp.noise * unit, tp.noise_fresh * unit
    group.members.append(TensorScales(tp.rows.scale, None if tp.cols is None else tp.cols.scale,
                                      tp.fresh_value, sigma, sigma_fresh, tp.stream))
    if tp.moment_plan is None:
        _add_moments(group, moment_scales(tp, strategy.moments), moments)
    return group


def build_moment_group(tp: TensorPlan, moments: dict, seed: int) -> WidenGroup | None:
    """The moments' own group when they follow another plan's maps (tp.moment_plan:
    structured with moments="mapped"), with that plan's exact moment rule and no noise;
    None when they are members of the parameter's group (build_group)."""
    mp = tp.moment_plan
    if mp is None or not moments:
        return None
    zeros = lambda axis: torch.zeros(axis.src.numel(), dtype=torch.float64)  # noqa: E731
    group = WidenGroup(mp.rows.src, None if mp.cols is None else mp.cols.src, zeros(mp.rows),
                       None if mp.cols is None else zeros(mp.cols),
                       None if mp.cols is None else torch.arange(mp.cols.src.numel()), seed)
    _add_moments(group, mp.moment_scales(), moments)
    return group


def _add_moments(group: WidenGroup, scales, moments: dict) -> None:
    m_rows, m_cols = scales
    for key in moments:
        power = 2 if key in ("exp_avg_sq", "max_exp_avg_sq") else 1
        group.members.append(TensorScales(m_rows ** power, None if m_cols is None else m_cols ** power))


def moment_scales(tp: TensorPlan, mode: str):
    if mode in ("exact", "asym"):
        return tp.moment_scales()
    kept_r = (tp.rows.src >= 0).double()
    kept_c = None if tp.cols is None else (tp.cols.src >= 0).double()
    if mode == "keep":
        return kept_r, kept_c
    return kept_r * 0, None if kept_c is None else kept_c * 0  # "zero"


def orthogonalize_fresh_rows(w: torch.Tensor, tp: TensorPlan) -> int:
    """Project the fresh rows onto the orthogonal complement of the old rows' span and
    give each the old rows' RMS. Returns how many rows found no room (left as drawn)."""
    fresh = tp.rows.src < 0
    if not fresh.any():
        return 0
    x = w.detach().to(torch.float64)
    old_rows, new_rows = x[~fresh.to(w.device)], x[fresh.to(w.device)]
    target = old_rows.pow(2).mean().sqrt() * math.sqrt(x.shape[1])
    _, s, vh = torch.linalg.svd(old_rows, full_matrices=False)
    rank = int((s > s.max() * max(x.shape) * torch.finfo(torch.float64).eps).sum()) if s.numel() else 0
    basis = vh[:rank]
    proj = new_rows - (new_rows @ basis.T) @ basis
    norms = proj.norm(dim=1, keepdim=True)
    room = norms.squeeze(1) > 1e-6 * new_rows.norm(dim=1).clamp(min=1e-300)
    out = torch.where(room[:, None], proj / norms.clamp(min=1e-300) * target, new_rows)
    x[fresh.to(w.device)] = out
    w.copy_(x.to(w.dtype))
    return int((~room).sum())


def finish_gain(p: torch.Tensor, tp: TensorPlan, rows: tuple[int, int] | None = None):
    """Norms computing x_hat * (offset + w): the primitive mapped w with the scales of
    the effective gain; w' = a w + offset (a - 1) on kept entries, fresh ones hold
    the effective value and take - offset. `rows`: p holds only these rows [lo, hi)."""
    lo, hi = rows if rows is not None else (0, tp.rows.src.numel())
    kept = (tp.rows.src[lo:hi] >= 0).to(p.device)
    a = tp.rows.scale[lo:hi].to(p.device)
    fix = torch.where(kept, tp.gain_offset * (a - 1), torch.full_like(a, -tp.gain_offset))
    p.copy_((p.double() + fix).to(p.dtype))


def grow_tensor(tp: TensorPlan, old: torch.Tensor, role: str | None, strategy, seed: int, widen_many) -> torch.Tensor:
    """One new tensor alone, as widen_ builds it with its group: the parameter (role
    None) or one of its optimizer moments (role "exp_avg", ...), `old` in its stored
    layout. For writers that hold one tensor at a time (growkern/train/offline.py)."""
    x = old.t() if tp.transposed else old
    group = build_group(tp, x, {} if role is None else {role: x}, strategy, seed)
    if role is not None:
        group = build_moment_group(tp, {role: x}, seed) or group
        group.members = group.members[-1:]
    out = widen_many([([x], group)])[0][0]
    if role is None:
        if tp.orthogonalize_fresh_rows:
            orthogonalize_fresh_rows(out, tp)
        if tp.gain_offset:
            finish_gain(out, tp)
    return out.t().contiguous() if tp.transposed else out


def batch_indices(sizes: list[int]) -> list[list[int]]:
    """Consecutive items in batches of at most max(sizes) bytes of old state each.
    Each batch is one call of the primitive (one CUDA launch per dtype), and the
    peak extra memory stays the new state plus the largest group's old state, as
    with one group at a time."""
    budget = max(sizes, default=0)
    batches, batch, used = [], [], 0
    for i, size in enumerate(sizes):
        if batch and used + size > budget:
            batches.append(batch)
            batch, used = [], 0
        batch.append(i)
        used += size
    if batch:
        batches.append(batch)
    return batches


def grow_state(model, optimizer, plan: GrowthPlan, widen_many, placement) -> int:
    """Grow every parameter of `model` and its optimizer moments as `plan` says, in place.
    Returns how many fresh rows found no room orthogonal to the old rows (structured)."""
    strategy = plan.strategy
    named = list(model.named_parameters())
    if placement.one_at_a_time:  # each old parameter is gathered whole
        batches = [[item] for item in named]
    else:
        sizes = [p.nbytes + sum(v.nbytes for v in moments(optimizer, p).values()) for _, p in named]
        batches = [[named[i] for i in b] for b in batch_indices(sizes)]
    no_room = 0
    with torch.no_grad():
        for batch in batches:
            items, states = [], []
            for name, p in batch:
                tp = plan.tensors[name]
                moms = moments(optimizer, p)
                olds = [placement.read(t.detach()) for t in (p, *moms.values())]
                if tp.transposed:  # the plan reads (out, in); the primitive takes any strides
                    olds = [t.t() for t in olds]
                groups = [build_group(tp, olds[0], moms, strategy, plan.seed)]
                moment_group = build_moment_group(tp, moms, plan.seed)
                if moment_group is not None:  # the moments follow other maps: a group of their own
                    groups.append(moment_group)
                rows = placement.rows(tp, p)
                if rows is not None:  # only the new rows (stored dim 0) this rank holds
                    groups = [g.cols(*rows) if tp.transposed else g.rows(*rows) for g in groups]
                if len(groups) == 1:
                    items.append((olds, groups[0]))
                else:  # the parameter alone, then its moments
                    items += [(olds[:1], groups[0]), (olds[1:], groups[1])]
                states.append((optimizer.state.get(p, {}) if optimizer is not None else {}, list(moms), rows,
                               len(groups)))
            flat = widen_many(items)
            del items  # the old tensors of this batch go once their owners let go below
            results, k = [], 0
            for *_, n_groups in states:  # a parameter's outputs: its group's, then its moments' group's
                results.append([t for outs in flat[k:k + n_groups] for t in outs])
                k += n_groups
            del flat
            for (name, p), (state, keys, rows, _), outs in zip(batch, states, results):
                tp = plan.tensors[name]
                if tp.orthogonalize_fresh_rows:
                    no_room += orthogonalize_fresh_rows(outs[0], tp)
                if tp.gain_offset:
                    finish_gain(outs[0], tp, rows)
                if tp.transposed:
                    outs = [t.t().contiguous() for t in outs]
                for key, new in zip(keys, placement.install(p, tp, outs[0], outs[1:])):
                    state[key] = new
                if strategy.reset_step and "step" in state:
                    state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
                if p.grad is not None:
                    p.grad = None  # a gradient of the old shape is meaningless now
            del results
    return no_room
