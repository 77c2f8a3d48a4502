"""Decode-step products compiled on this machine from `rows.c`, a candidate kernel like torch's own.

torch's one-row products read 16-bit and int8 weights at about half the bytes per second of float32 ones on
the CPUs measured (a weight widened to float32 in registers costs no more than reading it, but torch's
kernels convert it in slower steps), so a small C kernel compiled with `-march=native` reads every precision
at close to the memory's speed. It is built once per machine with the C compiler (`$CC`, else `cc`) into
`<cache>/native/`, loaded with ctypes, and runs on torch's OpenMP threads. Where there is no compiler, no
OpenMP, or the build fails, it is simply not a candidate.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("rows.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BUILD_SECONDS = 120
# For each weight dtype: the macro that builds its function, the function, and the dtype its bias takes.
FUNCTIONS = {torch.float32: ("ROWS_F32", "rows_f32", torch.float32),
             torch.bfloat16: ("ROWS_BF16", "rows_bf16", torch.bfloat16),
             torch.int8: ("ROWS_I8", "rows_i8", torch.bfloat16)}


def _compiler() -> list[str] | None:
    command = shlex.split(os.environ.get("CC") or "cc")
    found = shutil.which(command[0]) if command else None
    return [found, *command[1:]] if found else None


def library_path(compiler: list[str], flags: tuple[str, ...]) -> Path:
    """Where the build for this source, compiler, flags and CPU is kept (`-march=native` is per CPU)."""
    from gpt2.download import cache_root
    from gpt2.tuning import cpu_description

    digest = hashlib.sha256("\n".join([SOURCE.read_text(), *compiler, *flags, cpu_description(),
                                       platform.machine()]).encode()).hexdigest()[:16]
    return cache_root() / "native" / f"rows-{digest}.so"


@functools.cache
def library(dtype: torch.dtype, flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL | None:
    """The compiled kernel for `dtype` weights, built on first use (about 0.5 s); None where it cannot be (no
    compiler, no OpenMP in torch, a failed build, an unwritable cache)."""
    compiler = _compiler()
    if compiler is None or dtype not in FUNCTIONS or not SOURCE.is_file() \
            or "OpenMP" not in torch.__config__.parallel_info().split("parallel backend:")[-1]:
        return None
    macro, name, _ = FUNCTIONS[dtype]
    flags = (*flags, f"-D{macro}")
    path = library_path(compiler, flags)
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=".rows-", suffix=".so")
            os.close(descriptor)
            try:
                subprocess.run([*compiler, *flags, str(SOURCE), "-o", partial], check=True, capture_output=True,
                               timeout=BUILD_SECONDS)
                os.replace(partial, path)
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    getattr(lib, name).argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    getattr(lib, name).restype = None
    return lib


def available(dtype: torch.dtype) -> bool:
    """Whether the kernel for `dtype` weights builds here (building it the first time)."""
    return library(dtype) is not None


def rows_product(x: Tensor, weight: Tensor, bias: Tensor | None = None, scales: Tensor | None = None,
                 lib: ctypes.CDLL | None = None) -> Tensor:
    """x (rows, in) float32 @ weight (out, in).T [* scales (out,), for int8] + bias (out,): float32 (rows, out).
    The weight is float32, bfloat16 or int8 and contiguous; bias and scales are in FUNCTIONS' dtype."""
    lib = lib or library(weight.dtype)
    _, name, bias_dtype = FUNCTIONS[weight.dtype]
    x = x.contiguous()
    rows, (out_features, in_features) = x.size(0), weight.shape
    if x.dtype != torch.float32 or x.dim() != 2 or x.size(1) != in_features or not weight.is_contiguous() \
            or not _fits(bias, bias_dtype, out_features) or (weight.dtype == torch.int8) != (scales is not None) \
            or not _fits(scales, torch.bfloat16, out_features):
        raise ValueError(f"{name}: operands x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} "
                         f"{weight.dtype} do not fit")
    y = torch.empty(rows, out_features)
    getattr(lib, name)(x.data_ptr(), weight.data_ptr(), None if scales is None else scales.data_ptr(),
                       None if bias is None else bias.data_ptr(), y.data_ptr(), rows, in_features, out_features,
                       torch.get_num_threads())
    return y


def _fits(vector: Tensor | None, dtype: torch.dtype, size: int) -> bool:
    return vector is None or (vector.dtype == dtype and vector.shape == (size,) and vector.is_contiguous())
