"""The tiny Triton kernel tools/gpu_check_preflight.py compiles and launches (in a module of its own: triton
reads a kernel's source from its file, and the interpreter looks for triton.language among its globals)."""

import triton
import triton.language as tl


@triton.jit
def add_one(x, y, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y + i, tl.load(x + i, mask=i < n) + 1.0, mask=i < n)
