"""Hand the heap's free memory back to the system: glibc's malloc_trim; elsewhere nothing.

Two callers. Packing the weights (GPT2LMHeadModel.pack_weights) makes a copy of each and frees the
original; glibc keeps the freed chunks in its heap (its mmap threshold rises with every large free) and
the packed copies do not reuse them, so without a trim the load peak held the float32 weights twice (about
930 MiB instead of 770 for 124M). And each generation (gpt2.sample.generate) ends with one: a long
prompt's transient buffers otherwise stay in the heap, fragmented, and over many prompts in one process
the peak RSS crept up by 27 MiB (scripts/soak.py; within 0–6 MiB with the trim).
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
