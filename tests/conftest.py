"""Shared test setup.

Triton decides whether it interprets kernels when it is first imported, and
transformers imports it; so TRITON_INTERPRET=1 (Triton on the CPU, as the kernel
tests need) is set here, before any test module imports anything.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
