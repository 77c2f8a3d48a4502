"""Hand the heap's free memory back to the system, and keep a long run's peak flat: glibc only.

return_free_memory has two callers. Packing the weights (GPT2LMHeadModel.pack_weights) makes a copy of
each and frees the original; glibc keeps the freed chunks in its heap (its mmap threshold rises with
every large free) and the packed copies do not reuse them, so without a trim the load peak held the
float32 weights twice (about 930 MiB instead of 770 for 124M). And each generation
(gpt2.sample.generate) ends with one: a long prompt's transient buffers otherwise stay in the heap,
fragmented, and over many prompts in one process the peak RSS crept up by 27 MiB (scripts/soak.py;
within 0–6 MiB with the trim). fix_malloc_thresholds, called before a model's first generation
(gpt2.sample._warm_up), takes out most of the rest.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from collections.abc import Callable

# mallopt parameters (malloc.h) and the ceilings glibc's own thresholds rise to on 64-bit systems.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_CEILING = 32 << 20
TRIM_THRESHOLD_CEILING = 2 * MMAP_THRESHOLD_CEILING
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def _glibc_function(name: str) -> Callable[..., int] | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), name, None)


def return_free_memory() -> None:
    """Release the heap's free pages to the system, where the C library can (glibc)."""
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


@functools.cache
def fix_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds at the ceilings they rise to by themselves (32 and 64 MiB);
    once per process, and not where the user set them (environment). Returns whether it did.

    glibc starts at 128 KiB and raises both each time it frees a large block that it had mapped, so
    where a prompt's transient buffers land (mapped or in the heap, and where in the heap) depends on
    the order of earlier frees, which differs from one prompt to the next: over a run of prompts the
    peak RSS stepped up by 1-3 MiB, now and then 14, after the first prompt (scripts/soak.py). With the
    thresholds fixed, every prompt's buffers come from the heap in the same way; each generation still
    ends by handing the free pages back (return_free_memory).
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is None or any(name in os.environ for name in _USER_SETTINGS):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_CEILING))
