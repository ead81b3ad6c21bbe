"""Shared test setup.

Triton decides whether it interprets kernels when it is first imported, and
transformers imports it; so TRITON_INTERPRET=1 (Triton on the CPU, as the kernel
tests need) is set here, before any test module imports anything.

Property-based tests run under a hypothesis profile: "default" keeps the suite fast
and reproducible (few examples, derandomized, so CI is deterministic); "fuzz" runs
thousands of fresh random examples per property:

    python -m pytest -q tests --hypothesis-profile=fuzz -k "fuzz or hypothesis"

A test sizes itself with `settings.default.max_examples` (scaled down when one example
is expensive), so both profiles apply to every property.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("default", max_examples=20, derandomize=True, **_common)
settings.register_profile("fuzz", max_examples=3000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
