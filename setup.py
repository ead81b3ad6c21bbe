"""Build growkern. The native extension (growkern._C: C++ CPU kernels, plus CUDA
kernels when torch has CUDA and nvcc is found) is optional: without torch or a
compiler the package installs as pure Python and falls back to the reference."""
from setuptools import setup

setup()
