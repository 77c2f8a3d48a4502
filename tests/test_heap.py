"""
Tests for gpt2/heap.py: glibc's malloc thresholds are fixed once (and never against the user's own
setting), read back from the allocator itself: a 1 MiB block is mapped on its own (mallinfo2's hblks)
under glibc's starting threshold of 128 KiB, and comes from the heap once the threshold is fixed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.heap import _USER_SETTINGS, _glibc_function

ROOT = Path(__file__).resolve().parent.parent

# A fresh process (the thresholds are process-wide and fixed at most once): mapped blocks after a 1 MiB
# malloc before the fix, and after one following it.
PROBE = """
import ctypes, json
from gpt2.heap import fix_malloc_thresholds

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mapped_blocks_holding_1_mib():
    block = libc.malloc(1 << 20)
    count = libc.mallinfo2().hblks
    libc.free(block)
    return count

before = mapped_blocks_holding_1_mib() - libc.mallinfo2().hblks
fixed = fix_malloc_thresholds()
after = mapped_blocks_holding_1_mib() - libc.mallinfo2().hblks
print(json.dumps({"before": before, "fixed": fixed, "again": fix_malloc_thresholds(), "after": after}))
"""


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in _USER_SETTINGS}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


glibc_only = pytest.mark.skipif(_glibc_function("mallinfo2") is None, reason="glibc 2.33 or newer only")


@glibc_only
def test_fixed_thresholds_keep_a_1_mib_block_in_the_heap():
    assert probe() == {"before": 1, "fixed": True, "again": True, "after": 0}


@glibc_only
@pytest.mark.parametrize("setting", [{"MALLOC_MMAP_THRESHOLD_": "131072"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_a_threshold_the_user_set_is_left_alone(setting):
    assert probe(**setting) == {"before": 1, "fixed": False, "again": False, "after": 1}
