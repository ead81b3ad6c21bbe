"""The one primitive every tensor write of a growth goes through, and its reference.

For a new tensor of shape (R, C) built from an old tensor `src` (1-D tensors
use rows only):

    n = N(seed, stream, r + row_offset, noise_col[c])
    if row_src[r] >= 0 and col_src[c] >= 0:
        dst[r, c] = src[row_src[r], col_src[c]] * row_scale[r] * col_scale[c]
                    + sigma * row_sign[r] * col_sign[c] * n
    else:  # a fresh entry
        dst[r, c] = fresh_value + sigma_fresh * n

N is the counter-based normal of growkern.philox. A source index of -1 marks a
fresh unit. `noise_col` lets two columns share one draw: antithetic partners get
the same counter and opposite signs, so their sum is unchanged.

`row_offset` (0 by default) is the row of the full new tensor that row 0 of this
group is: a group may describe only rows [lo, hi) of a tensor (the rows a rank
owns under sharding, FSDP2) and, with row_offset = lo, draws exactly the noise
of those rows of the full build, so the pieces concatenate to the full result
bit for bit. `WidenGroup.rows(lo, hi)` makes such a group. Columns need no offset:
noise_col already names each column's counter, so `WidenGroup.cols(lo, hi)` just
slices the column maps. Counters are taken mod 2**32, as in growkern.philox.

A parameter and its optimizer moments share the maps (row_src, col_src) and
the noise layout, and differ in scales, fresh value and sigma; a WidenGroup
holds them together so one pass can read the old parameter and its moments and
write the new ones. This module is the specification: every backend must
match `reference_widen` (noise bit for bit in the integer stream, floats to
the bound stated in tests/test_kernels.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import philox


@dataclass
class TensorScales:
    """What differs between the members of a group."""
    row_scale: torch.Tensor  # float64 [R]
    col_scale: torch.Tensor | None  # float64 [C], None for 1-D tensors
    fresh_value: float = 0.0
    sigma: float = 0.0
    sigma_fresh: float = 0.0
    stream: int = 0


@dataclass
class WidenGroup:
    """The shared maps of a parameter and its optimizer moments.

    row_offset is the noise counter row of the group's row 0 (see the module
    docstring); it is keyword-only, so positional calls that pass `members`
    after `seed` keep working.
    """
    row_src: torch.Tensor  # int64 [R], -1 = fresh
    col_src: torch.Tensor | None  # int64 [C], None for 1-D tensors
    row_sign: torch.Tensor  # float64 [R]
    col_sign: torch.Tensor | None  # float64 [C]
    noise_col: torch.Tensor | None  # int64 [C]
    seed: int = 0
    row_offset: int = field(default=0, kw_only=True)  # noise row of row 0, in [0, 2**32)
    members: list[TensorScales] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.col_src is None:
            return (self.row_src.numel(),)
        return (self.row_src.numel(), self.col_src.numel())

    def rows(self, lo: int, hi: int) -> WidenGroup:
        """The group restricted to its rows [lo, hi): row_src, row_sign and every
        member's row_scale sliced (views), row_offset increased by lo (mod 2**32,
        as counters are) so the noise is that of the full group's rows; columns,
        seed and the other member fields are shared. The outputs of rows() over a
        partition of range(R) concatenate (along dim 0) to the full group's
        outputs, bit for bit."""
        lo, hi = _check_range(lo, hi, self.row_src.numel(), "rows")
        return WidenGroup(
            self.row_src[lo:hi], self.col_src, self.row_sign[lo:hi], self.col_sign, self.noise_col,
            self.seed, row_offset=(check_row_offset(self.row_offset) + lo) & philox.MASK32,
            members=[replace(m, row_scale=m.row_scale[lo:hi]) for m in self.members])

    def cols(self, lo: int, hi: int) -> WidenGroup:
        """The 2-D group restricted to its columns [lo, hi): col_src, col_sign,
        noise_col and every member's col_scale sliced (views), everything else
        shared. No offset is needed: noise_col already names each column's
        counter. The outputs over a partition of range(C) concatenate (along
        dim 1) to the full group's outputs, bit for bit."""
        if self.col_src is None:
            raise ValueError("cols: a 1-D group has no columns")
        lo, hi = _check_range(lo, hi, self.col_src.numel(), "cols")

        def cut(t):
            return None if t is None else t[lo:hi]

        return WidenGroup(
            self.row_src, self.col_src[lo:hi], self.row_sign, cut(self.col_sign), cut(self.noise_col),
            self.seed, row_offset=self.row_offset,
            members=[replace(m, col_scale=cut(m.col_scale)) for m in self.members])


def _check_range(lo, hi, n, name):
    lo, hi = int(lo), int(hi)
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"{name}({lo}, {hi}): need 0 <= lo <= hi <= {n}")
    return lo, hi


def check_row_offset(row_offset) -> int:
    """row_offset as an int in [0, 2**32), or ValueError."""
    if not (isinstance(row_offset, (int, np.integer)) and not isinstance(row_offset, bool)
            and 0 <= int(row_offset) <= philox.MASK32):
        raise ValueError(f"row_offset must be an int in [0, 2**32), got {row_offset!r}")
    return int(row_offset)


def noise(group: WidenGroup, stream: int, device=None) -> torch.Tensor:
    """The group's standard normals in float64, shape group.shape: entry (r, c) is
    N(seed, stream, r + row_offset, noise_col[c])."""
    rows = np.arange(group.row_src.numel(), dtype=np.int64) + check_row_offset(group.row_offset)
    if group.col_src is None:
        z = philox.normal(group.seed, stream, rows, np.zeros_like(rows))
    else:
        cols = group.noise_col.cpu().numpy()
        z = philox.normal(group.seed, stream, rows[:, None], cols[None, :])
    return torch.from_numpy(z).to(device)


def reference_widen(src: torch.Tensor, group: WidenGroup, member: TensorScales,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The specification, in float64, rounded once to the output dtype."""
    dev = src.device
    x = src.detach().to(torch.float64)
    row_src = group.row_src.to(dev)
    row_ok = row_src >= 0
    rows = x.index_select(0, row_src.clamp(min=0))
    base_scale = member.row_scale.to(dev, torch.float64)
    ok = row_ok
    if group.col_src is not None:
        col_src = group.col_src.to(dev)
        rows = rows.index_select(1, col_src.clamp(min=0))
        base_scale = base_scale[:, None] * member.col_scale.to(dev, torch.float64)[None, :]
        ok = row_ok[:, None] & (col_src >= 0)[None, :]
    out = torch.where(ok, rows * base_scale, torch.full_like(rows, member.fresh_value))
    if member.sigma != 0.0 or member.sigma_fresh != 0.0:
        sign = group.row_sign.to(dev, torch.float64)
        if group.col_src is not None:
            sign = sign[:, None] * group.col_sign.to(dev, torch.float64)[None, :]
        coef = torch.where(ok, member.sigma * sign, torch.full_like(sign, member.sigma_fresh))
        out = out + coef * noise(group, member.stream, dev)
    return out.to(out_dtype or src.dtype)
