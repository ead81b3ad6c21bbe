"""Warm-start selection for the user's own checkpoint (`growkern.select_warm_start`,
`growkern select`): run.py grows and continues each candidate from one snapshot of the
small state (snapshot.py); report.py ranks them and writes the files."""
from .report import Selection
from .run import DEFAULT_CANDIDATES, REGIMES, Candidate, select_warm_start

__all__ = ["Selection", "Candidate", "select_warm_start", "DEFAULT_CANDIDATES", "REGIMES"]
