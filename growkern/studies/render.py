"""Writing study outputs, shared by both studies' report.py: CSV rows, Markdown tables,
and PNG figures (matplotlib, Agg backend, imported lazily). Without matplotlib the
figures are skipped and the report says so."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..train.staging import atomic_open


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def fmt_sig(x, sig: int = 3) -> str:
    """x to `sig` significant digits (for values spanning decades: 4.26e-13, 0.00264, 0.55)."""
    if not isinstance(x, float) or math.isnan(x):
        return fmt(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{sig - 1}e}"
    return f"{x:.{sig}g}"


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_csv(path, rows, columns) -> Path:
    """One line per row, the given columns (missing values empty), floats in full precision."""
    path = Path(path)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (repr(r[c]) if isinstance(r[c], float) else r[c])
                    for c in columns])
    _atomic_write_text(path, buf.getvalue())
    return path


def write_text(path, text: str) -> Path:
    path = Path(path)
    _atomic_write_text(path, text)
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, path) -> Path:
    path = Path(path)
    with atomic_open(path) as f:
        fig.savefig(f, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def plots_section(plots, caption: str) -> list[str]:
    """The report's '## Plots' lines: the images and their caption, or why there are none."""
    lines = ["## Plots", ""]
    if plots:
        lines += [f"![{f.stem}]({f.name})" for f in plots]
        lines += ["", caption]
    else:
        lines.append("matplotlib is not installed: no plots (pip install matplotlib).")
    return lines
