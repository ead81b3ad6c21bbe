"""Build growkern. The native extension (growkern._C: C++ CPU kernels, plus CUDA
kernels when torch has CUDA and nvcc is found) is optional: without torch or a
compiler the package installs as pure Python and falls back to the reference.

Environment:
  FORCE_CUDA=1            build the CUDA sources even when torch/GPU detection says no
  GROWKERN_NO_EXT=1       skip the native extension altogether
  GROWKERN_STRICT_BUILD=1 any compile error fails the install (CI)
  TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0" when no GPU is visible)
  MAX_JOBS                parallel compile jobs (ninja)
  CUDA_HOME               the CUDA toolkit
Install: pip install --no-build-isolation -e .   (torch must already be installed)
"""
import os
import sys
import traceback
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BUILD_INFO = ROOT / "growkern" / "_build_info.py"
STRICT = os.environ.get("GROWKERN_STRICT_BUILD", "0") == "1"


def _warn(msg):
    print(f"\n*** growkern: {msg}\n", file=sys.stderr, flush=True)


def _write_build_info(**info):
    """growkern/_build_info.py: what this build produced, for growkern.backends()."""
    try:
        lines = ['"""Written by setup.py at build time: what the native build produced."""']
        lines += [f"{k.upper()} = {v!r}" for k, v in sorted(info.items())]
        BUILD_INFO.write_text("\n".join(lines) + "\n")
    except OSError:
        pass


def _extension_setup():
    """(ext_modules, cmdclass) for growkern._C, or ([], {}) with a reason recorded."""
    if os.environ.get("GROWKERN_NO_EXT", "0") == "1":
        _write_build_info(ext_built=False, with_cuda=False, reason="GROWKERN_NO_EXT=1 at build time")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as e:  # torch is needed at build time (--no-build-isolation)
        if STRICT:
            raise
        _warn(f"torch is not importable at build time ({e!r}); installing pure Python "
              f"(use pip install --no-build-isolation)")
        _write_build_info(ext_built=False, with_cuda=False,
                          reason=f"torch not importable at build time: {e!r}")
        return [], {}

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    nvcc_found = ce.CUDA_HOME is not None and Path(ce.CUDA_HOME, "bin", "nvcc").exists()
    with_cuda = force_cuda or (torch.version.cuda is not None and nvcc_found)
    if with_cuda and not nvcc_found:
        msg = "FORCE_CUDA=1 but no nvcc under CUDA_HOME; building the CPU kernels only"
        if STRICT:
            raise RuntimeError(msg)
        _warn(msg)
        with_cuda = False
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        try:
            gpu = torch.cuda.is_available()
        except Exception:
            gpu = False
        if not gpu:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    csrc = "csrc"
    sources = [f"{csrc}/widen_ops.cpp", f"{csrc}/widen_cpu.cpp", f"{csrc}/widen_core.cpp",
               f"{csrc}/philox_simd.cpp"]
    cxx = ["-O3", f"-DGK_WITH_CUDA={int(with_cuda)}"]
    link = []
    # at::parallel_for is inline code: with torch's OpenMP backend it only runs in
    # parallel if this extension is compiled with OpenMP too (and it then shares
    # torch's libgomp, so torch.set_num_threads applies).
    if sys.platform.startswith("linux") and getattr(torch._C, "has_openmp", False):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    extra = {"cxx": cxx}
    kw = dict(extra_compile_args=extra, extra_link_args=link, include_dirs=[str(ROOT / csrc)])
    if with_cuda:
        sources.append(f"{csrc}/widen_cuda.cu")
        extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DGK_WITH_CUDA=1"]
        ext = ce.CUDAExtension("growkern._C", sources, **kw)
    else:
        ext = ce.CppExtension("growkern._C", sources, **kw)
    info = dict(with_cuda=with_cuda, torch_version=torch.__version__,
                cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "")

    class Build(ce.BuildExtension):
        """Never fails the install unless GROWKERN_STRICT_BUILD=1."""

        def run(self):
            try:
                super().run()
            except Exception as e:
                if STRICT:
                    _write_build_info(ext_built=False, reason=f"build failed: {e!r}", **info)
                    raise
                traceback.print_exc()
                _warn(f"building growkern._C failed ({e!r}); installing pure Python, the "
                      f"reference backend will be used. Set GROWKERN_STRICT_BUILD=1 to fail instead.")
                _write_build_info(ext_built=False, reason=f"build failed: {e!r}", **info)
                return
            _write_build_info(ext_built=True, reason="", **info)

    return [ext], {"build_ext": Build.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extension_setup()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
