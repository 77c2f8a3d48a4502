"""glibc heap tuning while a model loads, so that the weights' peak memory is one copy, not two.

Loading reads each tensor into a buffer, transposes it into another, and (float32 on CPU) packs it into
a third, freeing the one before. glibc keeps freed chunks of that size in its heap, because its mmap
threshold rises with every large free, and the next copies do not fit into them: without this, the
process's peak held the float32 weights twice (950 MiB instead of 740 for 124M). While loading, large
allocations are mmapped, so a free returns them to the system at once; afterwards the threshold is fixed
at glibc's own upper bound, where the dynamic one ends up anyway, so that generation's buffers are
reused without new page faults. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import sys
from collections.abc import Callable, Iterator

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
LOADING_THRESHOLD = 1 << 20  # bytes: every weight of GPT-2 but the smallest vectors is larger
THRESHOLD_AFTER = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), "mallopt", None)


@contextlib.contextmanager
def large_frees_returned() -> Iterator[None]:
    """Within: allocations of LOADING_THRESHOLD bytes or more are mmapped and go back to the system when freed."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, LOADING_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, THRESHOLD_AFTER)
