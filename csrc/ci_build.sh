#!/usr/bin/env bash
# Kernel checks for CI. Source it and call the functions, or run it:
#
#   source csrc/ci_build.sh && gk_ci_kernels        # from .ci/run (both parts, timed)
#   bash csrc/ci_build.sh [cmake|cuda|all]
#
# gk_ci_cmake         (a) cmake + ctest of the libtorch-free core (csrc/) in a temp build dir
# gk_ci_cuda_compile  (b) in a separate venv with torch==$GK_CUDA_TORCH (a CUDA build), compile
#                     growkern._C with FORCE_CUDA=1 GROWKERN_STRICT_BUILD=1 and import it; fails
#                     if any source (a .cu included) does not compile. No GPU needed. The build
#                     runs on a copy of the sources, so the working tree's growkern/_C*.so (built
#                     against the system torch) is left alone. The venv is reused when present.
#
# Environment: GK_CUDA_VENV (default /tmp/growkern-cuvenv), GK_CUDA_TORCH (2.14.1),
# CUDA_HOME (/usr/local/cuda-13.0), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (2).

gk__root() { (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); }

gk__now() { date +%s.%N; }

gk__elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(gk__now)"; }

gk_ci_cmake() {
  local root build t0 rc
  root="$(gk__root)"
  build="$(mktemp -d /tmp/growkern-cmake.XXXXXX)"
  t0="$(gk__now)"
  echo "== growkern kernels (a): cmake + ctest in $build"
  (
    set -e
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >"$build/configure.log" 2>&1 ||
      { cat "$build/configure.log"; exit 1; }
    cmake --build "$build" -j "${MAX_JOBS:-2}" >"$build/build.log" 2>&1 || { cat "$build/build.log"; exit 1; }
    ctest --test-dir "$build" --output-on-failure
  )
  rc=$?
  echo "== (a) cmake + ctest: rc=$rc, $(gk__elapsed "$t0") s"
  [ "$rc" -eq 0 ] && rm -rf "$build"
  return "$rc"
}

gk_ci_cuda_compile() {
  local root venv torch_v cuda_home py t0 t1 work rc
  root="$(gk__root)"
  venv="${GK_CUDA_VENV:-/tmp/growkern-cuvenv}"
  torch_v="${GK_CUDA_TORCH:-2.14.1}"
  cuda_home="${CUDA_HOME:-/usr/local/cuda-13.0}"
  py="$venv/bin/python"
  t0="$(gk__now)"
  echo "== growkern kernels (b): CUDA compile in $venv (torch==$torch_v, CUDA_HOME=$cuda_home)"
  if [ ! -x "$cuda_home/bin/nvcc" ]; then
    echo "no nvcc at $cuda_home/bin/nvcc"
    return 1
  fi
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$torch_v' and torch.version.cuda else 1)" 2>/dev/null; then
    echo "   creating the venv (torch==$torch_v)"
    python3 -m venv "$venv" || return 1
    "$venv/bin/pip" install -q "torch==$torch_v" numpy setuptools wheel ninja 2>&1 | grep -v "is ignored: it is neither"
    [ "${PIPESTATUS[0]}" -eq 0 ] || return 1
  fi
  t1="$(gk__now)"
  echo "   venv ready: $(gk__elapsed "$t0") s"
  work="$(mktemp -d /tmp/growkern-cudabuild.XXXXXX)"
  cp -r "$root/setup.py" "$root/pyproject.toml" "$root/csrc" "$root/growkern" "$work/"
  rm -f "$work"/growkern/_C*.so "$work/growkern/_build_info.py"
  (
    cd "$work" &&
      PATH="$venv/bin:$PATH" CUDA_HOME="$cuda_home" FORCE_CUDA=1 GROWKERN_STRICT_BUILD=1 \
        TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
        "$py" setup.py -q build_ext --inplace >build.log 2>&1 ||
      { grep -E "error|Error" build.log | head -40; echo "   (full log: $work/build.log)"; exit 1; }
    echo "   compiled: $(gk__elapsed "$t1") s"
    cd "$work" && "$py" - <<'EOF'
import torch
import growkern._C as C
assert C.WITH_CUDA == 1, "growkern._C was built without its CUDA kernels"
for op in ("widen_group", "widen_groups", "philox_words"):
    table = torch._C._dispatch_dump(f"growkern::{op}")
    for key in ("CPU:", "CUDA:"):
        assert key in table, f"growkern::{op} has no {key[:-1]} kernel"
print(f"   import ok: torch {torch.__version__} (CUDA {torch.version.cuda}), growkern._C with CPU and CUDA kernels")
EOF
  )
  rc=$?
  echo "== (b) CUDA compile + import: rc=$rc, $(gk__elapsed "$t0") s"
  [ "$rc" -eq 0 ] && rm -rf "$work"
  return "$rc"
}

gk_ci_kernels() {
  local rc=0
  gk_ci_cmake || rc=1
  gk_ci_cuda_compile || rc=1
  return "$rc"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-all}" in
    cmake) gk_ci_cmake ;;
    cuda) gk_ci_cuda_compile ;;
    all) gk_ci_kernels ;;
    *) echo "usage: $0 [cmake|cuda|all]" >&2; exit 2 ;;
  esac
fi
