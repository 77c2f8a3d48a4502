"""Hand the heap's free memory back to the system after packing weights at load: glibc only.

Building the CPU kernels' stored weights (gpt2.tuning.use_cpu_kernels) makes a copy of each weight and
frees the original. glibc keeps the freed chunks in its heap, and the packed copies do not reuse them, so
without a trim the process would hold the loaded weights twice after loading.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def return_free_memory() -> None:
    """Release the heap's free pages to the system, where the C library can (glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
