"""growkern's kernels: the native extension growkern._C (C++ CPU, CUDA) and Triton.

Nothing heavy is imported here: `growkern.kernels.ext` loads growkern._C on
demand (and registers the ops' fake implementations for torch.compile),
`growkern.kernels.widen_triton` imports triton. growkern.backends picks among them.
"""
