"""Concise progress lines: what runs now, how many remain, elapsed time and an ETA."""
from __future__ import annotations

import sys
import time


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """One line per finished unit. `total`: units planned; `to_compute`: how many of them
    are not cached; `work`: the work (e.g. FLOPs) of the units to compute, default one
    per unit. The ETA extrapolates the seconds per unit of work computed so far."""

    def __init__(self, study: str, total: int, to_compute: int, enabled: bool = True, stream=None,
                 work: float | None = None):
        self.study, self.total, self.to_compute = study, total, to_compute
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.done = self.computed = 0
        self.compute_seconds = 0.0
        self.work_total = float(to_compute if work is None else work)
        self.work_done = 0.0
        self.t0 = time.perf_counter()

    def log(self, msg: str) -> None:
        if self.enabled:
            print(f"[{self.study}] {msg}", file=self.stream, flush=True)

    def start(self, what: str) -> None:
        self.log(f"{self.done + 1}/{self.total} {what} ...")

    def finish(self, what: str, seconds: float | None, detail: str = "", work: float = 1.0) -> None:
        """A unit is done: seconds=None means it came from the cache; `work`: its work."""
        self.done += 1
        if seconds is None:
            how = "cached"
        else:
            self.computed += 1
            self.compute_seconds += seconds
            self.work_done += work
            how = f"{fmt_seconds(seconds)}"
        left = max(0, self.to_compute - self.computed)
        eta = ""
        if left and self.work_done > 0:
            rest = max(0.0, self.work_total - self.work_done)
            eta = f", ETA {fmt_seconds(rest * self.compute_seconds / self.work_done)}"
        elapsed = fmt_seconds(time.perf_counter() - self.t0)
        self.log(f"{self.done}/{self.total} {what}: {how}{' | ' + detail if detail else ''} "
                 f"[elapsed {elapsed}, {left} to compute{eta}]")
